"""Save a rank-pruned LoRA adapter as a physically small, standard PEFT LoRA adapter.

Each module keeps only its active components (`A` rows, `B` columns), so its saved rank is
its real rank (not a mask over `r0`). The scaling of training is kept exactly: with training
scaling `alpha / r0`, a module of final rank `r_m` is saved with `rank_pattern = r_m` and
`alpha_pattern = alpha · r_m / r0`, and `use_rslora` stays off. A module whose rank reached
zero is left out of `target_modules` (and of the weights), so stock
`peft.PeftModel.from_pretrained` loads the adapter without any code of ours.
"""

from __future__ import annotations

import copy
import os
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

from loraprune.errors import LoraPruneError
from loraprune.io import atomic_directory, write_json
from loraprune.rank_pruning.state import find_lora_modules
from loraprune.safety.finite import require_finite

ADAPTER_WEIGHTS = "adapter_model.safetensors"
RANKS_FILE = "pruned_ranks.json"


@dataclass
class ExportedAdapter:
    """Where the adapter went and what it contains."""

    path: Path
    ranks: dict[str, int]
    dropped: list[str]
    parameters: int
    file_bytes: int


def export_pruned_adapter(
    model: PeftModel,
    active: Mapping[str, torch.Tensor],
    output_dir: str | os.PathLike,
    base_model_name_or_path: str | None = None,
    adapter: str = "default",
    overwrite: bool = False,
    finalize: Callable[[Path], None] | None = None,
    nonfinite_loss_step: int | None = None,
) -> ExportedAdapter:
    """Write the adapter `adapter` of `model`, shrunk to the `active` components of each module.

    `active` maps module paths (as `RankPruner.active_components()` gives them) to boolean
    masks over the trained rank. `base_model_name_or_path` is written into
    `adapter_config.json` (default: the one the adapter was created with); it should be a
    path or hub id that loads as it stands. The directory is written atomically; `finalize(staging)`
    runs last inside it (files derived from the adapter, such as its report). Non-finite factors are
    refused (`NonFiniteError`, nothing written; `nonfinite_loss_step` is named in the message).
    """
    config = model.peft_config[adapter]
    if getattr(config, "use_rslora", False) or getattr(config, "use_dora", False):
        raise LoraPruneError("rank-pruned export supports plain LoRA only (use_rslora and use_dora off)")
    state = get_peft_model_state_dict(model, adapter_name=adapter)
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    dropped: list[str] = []
    for module in find_lora_modules(model, adapter):
        if module.name not in active:
            raise LoraPruneError(f"no component mask for LoRA module {module.name}")
        keep = torch.nonzero(active[module.name]).flatten()
        prefix = f"base_model.model.{module.name}"
        key_a, key_b = f"{prefix}.lora_A.weight", f"{prefix}.lora_B.weight"
        if key_a not in state or key_b not in state:
            raise LoraPruneError(f"unexpected PEFT state-dict layout: {key_a} missing")
        if keep.numel() == 0:
            del state[key_a], state[key_b]
            dropped.append(module.name)
            continue
        state[key_a] = state[key_a][keep.to(state[key_a].device)].contiguous()
        state[key_b] = state[key_b][:, keep.to(state[key_b].device)].contiguous()
        r_train, alpha_train = module.layer.r[adapter], module.layer.lora_alpha[adapter]
        ranks[module.name] = keep.numel()
        alphas[module.name] = alpha_train * keep.numel() / r_train
    if not ranks:
        raise LoraPruneError("every LoRA module was pruned to rank 0: there is no adapter to save")
    require_finite(state.items(), "the adapter", nonfinite_loss_step)

    exported = copy.deepcopy(config)
    common_rank = Counter(ranks.values()).most_common(1)[0][0]
    exported.r = common_rank
    exported.lora_alpha = alphas[next(name for name, rank in ranks.items() if rank == common_rank)]
    exported.target_modules = sorted(ranks)
    exported.rank_pattern = dict(ranks)
    exported.alpha_pattern = dict(alphas)
    exported.inference_mode = True
    if base_model_name_or_path is not None:
        exported.base_model_name_or_path = base_model_name_or_path

    with atomic_directory(output_dir, overwrite=overwrite) as staging:
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in state.items()},
            staging / ADAPTER_WEIGHTS,
            metadata={"format": "pt"},
        )
        exported.save_pretrained(str(staging))
        write_json(
            staging / RANKS_FILE,
            {
                "ranks": ranks,
                "dropped_modules": dropped,
                "trained_rank": {m.name: m.layer.r[adapter] for m in find_lora_modules(model, adapter)},
            },
        )
        if finalize is not None:
            finalize(staging)
    path = Path(output_dir)
    return ExportedAdapter(
        path=path,
        ranks=ranks,
        dropped=dropped,
        parameters=sum(v.numel() for v in state.values()),
        file_bytes=(path / ADAPTER_WEIGHTS).stat().st_size,
    )
