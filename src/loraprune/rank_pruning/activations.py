"""Input statistics of the LoRA rank components, for the activation-based criteria (`wanda`, `sparsegpt`).

Both criteria need, per module, only the Gram matrix of the component activations `z = A·x`
over the module's inputs `x`:

    E[z·zᵀ] = A·E[x·xᵀ]·Aᵀ        (r0 × r0)

instead of the input curvature `E[x·xᵀ]` itself (`in_features²` per module: 1536² floats for a
`down_proj` of SmolLM2, hundreds of MB over its 210 LoRA modules). `z` is the output of the
`lora_A` linear, so a forward hook on it reads `z` for free and adds one `r0 × r0` product per
module and forward pass. Consequences, by design:

* `A` trains while the statistics accumulate: the window's Gram is the mean of `z·zᵀ` computed
  with the `A` of each step, not `A_now·E[x·xᵀ]·A_nowᵀ`. Over a window of `prune_every` steps
  the difference is second order in the learning rate; the exact form would need `E[x·xᵀ]`.
* `x` is the input after LoRA dropout (what `A` sees while training); with dropout `p` the
  diagonal of `E[x·xᵀ]` is inflated by the inverted-dropout factor `1/(1−p)`.
* Only forward passes in training mode count (evaluation inside training is left out). Padding
  positions count like tokens. A forward pass recomputed by gradient checkpointing counts twice,
  which leaves the mean unchanged (its rows count twice too).

Per optimizer step the Grams of all micro-batches go into a step buffer; `commit` (from
`RankPruner.observe_gradients`) checks it for non-finite values (one synchronisation per step)
and adds it to the window, or, for `curvature="batch"`, makes it the window. Under data
parallelism every process sees its own inputs, so `means` sums the windows over processes: every
rank then takes the decisions of the global batch, which FSDP2 needs (each rank writes the
recovery update into its own shards of `B`).
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
from torch import Tensor, nn

from loraprune.distributed import is_distributed
from loraprune.rank_pruning.state import LoraModule

logger = logging.getLogger(__name__)


class ActivationStats:
    """Sums of `z·zᵀ` (`z = A·x`, `r0`-wide) and of input rows for every module since the last reset."""

    def __init__(self, modules: list[LoraModule], r0: int) -> None:
        device = modules[0].lora_b.device
        self.gram = torch.zeros(len(modules), r0, r0, device=device)
        self.rows = torch.zeros(len(modules), dtype=torch.float64, device=device)
        self._step_gram = torch.zeros_like(self.gram)
        self._step_rows = [0] * len(modules)
        self._hooks = [
            module.layer.lora_A[module.adapter].register_forward_hook(self._make_hook(index))
            for index, module in enumerate(modules)
        ]

    def _make_hook(self, index: int):
        @torch.no_grad()
        def add_activations(module: nn.Module, _args: tuple, output: Tensor) -> None:
            if not module.training:
                return
            z = output.detach().reshape(-1, output.shape[-1]).float()
            self._step_gram[index] += (z.T @ z).to(self._step_gram.device)
            self._step_rows[index] += z.shape[0]

        return add_activations

    @torch.no_grad()
    def commit(self, replace: bool = False) -> bool:
        """End an optimizer step: add its statistics to the window (`replace`: they become the window).

        Returns False, and adds nothing, if the step's Gram is not finite.
        """
        finite = bool(torch.isfinite(self._step_gram).all())
        if replace:
            self.reset()
        if finite:
            self.gram += self._step_gram
            self.rows += torch.tensor(self._step_rows, dtype=self.rows.dtype, device=self.rows.device)
        self._step_gram.zero_()
        self._step_rows = [0] * len(self._step_rows)
        return finite

    def reset(self) -> None:
        """Forget the window (a new one starts)."""
        self.gram.zero_()
        self.rows.zero_()

    @torch.no_grad()
    def means(self) -> tuple[Tensor, Tensor]:
        """Mean `E[z·zᵀ]` of every module over the window (all processes), and which modules saw inputs.

        A collective under data parallelism: every process must call it. Modules without inputs
        get a zero matrix (and False).
        """
        gram, rows = self.gram.clone(), self.rows.clone()
        if is_distributed():
            dist.all_reduce(gram)
            dist.all_reduce(rows)
        seen = rows > 0
        return gram / rows.clamp_min(1).to(gram.dtype)[:, None, None], seen

    def remove_hooks(self) -> None:
        """Stop reading the inputs (once pruning is over)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
