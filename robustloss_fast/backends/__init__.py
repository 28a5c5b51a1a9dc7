"""The backend registry: which backends exist, which work here, and which one "auto" picks.

Every path that computes the loss -- ``robust_cross_entropy``, the fused
linear layer, the distributed paths, the analysis helpers -- looks a backend
up here and calls it through one interface, a ``Backend``:

``loss(logits, target, spec, weight, sample_weight) -> value``
    the differentiable loss on canonical rows ``(N, C)`` (spec §5 reduction
    included), its gradient the spec §3 one;
``rows(logits, target, spec, weight) -> rows``
    the row pass alone, ``(N, 7) = (m, ls, log w, x, alpha, beta, gamma)``
    (spec §9), for callers that combine rows of several calls (chunks, shards)
    before the cross-row step ``robustloss_fast._finalize.finalize``;
``finalize(rows, target, spec, weight, sample_weight, *, log_denominator=False) -> (value, stats[, log D])``
    the cross-row step of SPEC §5 on rows from ``rows`` (``_finalize.finalize``'s
    contract; the Triton backend runs it as one kernel, the others as tensor ops);
``grad(grad, logits, target, stats, spec, weight) -> grad_logits``
    the gradient pass from the per-row ``stats (N, 5) = (m, ls, alpha, beta, gamma)``;
``grad_inplace(grad, logits, target, stats, spec, weight) -> None``
    the same gradient written over ``logits`` (contiguous), for
    ``inplace_backward=True``: no ``N x C`` buffer is allocated (the fused
    kernels read each logit before writing its gradient, in place; the
    reference computes it aside and copies it in).

Beside the five, ``fused_scale(device)`` hands out a kernel for ``out = src *
f`` rounded once (the fused linear layer's stored gradients) where a backend
has one for that device: the Triton backend's, on CUDA.

``spec`` is the call's ``KernelSpec`` (``robustloss_fast._common``); ``weight``
is the class-weight vector, which each backend routes into the rows where the
spec says so (label smoothing). Backends live in their own modules and import
neither each other nor the oracle (``reference.py``), except the ``"torch"``
backend, which *is* the oracle behind this interface.

Availability is decided without calling into the compiled extension at trace
time: the extension's facts are read once when it is imported
(``compiled.BUILT_WITH_CUDA``), so ``torch.compile(fullgraph=True)`` traces
``resolve`` for every backend and device.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import torch

__all__ = ["Backend", "NAMES", "resolve", "get", "devices", "unavailable_reason", "available_backends", "fused_scale"]

#: Every backend, in the order ``available_backends`` lists them.
NAMES = ("torch", "cpu", "cuda", "triton")

#: What ``backend="auto"`` tries, per device type, first that works. CUDA: the
#: compiled extension first (no JIT compilation on the first call of each
#: scheme, dtype and tile), Triton where the extension was built without CUDA.
#: Other devices (mps, xpu, ...) get the reference.
AUTO_ORDER = {"cpu": ("cpu",), "cuda": ("cuda", "triton")}


@dataclass(frozen=True)
class Backend:
    """One backend's five entry points (see the module docstring)."""

    name: str
    loss: Callable[..., torch.Tensor]
    rows: Callable[..., torch.Tensor]
    finalize: Callable[..., tuple]
    grad: Callable[..., torch.Tensor]
    grad_inplace: Callable[..., None]


# Each backend's module is imported on first use (Triton is optional and slow
# to import). Dynamo executes these imports while tracing, so they are safe
# inside torch.compile.
def _module(name: str):
    module = _MODULES.get(name)
    if module is None:  # remembered: the import machinery costs microseconds on every loss call
        if name == "torch":
            from . import pytorch as module
        elif name in ("cpu", "cuda"):
            from . import compiled as module
        else:
            from . import triton as module
        _MODULES[name] = module
    return module


_MODULES: dict = {}


def unavailable_reason(name: str) -> Optional[str]:
    """None when backend ``name`` works on this machine, else why not."""
    if name not in NAMES:
        return f"unknown backend {name!r}; choose one of {('auto',) + NAMES}"
    try:
        module = _module(name)
    except ImportError as exc:  # the Triton backend without Triton
        return f"{name} backend cannot be imported ({exc})"
    return module.unavailable_reason(name)


def available_backends() -> List[str]:
    """The backends that work on this machine (no speed order implied)."""
    return [name for name in NAMES if unavailable_reason(name) is None]


def get(name: str) -> Backend:
    """Backend ``name`` (which must be available; see ``unavailable_reason``)."""
    return _module(name).get(name)


def devices(name: str) -> Optional[Tuple[str, ...]]:
    """The device types whose tensors backend ``name`` takes (None: wherever torch runs)."""
    if name == "triton" and os.environ.get("TRITON_INTERPRET") == "1":
        return ("cuda", "cpu")  # under the Triton interpreter the kernels run on CPU tensors too
    return {"cpu": ("cpu",), "cuda": ("cuda",), "triton": ("cuda",)}.get(name)


def fused_scale(device: torch.device) -> Optional[Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]]:
    """A kernel for ``out = src * f`` in float32, rounded once, on ``device``'s tensors; None where there is none.

    The fused linear layer scales its stored gradients with it on a GPU, where
    ATen's own mixed-dtype product runs at a fifth of the copy rate (the
    Triton backend's ``scale.py``; the only backend with such a kernel).
    """
    types = devices("triton")
    if device.type not in types or unavailable_reason("triton") is not None:
        return None
    return _module("triton").scale


def resolve(backend: str, device: torch.device) -> Backend:
    """The backend for name ``backend`` (or ``"auto"``) and tensors on ``device``, with clear errors."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {backend!r}")
    if backend == "auto":
        for name in AUTO_ORDER.get(device.type, ()):
            if unavailable_reason(name) is None:
                return get(name)
        return get("torch")
    if backend not in NAMES:
        raise ValueError(f"unknown backend {backend!r}; choose one of {('auto',) + NAMES}")
    reason = unavailable_reason(backend)
    if reason is not None:
        raise RuntimeError(f"backend {backend!r} is not available: {reason}")
    types = devices(backend)
    if types is not None and device.type not in types:
        raise ValueError(f"backend {backend!r} runs on {'/'.join(types)} tensors, but the input is on {device}")
    return get(backend)


# The compiled extension loads with the package, as torch's own ops do: its ops
# (torch.ops.robustloss.*) are registered and its build facts read before any
# call can be traced. Triton stays lazy (optional, and slow to import).
from . import compiled  # noqa: E402,F401
