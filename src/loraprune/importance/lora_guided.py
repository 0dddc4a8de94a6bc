"""LoRA-guided importance (LoRAPrune): score base-model groups from LoRA weights and gradients only.

For a LoRA-wrapped linear layer `W = W0 + s·B·A` (`A` r×in, `B` out×r, `s = alpha/r`) the
gradients of `A` and `B` are projections of the (never computed) full-weight gradient `G_W`:
`G_B = s·G_W·Aᵀ` and `G_A = s·Bᵀ·G_W`. The estimate

    Ĝ = G_B·A + B·G_A  (− G_B·G_A with `second_order`)

is the first-order change of `B·A` under one unit SGD step, i.e. `Ĝ = s·(G_W·AᵀA + B·Bᵀ·G_W)`:
the part of `G_W` that LoRA can follow (exactly `s·G_W` when `A` is square and orthogonal and
`B = 0`). The common factor `s` is left in: per-matrix normalisation removes it, and
leaving it keeps the second-order term on the paper's scale. The element importance is the
first-order Taylor estimate of the loss change when the weight is removed,
`I = |Ĝ ⊙ (W0 + s·B·A)|`; a unit's score in one matrix is the sum of `I` over its rows
(or columns), and the vectors of a group's matrices are summed: each L2-normalised first
(`normalisation="matrix"`, the paper), or as they are (`"none"`). Normalising weighs matrices
of different scale equally but gives every matrix's vector unit norm whatever its layer's real
sensitivity, so normalised scores of different layers are not comparable in a global ranking.

No gradient of a base weight is ever created: only the LoRA gradients that training
computes anyway are read, and the transient memory of scoring is a few temporaries the size
of one matrix (matrices are scored one at a time). A k-bit base weight (bitsandbytes
`Linear4bit` / `Linear8bitLt`) is de-quantised by bitsandbytes' own functions (through PEFT's
`dequantize_module_weight`, which imports bitsandbytes only for such a weight) right before its
matrix is scored and freed right after, so at most one de-quantised matrix exists at a time.
"""

from __future__ import annotations

import torch
from peft.tuners.lora import LoraLayer
from peft.utils.integrations import dequantize_module_weight
from torch import nn

from loraprune.errors import LoraPruneError
from loraprune.importance.base import Criterion, normalised_sum, unit_scores
from loraprune.importance.gradients import backward_mean_loss
from loraprune.structure import GroupFamily, unwrap_model

#: how a group's per-matrix unit scores are combined: L2-normalised per matrix (the paper), or summed
NORMALISATIONS = ("none", "matrix")


def estimated_gradient(
    lora_a: torch.Tensor, lora_b: torch.Tensor, grad_a: torch.Tensor, grad_b: torch.Tensor, second_order: bool = False
) -> torch.Tensor:
    """`Ĝ = G_B·A + B·G_A` (`− G_B·G_A` with `second_order`), float32, shape of the base weight.

    Computed in float32 even inside an autocast region (a training loop may score there).
    """
    a, b, g_a, g_b = (t.detach().float() for t in (lora_a, lora_b, grad_a, grad_b))
    with torch.autocast(device_type=a.device.type, enabled=False):
        estimate = g_b @ a
        estimate.addmm_(b, g_a)
        if second_order:
            estimate.addmm_(g_b, g_a, alpha=-1.0)
    return estimate


def element_importance(
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    grad_a: torch.Tensor,
    grad_b: torch.Tensor,
    second_order: bool = False,
) -> torch.Tensor:
    """`|Ĝ ⊙ (W0 + s·B·A)|` for one LoRA-wrapped matrix (float32 also under autocast, two matrix-sized
    temporaries)."""
    importance = estimated_gradient(lora_a, lora_b, grad_a, grad_b, second_order)
    with torch.autocast(device_type=weight.device.type, enabled=False):
        merged = torch.addmm(weight.detach().float(), lora_b.detach().float(), lora_a.detach().float(), alpha=scaling)
    return importance.mul_(merged).abs_()


def lora_layer(model: nn.Module, module: str, adapter: str) -> LoraLayer | None:
    """The PEFT LoRA layer at `module` (a path in the transformers model) carrying `adapter`, or None."""
    layer = unwrap_model(model).get_submodule(module)
    if isinstance(layer, LoraLayer) and adapter in layer.lora_A:
        if layer.use_dora.get(adapter, False):
            raise LoraPruneError(
                f"{module} uses DoRA, whose magnitude vector the LoRA-guided criterion does not "
                "model; create the adapter without use_dora"
            )
        return layer
    return None


def _gradient(param: nn.Parameter) -> torch.Tensor:
    return param.grad if param.grad is not None else torch.zeros_like(param)


class LoraGuidedCriterion(Criterion):
    """LoRAPrune's criterion: `|Ĝ ⊙ W|` with `Ĝ` estimated from the LoRA adapter's gradients.

    Used by the iterative pruner on the gradients of each training step (`gradient_scores`),
    or one-shot on calibration batches (`score`: one backward pass into the LoRA parameters).
    Matrices without a LoRA adapter are left out of their group's sum; a group none of whose
    matrices has one cannot be scored (`check_families` says so before any training).
    """

    name = "lora-guided"
    needs_data = True

    def __init__(
        self, adapter: str = "default", second_order: bool = False, batch_size: int = 4, normalisation: str = "matrix"
    ) -> None:
        if normalisation not in NORMALISATIONS:
            raise LoraPruneError(f"normalisation must be one of {NORMALISATIONS}, got {normalisation!r}")
        self.adapter = adapter
        self.second_order = second_order
        self.batch_size = batch_size
        self.normalisation = normalisation

    def check_families(self, model: nn.Module, families: list[GroupFamily]) -> None:
        """Raise if a family has no LoRA-wrapped matrix (it could never be scored)."""
        for family in families:
            if not any(lora_layer(model, m.module, self.adapter) is not None for m in family.matrices):
                names = ", ".join(m.module.rsplit(".", 1)[-1] for m in family.matrices)
                raise LoraPruneError(
                    f"{family.key} has no LoRA adapter {self.adapter!r} on any of its matrices ({names}); add LoRA "
                    "to them (loraprune.lora.DEFAULT_TARGET_MODULES covers every projection) or exclude that "
                    "kind or layer from pruning"
                )

    @torch.no_grad()
    def gradient_scores(
        self, model: nn.Module, families: list[GroupFamily], loss_scale: float = 1.0
    ) -> dict[str, torch.Tensor]:
        """Scores from the LoRA gradients currently in `.grad` (divided by `loss_scale` first).

        Pass the AMP loss scale when reading gradients a `GradScaler` has not unscaled yet
        (inside `transformers.Trainer` they are always unscaled already). A score vector may
        contain NaN/Inf when the gradients do; the caller decides what to do with it.
        """
        self.check_families(model, families)
        scores = {}
        for family in families:
            per_matrix = []
            for slicing in family.matrices:
                layer = lora_layer(model, slicing.module, self.adapter)
                if layer is None:
                    continue
                lora_a = layer.lora_A[self.adapter].weight
                lora_b = layer.lora_B[self.adapter].weight
                element = element_importance(
                    dequantize_module_weight(layer.get_base_layer()),
                    lora_a,
                    lora_b,
                    layer.scaling[self.adapter],
                    _gradient(lora_a).float() / loss_scale,
                    _gradient(lora_b).float() / loss_scale,
                    self.second_order,
                )
                per_matrix.append(unit_scores(family, slicing, element).cpu())
                del element
            scores[family.key] = (
                normalised_sum(per_matrix) if self.normalisation == "matrix" else torch.stack(per_matrix).sum(0)
            )
        return scores

    def score(
        self, model: nn.Module, families: list[GroupFamily], batches: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """One-shot: gradients of the mean loss over `batches` into the LoRA parameters, then scores.

        The LoRA parameters' `.grad` is cleared before and after; base weights get none.
        """
        if batches is None:
            raise LoraPruneError(
                "the LoRA-guided criterion needs calibration batches (or use gradient_scores "
                "on the gradients of a training step)"
            )
        self.check_families(model, families)
        lora_params = [p for n, p in model.named_parameters() if "lora_" in n and p.requires_grad]
        if not lora_params:
            raise LoraPruneError("the model has no trainable LoRA parameters; wrap it with loraprune.lora.add_lora")
        for param in lora_params:
            param.grad = None
        backward_mean_loss(model, batches, self.batch_size, desc="LoRA-guided scoring")
        try:
            return self.gradient_scores(model, families)
        finally:
            for param in lora_params:
                param.grad = None
