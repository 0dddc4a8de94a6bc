"""Run a 2:4 model on sparse tensor cores through `torch.sparse.to_sparse_semi_structured`.

PyTorch stores a 2:4 weight compressed (the kept values plus 2-bit indices) and multiplies
it with cuSPARSELt or CUTLASS kernels. It needs a CUDA GPU with sparse tensor cores (Ampere
or later), half-precision weights (float16 / bfloat16), and weight shapes that are multiples
of the kernels' tiles (e.g. rows of 32 and columns of 64 for CUTLASS); inputs are padded as
needed. Only the 2:4 pattern exists in hardware: 4:8 models keep the zeros but gain no speed.
"""

from __future__ import annotations

import torch
from torch import nn

from loraprune.errors import LoraPruneError
from loraprune.semi_structured.pattern import NMPattern, pattern_violations
from loraprune.semi_structured.targets import base_linear

TWO_FOUR = NMPattern(2, 4)


#: "auto": PyTorch's choice (cuSPARSELt where it is built in, else CUTLASS), or one of the two
BACKENDS = ("auto", "cusparselt", "cutlass")


def to_semi_structured(model: nn.Module, modules: list[str], backend: str = "auto") -> str:
    """Replace the 2:4 weights of `modules` (in place, for inference) by semi-structured sparse tensors.

    Returns the name of the sparse tensor class used (its backend). Raises before touching
    any weight if there is no CUDA device, a weight is not on it in float16/bfloat16, or a
    weight does not hold the 2:4 pattern exactly.
    """
    if backend not in BACKENDS:
        raise LoraPruneError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if not torch.cuda.is_available():
        raise LoraPruneError("semi-structured sparse kernels need a CUDA GPU (Ampere or later); none is available")
    from torch.sparse import (
        SparseSemiStructuredTensorCUSPARSELT,
        SparseSemiStructuredTensorCUTLASS,
        to_sparse_semi_structured,
    )

    convert = {
        "auto": to_sparse_semi_structured,
        "cusparselt": SparseSemiStructuredTensorCUSPARSELT.from_dense,
        "cutlass": SparseSemiStructuredTensorCUTLASS.from_dense,
    }[backend]

    linears = {name: base_linear(model, name) for name in modules}
    for name, linear in linears.items():
        weight = linear.weight
        if weight.device.type != "cuda" or weight.dtype not in (torch.float16, torch.bfloat16):
            raise LoraPruneError(
                f"{name}'s weight is {weight.dtype} on {weight.device}; move the model to CUDA "
                "in float16 or bfloat16 first"
            )
        if pattern_violations(weight, TWO_FOUR):
            raise LoraPruneError(f"{name}'s weight does not hold the 2:4 pattern")
    backend = ""
    for linear in linears.values():
        sparse = convert(linear.weight.detach())
        linear.weight = nn.Parameter(sparse, requires_grad=False)
        backend = type(sparse).__name__
    return backend
