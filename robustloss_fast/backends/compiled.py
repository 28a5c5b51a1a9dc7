"""The compiled backends ``"cpu"`` and ``"cuda"``: the C++ / CUDA extension's ops.

The C++ library ``robustloss`` defines (csrc/ops.cpp; spec §9):

``robust_ce_forward(logits, target, scheme, a, b, weight?, sample_weight?,
ignore_index, reduction, normalize) -> (value, stats)``
    the fused forward: row statistics, emphasis, cross-row normaliser D and
    the reduced value; ``stats`` (N, 5) = (m, ls, alpha, beta, gamma) per row,
    ``lse_nt = m + ls`` kept as its two parts (spec §2.2).
``robust_ce_backward(grad, logits, target, stats, smooth_weight?, ignore_index, scheme, a) -> grad_logits``
    one pass over the logits writing ``g (alpha r_j + beta u_j)`` off the
    target and ``g gamma`` at it (``u = smooth_weight``, 1 when None);
    ``scheme``/``a`` are the forward's: NFL's stats are in P-form,
    ``g (alpha P_j + beta h(P_j))``.
``robust_ce_backward_(logits, grad, target, stats, smooth_weight?, ignore_index, scheme, a) -> ()``
    the same, written over ``logits`` (which must be contiguous).
``robust_ce_finalize(rows, target, weight?, sample_weight?, ignore_index, reduction, normalize, weight_in_rows) -> (value, stats, log_den)``
    the cross-row step alone on rows from ``robust_ce_rows`` (the forward op's
    own, in C++ / two CUDA kernels), with ``log D`` of derivative normalisation.
``robust_ce_rows(logits, target, scheme, a, b, smooth_weight?, ignore_index, normalised) -> rows``
    the row pass alone: (N, 7) = (m, ls, log w, x, alpha, beta, gamma) per
    row, for callers that combine rows from several calls before normalising
    (chunked or distributed batches).

Autograd is registered in C++ (the Autograd key, csrc/ops.cpp), so every
device shares one backward rule; only the fake (meta) kernels live here.
This module is the only place that unpacks a ``KernelSpec`` into these schemas.
"""

from __future__ import annotations

from typing import Optional

import torch

from .._common import ROW_COLS, STAT_COLS, KernelSpec, acc_dtype
from . import Backend

EXT = None
LOAD_ERROR = None
try:  # the extension is optional at import time: the "torch" backend always works
    from .. import _C as EXT  # noqa: F401  (importing registers the ops)
except ImportError as exc:  # pragma: no cover - exercised only on broken installs
    LOAD_ERROR = exc

#: Whether the extension was built with its CUDA sources. Read once, here: a call
#: into the extension while torch.compile traces would break the graph.
BUILT_WITH_CUDA = EXT is not None and bool(EXT.built_with_cuda())


def unavailable_reason(name: str) -> Optional[str]:
    if EXT is None:
        return f"the compiled extension robustloss_fast._C failed to import ({LOAD_ERROR})"
    if name == "cuda":
        if not BUILT_WITH_CUDA:
            return "the extension was built without CUDA (no CUDA torch or nvcc at build time)"
        if not torch.cuda.is_available():
            return "torch.cuda.is_available() is False on this machine"
    return None


def _loss(logits, target, spec: KernelSpec, weight, sample_weight):
    value, _ = torch.ops.robustloss.robust_ce_forward(
        logits, target, int(spec.kernel), spec.a, spec.b, weight, sample_weight,
        spec.ignore_index, int(spec.reduction), spec.normalize,
    )  # fmt: skip
    return value


def _rows(logits, target, spec: KernelSpec, weight):
    return torch.ops.robustloss.robust_ce_rows(
        logits, target, int(spec.kernel), spec.a, spec.b, spec.smooth_weight(weight), spec.ignore_index, spec.normalised
    )


def _grad(grad, logits, target, stats, spec: KernelSpec, weight):
    return torch.ops.robustloss.robust_ce_backward(
        grad, logits, target, stats, spec.smooth_weight(weight), spec.ignore_index, int(spec.kernel), spec.a
    )


def _grad_inplace(grad, logits, target, stats, spec: KernelSpec, weight):
    torch.ops.robustloss.robust_ce_backward_(
        logits, grad, target, stats, spec.smooth_weight(weight), spec.ignore_index, int(spec.kernel), spec.a
    )


def _finalize(rows, target, spec: KernelSpec, weight, sample_weight, *, log_denominator=False):
    if log_denominator and not spec.normalised:
        raise ValueError("log_denominator is defined for derivative-normalised specs only")
    value, stats, log_den = torch.ops.robustloss.robust_ce_finalize(
        rows, target, weight, sample_weight, spec.ignore_index, int(spec.reduction), spec.normalize,
        spec.weight_in_rows,
    )  # fmt: skip
    return (value, stats, log_den) if log_denominator else (value, stats)


_BACKENDS = {name: Backend(name, _loss, _rows, _finalize, _grad, _grad_inplace) for name in ("cpu", "cuda")}


def get(name: str) -> Backend:
    return _BACKENDS[name]


if EXT is not None:
    _lib = "robustloss"

    @torch.library.register_fake(f"{_lib}::robust_ce_forward")
    def _forward_fake(logits, target, scheme, a, b, weight, sample_weight, ignore_index, reduction, normalize):
        acc = acc_dtype(logits.dtype)
        n = logits.shape[0]
        value = logits.new_empty((n,) if reduction == 0 else (), dtype=acc)
        stats = logits.new_empty((n, STAT_COLS), dtype=acc)
        return value, stats

    @torch.library.register_fake(f"{_lib}::robust_ce_backward")
    def _backward_fake(grad, logits, target, stats, smooth_weight, ignore_index, scheme, a):
        return torch.empty_like(logits, memory_format=torch.contiguous_format)

    @torch.library.register_fake(f"{_lib}::robust_ce_backward_")
    def _backward_inplace_fake(logits, grad, target, stats, smooth_weight, ignore_index, scheme, a):
        return None

    @torch.library.register_fake(f"{_lib}::robust_ce_finalize")
    def _finalize_fake(rows, target, weight, sample_weight, ignore_index, reduction, normalize, weight_in_rows):
        n = rows.shape[0]
        value = rows.new_empty((n,) if reduction == 0 else ())
        return value, rows.new_empty((n, STAT_COLS)), rows.new_empty(())

    @torch.library.register_fake(f"{_lib}::robust_ce_rows")
    def _rows_fake(logits, target, scheme, a, b, smooth_weight, ignore_index, normalised):
        return logits.new_empty((logits.shape[0], ROW_COLS), dtype=acc_dtype(logits.dtype))
