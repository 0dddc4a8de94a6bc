"""Help texts and defaults of the safety options that several run configs share (no imports, so that
`loraprune.config` can use them)."""

SAVE_STEPS_HELP = (
    "save a checkpoint (LoRA weights, optimizer, pruning state) every N training steps in OUTPUT-checkpoints/, "
    "so that a killed run can --resume; removed once the output is saved (0: none)"
)
RESUME_HELP = (
    "continue an interrupted run from a checkpoint: 'latest' (the newest in OUTPUT-checkpoints/), a "
    "checkpoint-N folder, or a folder of them; every other setting must be the interrupted run's"
)
DIVERGENCE_FACTOR = 2.5
DIVERGENCE_HELP = (
    "stop the run with an error when a step's training loss is NaN/Inf or above this multiple of the first "
    "step's (the learning rate is too high); 0 turns the check off (non-finite weights are still never saved)"
)
