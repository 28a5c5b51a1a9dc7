"""The fused Triton backend (``backend="triton"``).

Two kernels (``kernels.py``) implement SPEC §2-§4 on canonical 2-D rows: the
row pass ``(lse_nt, log w, x, alpha, beta, gamma)`` per row and the backward
pass ``g_i (alpha_i r_ij + beta_i u_j)`` off the target, ``g_i gamma_i`` at it
(label smoothing and NCE/APL have ``beta != 0``; NFL writes its rows
and stats with ``lse`` first and gets ``g_i (alpha_i P_ij + beta_i h(P_ij))`` off
the target, ``P = softmax``: its backward needs ``scheme`` and ``a``, as the C++
op's does); the cross-row step of SPEC §5 is a third kernel (``cross_row.py``,
one program: ``robustloss_fast._finalize.finalize``'s function in one launch),
so a training step is three launches and the bad-target assertion.
``ops.py`` registers them as ``robustloss::triton_rows``,
``robustloss::triton_forward`` (differentiable) and
``robustloss::triton_backward``.

Where it runs: CUDA tensors with Triton on a GPU; CPU tensors under the Triton
interpreter (``TRITON_INTERPRET=1`` set before Triton is imported), which is
how CI checks it without a GPU (Triton 3.9, torch 2.13). On an H200 (Triton
3.6, torch 2.11) its parity tests passed. Accumulation is float32, or float64 for
float64 logits, on both.

``backend="auto"`` on CUDA tensors takes the compiled CUDA extension first
and this backend when the extension was built without CUDA: on an H200 the
extension was faster at three of four shapes (at 16384 x 32000 bf16 this one
was 7% faster), needs no JIT compilation on the first call of each scheme /
dtype / tile, does not depend on the installed Triton version, and issues a
step with less host time at small C (README, "GPU"). CPU tensors never pick
Triton automatically (the interpreter is for testing, orders of magnitude
slower than the C++ CPU kernel).

Tiles (``ops.py``): the row pass reads up to 8192 columns per chunk on up to
8 warps, chosen by timing candidates on an H200
(``benchmarks/triton_tiles.py``); several rows per program when C is small;
the backward's (rows x 4096 columns) tiles on 4 to 8 warps by tile size.
"""

from typing import Optional

import torch

_IMPORT_ERROR: Optional[BaseException] = None
try:
    from . import kernels, ops  # noqa: F401  (importing registers the ops)
except ImportError as exc:  # Triton (or a torch with triton_op / wrap_triton) is missing
    _IMPORT_ERROR = exc

__all__ = ["unavailable_reason", "get", "scale"]


def unavailable_reason(name: str = "triton") -> Optional[str]:
    """None when this backend can run here, else why not."""
    if _IMPORT_ERROR is not None:
        return f"Triton is not importable ({_IMPORT_ERROR})"
    if kernels.INTERPRETED:
        return None
    if not torch.cuda.is_available():
        return (
            "no CUDA device, and the Triton interpreter is off (set TRITON_INTERPRET=1 "
            "before Triton is first imported to run the kernels on CPU tensors)"
        )
    return None


def get(name: str = "triton"):
    """The registry's ``Backend`` record (``robustloss_fast.backends``)."""
    from .. import Backend

    return Backend("triton", ops._loss, ops._rows, ops._finalize, ops._grad, ops._grad_inplace)


def scale(src: torch.Tensor, f: torch.Tensor, out: torch.Tensor) -> None:
    """``out = src * f`` in float32, rounded once to ``out``'s dtype (``scale.py``; ``out`` may be ``src``)."""
    ops.scale_op(src, f, out)
