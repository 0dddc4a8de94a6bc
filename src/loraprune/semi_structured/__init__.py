"""Semi-structured N:M sparsity: LoRAPrune's LoRA-guided element importance and the Wanda / SparseGPT baselines.

Every decoder projection (q, k, v, o, gate, up, down) keeps `N` of every `M` consecutive input
weights (2:4, 4:8). `prune_nm` (and `loraprune prune-nm`) runs one method end to end and
saves the merged model with the stock config; the pieces are usable alone:

* `NMPattern`, `nm_mask`, `pattern_violations`: the pattern, mask selection from any score,
  exact checks;
* `NMPruner` / `NMPruneCallback`: LoRAPrune N:M while LoRA trains (moving-average element
  importance, gradual masks, forward with `mask ⊙ (W0 + s·B·A)`), merged by `finish()`;
* `prune_one_shot`: magnitude, Wanda and SparseGPT N:M, layer by layer on calibration data;
* `MaskedMergedForward`, `merge_masked`: LoRA training under a fixed mask and its merge;
* `to_semi_structured`: a 2:4 model on PyTorch's sparse tensor-core kernels (CUDA).
"""

from loraprune.semi_structured.callback import FixedMaskCallback, NMPruneCallback
from loraprune.semi_structured.config import NM_METHODS, PruneNMConfig
from loraprune.semi_structured.entry import NMResult, prune_nm
from loraprune.semi_structured.kernels import to_semi_structured
from loraprune.semi_structured.masked_lora import MaskedMergedForward, merge_masked
from loraprune.semi_structured.one_shot import ONE_SHOT_METHODS, prune_one_shot
from loraprune.semi_structured.pattern import NMPattern, nm_mask, pattern_mask, pattern_violations
from loraprune.semi_structured.pruner import NMPruner
from loraprune.semi_structured.run import loraprune_nm, masked_recovery, nm_summary
from loraprune.semi_structured.sparsegpt import sparsegpt_prune
from loraprune.semi_structured.targets import nm_modules

__all__ = [
    "NM_METHODS",
    "ONE_SHOT_METHODS",
    "FixedMaskCallback",
    "MaskedMergedForward",
    "NMPattern",
    "NMPruneCallback",
    "NMPruner",
    "NMResult",
    "PruneNMConfig",
    "loraprune_nm",
    "masked_recovery",
    "merge_masked",
    "nm_mask",
    "nm_modules",
    "nm_summary",
    "pattern_mask",
    "pattern_violations",
    "prune_nm",
    "prune_one_shot",
    "sparsegpt_prune",
    "to_semi_structured",
]
