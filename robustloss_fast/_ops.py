"""Load the compiled extension and give its ops fake kernels and autograd.

The C++ library ``robustloss`` defines (csrc/ops.cpp):

``robust_ce_forward(logits, target, scheme, a, b, weight?, sample_weight?,
ignore_index, reduction, normalize) -> (value, stats)``
    the fused forward: row statistics, emphasis, cross-row normaliser D and
    the reduced value; ``stats`` (N, 4) = (lse_nt, alpha, beta, gamma) per row.
``robust_ce_backward(grad, logits, target, stats, smooth_weight?, ignore_index, scheme, a) -> grad_logits``
    one pass over the logits writing ``g (alpha r_j + beta u_j)`` off the
    target and ``g gamma`` at it (``u = smooth_weight``, 1 when None);
    ``scheme``/``a`` are the forward's: NFL's stats are in P-form,
    ``g (alpha P_j + beta h(P_j))`` (docs/math.md).
``robust_ce_rows(logits, target, scheme, a, b, smooth_weight?, ignore_index, normalised) -> rows``
    the row pass alone: (N, 6) = (lse_nt, log w, x, alpha, beta, gamma) per
    row, for callers that combine rows from several calls before normalising
    (chunked or distributed batches).

Autograd is registered in C++ (csrc/ops.cpp, the Autograd key), so every
device shares one backward rule; only the fake (meta) kernels live here.
"""

from __future__ import annotations

import torch

EXT = None
LOAD_ERROR = None
try:  # the extension is optional at import time: the "torch" backend always works
    from . import _C as EXT  # noqa: F401  (importing registers the ops)
except ImportError as exc:  # pragma: no cover - exercised only on broken installs
    LOAD_ERROR = exc


def has_cuda_kernels() -> bool:
    """True when the extension was built with its CUDA sources."""
    return EXT is not None and bool(EXT.built_with_cuda())


if EXT is not None:
    _lib = "robustloss"

    @torch.library.register_fake(f"{_lib}::robust_ce_forward")
    def _forward_fake(logits, target, scheme, a, b, weight, sample_weight, ignore_index, reduction, normalize):
        acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
        n = logits.shape[0]
        value = logits.new_empty((n,) if reduction == 0 else (), dtype=acc)
        stats = logits.new_empty((n, 4), dtype=acc)
        return value, stats

    @torch.library.register_fake(f"{_lib}::robust_ce_backward")
    def _backward_fake(grad, logits, target, stats, smooth_weight, ignore_index, scheme, a):
        return torch.empty_like(logits, memory_format=torch.contiguous_format)

    @torch.library.register_fake(f"{_lib}::robust_ce_rows")
    def _rows_fake(logits, target, scheme, a, b, smooth_weight, ignore_index, normalised):
        acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
        return logits.new_empty((logits.shape[0], 6), dtype=acc)
