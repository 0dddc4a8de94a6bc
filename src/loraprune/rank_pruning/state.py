"""Per-module state of PrunedLoRA: the LoRA modules, their component masks, their curvature statistics.

Masks enforce "no reactivation" three ways: pruned components are masked in the forward pass
(a pre-hook on `lora_B` multiplies its `r0`-wide input by the mask), their gradients are
zeroed before the optimizer step, and their optimizer moments are zeroed when they are pruned.
With their weights also zero, AdamW (with or without weight decay) leaves them exactly zero.

Curvature statistics are the gradient Gram matrices `G_Bᵀ·G_B` and `G_A·G_Aᵀ` (`r0 × r0` per
module) and the gradient sums, accumulated once per optimizer step: `O(n·r0²)` per module,
small next to the forward and backward passes. `CurvatureStats.divisors` turns the sums into
a curvature on the loss's own scale (derived there).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from torch import Tensor, nn

from loraprune.distributed import full_tensor, index_fill_
from loraprune.errors import LoraPruneError
from loraprune.rank_pruning.basis import BasisChange


@dataclass
class LoraModule:
    """One LoRA-wrapped linear layer; `name` is its path inside the base model."""

    name: str
    layer: LoraLayer
    adapter: str

    @property
    def lora_a(self) -> nn.Parameter:
        """`A`, shape `(r, in_features)`."""
        return self.layer.lora_A[self.adapter].weight

    @property
    def lora_b(self) -> nn.Parameter:
        """`B`, shape `(out_features, r)`."""
        return self.layer.lora_B[self.adapter].weight


def find_lora_modules(model: PeftModel, adapter: str = "default") -> list[LoraModule]:
    """The LoRA linear layers of adapter `adapter`, in module order."""
    base = model.base_model.model if isinstance(model, PeftModel) else model
    modules = [
        LoraModule(name, module, adapter)
        for name, module in base.named_modules()
        if isinstance(module, LoraLayer) and adapter in getattr(module, "lora_A", {})
    ]
    if not modules:
        raise LoraPruneError(
            f"the model has no LoRA linear layers for adapter {adapter!r}; wrap it with "
            "loraprune.lora.add_lora(model, r0) first"
        )
    for module in modules:
        if module.layer.use_dora.get(adapter, False):
            raise LoraPruneError(
                f"{module.name} uses DoRA, whose magnitude vector PrunedLoRA does not prune; "
                "create the adapter without use_dora"
            )
    return modules


class RankMasks:
    """Which rank components of every module are still active, enforced in forward, grads and moments."""

    def __init__(self, modules: list[LoraModule], r0: int) -> None:
        self.modules = modules
        device = modules[0].lora_b.device
        self.active = torch.ones(len(modules), r0, dtype=torch.bool, device=device)
        self._hooks = [
            module.layer.lora_B[module.adapter].register_forward_pre_hook(self._make_hook(index))
            for index, module in enumerate(modules)
        ]

    def _make_hook(self, index: int):
        def mask_input(_module: nn.Module, args: tuple) -> tuple:
            x = args[0]
            return (x * self.active[index].to(device=x.device, dtype=x.dtype), *args[1:])

        return mask_input

    def ranks(self) -> list[int]:
        """Current rank (number of active components) of every module."""
        return self.active.sum(1).tolist()

    def active_indices(self, index: int) -> Tensor:
        """Indices of the active components of module `index`."""
        return torch.nonzero(self.active[index]).flatten()

    @torch.no_grad()
    def zero_gradients(self) -> None:
        """Zero the gradient slices of pruned components (call before the optimizer step)."""
        for index, module in enumerate(self.modules):
            pruned = torch.nonzero(~self.active[index]).flatten()
            if pruned.numel() == 0:
                continue
            for param, dim in ((module.lora_a, 0), (module.lora_b, 1)):
                if param.grad is not None:
                    index_fill_(param.grad, dim, pruned, 0.0)

    @torch.no_grad()
    def prune(self, index: int, components: Tensor, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Mark `components` of module `index` pruned, zero their weights and optimizer state slices.

        Every optimizer state tensor shaped like the parameter (Adam's `exp_avg` and
        `exp_avg_sq`, SGD's momentum) is zeroed on the pruned slices; the state of the
        remaining (compensated) components is kept as it is.
        """
        module = self.modules[index]
        self.active[index, components.to(self.active.device)] = False
        for param, dim in ((module.lora_a, 0), (module.lora_b, 1)):
            index_fill_(param, dim, components, 0.0)
            state = optimizer.state.get(param, {}) if optimizer is not None else {}
            for value in state.values():
                if isinstance(value, Tensor) and value.shape == param.shape:
                    index_fill_(value, dim, components, 0.0)

    def remove_hooks(self) -> None:
        """Detach the forward masks (the pruned weights stay zero, so outputs do not change)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []


class CurvatureStats:
    """Sums of gradient Gram matrices and gradients of every module since the last reset.

    **The curvature on the loss's own scale** (`divisors(form="fisher")`). Each optimizer step
    minimises the mean loss `L = (1/N)·Σ_n ℓ_n` over its `N` examples; its Hessian is approximated
    by the empirical Fisher of that mean, `F = E_n[vec(G_n)·vec(G_n)ᵀ]` with `G_n = ∇ℓ_n` the
    per-example gradient: an average over examples, not a sum, so it does not grow with the batch.
    Only the step's mean gradient `Ḡ = (1/N)·Σ_n G_n` is seen (one micro-batch of `N` examples
    per step). For independent examples `E[vec(Ḡ)·vec(Ḡ)ᵀ] = μμᵀ + Σ/N` while `F = μμᵀ + Σ`
    (`μ`, `Σ`: mean and covariance of `G_n`), so `N·E[vec(Ḡ)·vec(Ḡ)ᵀ] = F + (N − 1)·μμᵀ ≈ F`
    where the gradient noise dominates its mean (mini-batch training; exact for `N = 1`). Over
    the `S` steps of a window, `F̂ = (N/S)·Σ_s vec(Ḡ_s)·vec(Ḡ_s)ᵀ`.

    `obs.py` shares one `r × r` curvature across the rows of `B` (`out` of them): the block of
    row `i` is `F_i = E[g_niᵀ·g_ni]`, and the shared one is their mean,
    `H_B = (1/out)·Σ_i F_i ≈ (N / (S·out))·Σ_s Ḡ_Bsᵀ·Ḡ_Bs`, and likewise
    `H_A ≈ (N / (S·in))·Σ_s Ḡ_As·Ḡ_Asᵀ` across the `in` columns of `A`. With it,
    `½·Δ·H·Δᵀ` summed over rows is a loss change in nats, on the scale of the gradient term.
    The `gram` form, `(1/S)·Σ_s Ḡ_sᵀ·Ḡ_s` (design §1.2 as first written), is that curvature
    times `rows / N`: its weight against the gradient term depends on the batch size and the
    module's width, which `gram` is kept to reproduce.
    """

    def __init__(self, modules: list[LoraModule], r0: int, keep_gradients: bool, keep_grams: bool = True) -> None:
        self.modules = modules
        device = modules[0].lora_b.device
        # criteria without a curvature (all but obs) hold no Gram sums: (m, r0, r0) twice is
        # 440 MB at r0 = 512 on SmolLM2
        size = r0 if keep_grams else 0
        self.gram_a = torch.zeros(len(modules), size, size, device=device)
        self.gram_b = torch.zeros(len(modules), size, size, device=device)
        self.keep_grams = keep_grams
        self.keep_gradients = keep_gradients
        self.grad_a: list[Tensor] = []
        self.grad_b: list[Tensor] = []
        self.count = 0

    @property
    def nbytes(self) -> int:
        """Memory the statistics hold: the two `(m, r0, r0)` Gram sums and, when kept, the gradient sums
        (one more copy of the adapter's size): what PrunedLoRA adds to a LoRA run at `r0`."""
        grams = self.gram_a.numel() * self.gram_a.element_size() + self.gram_b.numel() * self.gram_b.element_size()
        if not self.keep_gradients:
            return grams
        adapter = sum(m.lora_a.numel() + m.lora_b.numel() for m in self.modules)
        return grams + adapter * self.gram_a.element_size()

    def divisors(self, side: str, form: str, examples_per_step: int) -> Tensor:
        """What each module's Gram sum (`side` "a" or "b") is divided by to give its curvature, shape `(m,)`.

        `gram`: the step count `S`; `fisher`: `S·rows / N` with `rows` the rows sharing the
        curvature (`out_features` of `B`, `in_features` of `A`) and `N = examples_per_step`.
        """
        count = float(max(self.count, 1))
        if form == "gram":
            return torch.full((len(self.modules),), count, dtype=torch.float64, device=self.gram_a.device)
        axis = 0 if side == "b" else 1
        rows = [(m.lora_b if side == "b" else m.lora_a).shape[axis] for m in self.modules]
        return torch.tensor(rows, dtype=torch.float64, device=self.gram_a.device) * count / examples_per_step

    def reset(self) -> None:
        """Forget everything accumulated (a new window starts)."""
        self.gram_a.zero_()
        self.gram_b.zero_()
        self.grad_a, self.grad_b = [], []
        self.count = 0

    @torch.no_grad()
    def rotate(self, index: int, active: Tensor, change: BasisChange) -> None:
        """Express module `index`'s statistics of its `active` components in the basis of `change`."""
        if self.keep_grams:
            block = torch.meshgrid(active, active, indexing="ij")
            self.gram_b[index][block] = change.gram_b(self.gram_b[index][block])
            self.gram_a[index][block] = change.gram_a(self.gram_a[index][block])
        if self.grad_b:
            self.grad_b[index][:, active] = change.gradient_b(self.grad_b[index][:, active])
            self.grad_a[index][active] = change.gradient_a(self.grad_a[index][active])

    @torch.no_grad()
    def accumulate(self) -> bool:
        """Add the current gradients; returns False (and adds nothing) if a gradient is not finite.

        Statistics that keep neither Grams nor gradients (criteria that read no gradient) do nothing.
        """
        if not (self.keep_grams or self.keep_gradients):
            return True
        gram_a = torch.zeros_like(self.gram_a)
        gram_b = torch.zeros_like(self.gram_b)
        grads = []
        for index, module in enumerate(self.modules):
            g_a = _grad(module.lora_a)
            g_b = _grad(module.lora_b)
            if self.keep_grams:
                torch.mm(g_a, g_a.T, out=gram_a[index])
                torch.mm(g_b.T, g_b, out=gram_b[index])
            grads.append((g_a, g_b))
        if self.keep_grams:  # a Gram is finite only if its gradient is: one check instead of two
            finite = bool(torch.isfinite(gram_a).all() and torch.isfinite(gram_b).all())
        else:
            finite = all(bool(torch.isfinite(g_a).all() and torch.isfinite(g_b).all()) for g_a, g_b in grads)
        if not finite:
            return False
        self.gram_a += gram_a
        self.gram_b += gram_b
        if self.keep_gradients:
            if not self.grad_a:
                self.grad_a = [g_a.clone() for g_a, _ in grads]
                self.grad_b = [g_b.clone() for _, g_b in grads]
            else:
                for total_a, total_b, (g_a, g_b) in zip(self.grad_a, self.grad_b, grads):
                    total_a += g_a
                    total_b += g_b
        self.count += 1
        return True


def _grad(param: nn.Parameter) -> Tensor:
    """The whole gradient of `param` in float32 (zeros when it received none; gathered when sharded)."""
    if param.grad is None:
        return torch.zeros(param.shape, dtype=torch.float32, device=param.device)
    return full_tensor(param.grad.detach()).float()
