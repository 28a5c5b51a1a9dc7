"""Which backends exist, which work here, and which one "auto" picks.

A backend is a differentiable function of canonical 2-D rows:
``apply(logits, target, kernel_id, a, b, weight, sample_weight, ignore_index,
reduction, normalize) -> value``. No backend imports another; this module is
the only place that knows them all.
"""

from __future__ import annotations

import os
from typing import Callable, List, Optional, Tuple

import torch

from . import _ops, reference

Apply = Callable[..., torch.Tensor]

BACKENDS = ("torch", "cpu", "cuda", "triton")


def _apply_torch(logits, target, kid, a, b, weight, sw, ignore_index, reduction, normalize):
    return reference.ReferenceFunction.apply(logits, target, kid, a, b, weight, sw, ignore_index, reduction, normalize)


def _apply_compiled(logits, target, kid, a, b, weight, sw, ignore_index, reduction, normalize):
    value, _ = torch.ops.robustloss.robust_ce_forward(
        logits, target, kid, a, b, weight, sw, ignore_index, reduction, normalize
    )
    return value


def _triton_module():
    from . import triton as triton_backend  # imported lazily: Triton is optional

    return triton_backend


def _unavailable_reason(name: str) -> Optional[str]:
    """None when backend ``name`` works on this machine, else why not."""
    if name == "torch":
        return None
    if name in ("cpu", "cuda"):
        if _ops.EXT is None:
            return f"the compiled extension robustloss_fast._C failed to import ({_ops.LOAD_ERROR})"
        if name == "cuda":
            if not _ops.has_cuda_kernels():
                return "the extension was built without CUDA (no CUDA torch or nvcc at build time)"
            if not torch.cuda.is_available():
                return "torch.cuda.is_available() is False on this machine"
        return None
    if name == "triton":
        try:
            tb = _triton_module()
        except ImportError as exc:
            return f"Triton is not importable ({exc})"
        return tb.unavailable_reason()
    return f"unknown backend {name!r}; choose one of {('auto',) + BACKENDS}"


def available_backends() -> List[str]:
    """The backends that work on this machine, fastest-first order not implied."""
    return [name for name in BACKENDS if _unavailable_reason(name) is None]


def _devices(name: str) -> Optional[Tuple[str, ...]]:
    if name == "cpu":
        return ("cpu",)
    if name == "cuda":
        return ("cuda",)
    if name == "triton":
        # Under the Triton interpreter, kernels run on CPU tensors too.
        return ("cuda", "cpu") if os.environ.get("TRITON_INTERPRET") == "1" else ("cuda",)
    return None  # the reference runs wherever torch does


def resolve(backend: str, device: torch.device) -> Tuple[str, Apply]:
    """Map a backend name (or "auto") and a device to (name, apply)."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {backend!r}")
    if backend == "auto":
        # CUDA: the compiled extension first, Triton where it was built without
        # CUDA (provisional, see robustloss_fast/triton/__init__.py). Devices
        # without fused kernels (mps, xpu, ...) get the reference.
        order = {"cuda": ("cuda", "triton"), "cpu": ("cpu",)}.get(device.type, ())
        for name in order:
            if _unavailable_reason(name) is None:
                return name, _apply_for(name)
        return "torch", _apply_torch
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {('auto',) + BACKENDS}")
    reason = _unavailable_reason(backend)
    if reason is not None:
        raise RuntimeError(f"backend {backend!r} is not available: {reason}")
    devices = _devices(backend)
    if devices is not None and device.type not in devices:
        raise ValueError(
            f"backend {backend!r} runs on {'/'.join(devices)} tensors, but the input is on {device}"
        )
    return backend, _apply_for(backend)


def _apply_for(name: str) -> Apply:
    if name == "torch":
        return _apply_torch
    if name == "triton":
        return _triton_module().apply
    return _apply_compiled

