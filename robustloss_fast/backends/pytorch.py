"""The ``"torch"`` backend: the pure-PyTorch reference (``robustloss_fast/reference.py``).

The one backend that imports the oracle: it runs wherever torch does (the
fallback of ``"auto"`` on devices without fused kernels) and is what every
parity test compares the fused backends against.
"""

from __future__ import annotations

from .. import _finalize, reference
from . import Backend


def unavailable_reason(name: str):
    return None


def _loss(logits, target, spec, weight, sample_weight):
    return reference.ReferenceFunction.apply(logits, target, spec, weight, sample_weight)


# The oracle's ops take the rows' u itself, as the compiled ops do; the spec
# says whether the class weights are that u (label smoothing).
def _rows(logits, target, spec, weight):
    return reference.rows(logits, target, spec, spec.smooth_weight(weight))


def _grad(grad, logits, target, stats, spec, weight):
    return reference.backward(grad, logits, target, stats, spec, spec.smooth_weight(weight))


def _grad_inplace(grad, logits, target, stats, spec, weight):
    # The oracle has no in-place kernel: the same numbers, computed aside (no memory saved).
    logits.copy_(_grad(grad, logits, target, stats, spec, weight))


_BACKEND = Backend("torch", _loss, _rows, _finalize.finalize, _grad, _grad_inplace)


def get(name: str) -> Backend:
    return _BACKEND
