"""The distributed tests' worker: `loraprune` commands under DDP, then both pruners in FSDP2 training loops.

    python -m torch.distributed.run --nproc_per_node 2 tests/distributed_scripts/worker.py WORKDIR

`WORKDIR/spec.json` holds `commands` (argument lists of `loraprune.cli.main`, run in order:
`Trainer` picks up the process group and trains with DDP) and `fsdp` (keyword arguments of
`fsdp_run`, one run per entry, written to `WORKDIR/fsdp-<method>.pt` by the main process).
All ranks run everything; one interpreter start per rank keeps the test fast.

`fsdp_run` is also what the test calls in its own process (no process group, nothing sharded)
to get the single-process reference: the same model, seed, data and global batch.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from peft import PeftModel
from torch import nn

from loraprune.distributed import full_state_dict, full_tensor, is_distributed
from loraprune.errors import LoraPruneError
from loraprune.lora import add_lora
from loraprune.model_pruning import LoRAPruneConfig, ModelPruner, PruningTarget
from loraprune.models import load_model
from loraprune.rank_pruning import RankPruner, RankPruningConfig


def shard(model: nn.Module) -> None:
    """FSDP2 as `transformers.Trainer` applies it: each decoder layer, then the whole model."""
    from torch.distributed.fsdp import fully_shard

    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(model)


def lora_model(model_dir: str, method: str) -> PeftModel:
    """The tiny model of `model_dir` with the LoRA adapter `method` trains (the same initialisation every time)."""
    model, _ = load_model(model_dir)
    torch.manual_seed(0)
    return add_lora(model, r=4, alpha=8) if method == "loraprune" else add_lora(model, r=8, alpha=8)


def fsdp_run(model_dir: str, method: str, steps: int, global_batch: int, seq_len: int = 16, lr: float = 1e-2) -> dict:
    """Train a LoRA adapter with `method`'s pruner in a plain loop; sharded when a process group runs.

    Every rank trains on its contiguous slice of each global batch, so the averaged gradient
    is the single-process one. Returns (on every rank) the decisions, the LoRA weights, the
    logits of a probe batch and the full state dict (main process only).
    """
    ranks = dist.get_world_size() if is_distributed() else 1
    rank = dist.get_rank() if is_distributed() else 0
    model = lora_model(model_dir, method)
    model.train()
    if ranks > 1:
        shard(model)
    if method == "loraprune":
        pruner = ModelPruner(model, steps, PruningTarget(sparsity=0.3), LoRAPruneConfig(prune_every=2))
    else:
        pruner = RankPruner(model, RankPruningConfig(r0=8, rank=2, alpha=8, prune_every=2, schedule="global"), steps)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    vocab = model.config.vocab_size
    data = torch.randint(0, vocab, (steps * global_batch, seq_len), generator=torch.Generator().manual_seed(3))
    local = global_batch // ranks
    for step in range(1, steps + 1):
        start = (step - 1) * global_batch + rank * local
        batch = data[start : start + local]
        model(input_ids=batch, labels=batch).loss.backward()
        if method == "loraprune":
            pruner.observe()
            optimizer.step()
            pruner.after_optimizer_step(optimizer)
        else:
            pruner.observe_gradients()
            optimizer.step()
            pruner.step(step, optimizer)
        optimizer.zero_grad()
    model.eval()
    probe = data[:2]
    with torch.no_grad():
        logits = model(input_ids=probe).logits
    lora = {name: full_tensor(param.detach()).clone() for name, param in model.named_parameters() if "lora_" in name}
    result = {"lora": lora, "logits": logits, "probe": probe, "state_dict": full_state_dict(model)}
    if method == "loraprune":
        result.update(masks=pruner.masks, scores=pruner.scores, history=pruner.history)
        try:
            pruner.finish()  # a sharded model cannot be shrunk in place
        except LoraPruneError as error:
            result["finish_error"] = str(error)
    else:
        result.update(active=pruner.active_components(), ranks=pruner.ranks())
    return result


def main(workdir: Path) -> None:
    from loraprune.cli import main as cli

    dist.init_process_group("gloo")  # Trainer (accelerate) then uses this process group
    spec = json.loads((workdir / "spec.json").read_text())
    for argv in spec["commands"]:
        status = cli(argv)
        if status != 0:
            raise SystemExit(f"loraprune {' '.join(argv)} exited with {status}")
    for kwargs in spec["fsdp"]:
        result = fsdp_run(**kwargs)
        if dist.get_rank() == 0:
            torch.save(result, workdir / f"fsdp-{kwargs['method']}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
