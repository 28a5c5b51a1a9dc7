"""``nn.Module`` wrappers mirroring ``torch.nn.CrossEntropyLoss``."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .functional import kernel_spec, robust_cross_entropy
from .schemes import DM, IMAE, Scheme

__all__ = ["RobustCrossEntropyLoss", "DMLoss", "IMAELoss"]


class RobustCrossEntropyLoss(nn.Module):
    """Drop-in for ``nn.CrossEntropyLoss`` with the emphasis of ``scheme``.

    ``weight`` is a registered buffer (it follows ``.to()`` and ``state_dict``),
    as in ``nn.CrossEntropyLoss``. ``forward(input, target, sample_weight=None)``
    calls :func:`robustloss_fast.robust_cross_entropy`; see it for the math.
    ``process_group``, ``vocab_parallel`` and ``class_offset`` are passed through
    (distributed training: :mod:`robustloss_fast.distributed`), as is
    ``inplace_backward`` (the gradient written over the logits).
    """

    def __init__(
        self,
        scheme: Scheme,
        weight: Optional[torch.Tensor] = None,
        ignore_index: int = -100,
        reduction: str = "mean",
        normalize: Optional[bool] = None,
        label_smoothing: float = 0.0,
        backend: str = "auto",
        process_group=None,
        vocab_parallel: bool = False,
        class_offset: Optional[int] = None,
        inplace_backward: bool = False,
    ):
        super().__init__()
        kernel_spec(scheme, reduction, normalize, ignore_index, label_smoothing)  # fail at construction
        self.scheme = scheme
        self.register_buffer("weight", weight)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.normalize = normalize
        self.label_smoothing = label_smoothing
        self.backend = backend
        self.process_group = process_group
        self.vocab_parallel = vocab_parallel
        self.class_offset = class_offset
        self.inplace_backward = inplace_backward

    def forward(self, input: torch.Tensor, target: torch.Tensor, sample_weight: Optional[torch.Tensor] = None):
        return robust_cross_entropy(
            input,
            target,
            self.scheme,
            weight=self.weight,
            sample_weight=sample_weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            normalize=self.normalize,
            label_smoothing=self.label_smoothing,
            backend=self.backend,
            process_group=self.process_group,
            vocab_parallel=self.vocab_parallel,
            class_offset=self.class_offset,
            inplace_backward=self.inplace_backward,
        )

    def extra_repr(self) -> str:
        extra = f", label_smoothing={self.label_smoothing}" if self.label_smoothing else ""
        extra += ", inplace_backward=True" if self.inplace_backward else ""
        return f"scheme={self.scheme!r}, ignore_index={self.ignore_index}, reduction={self.reduction!r}{extra}"


class DMLoss(RobustCrossEntropyLoss):
    """DM loss (unified emphasis exp(beta p^lam (1 - p)), derivative-normalised by default)."""

    def __init__(self, lam: float = 1.0, beta: float = 8.0, **kwargs):
        super().__init__(DM(lam=lam, beta=beta), **kwargs)


class IMAELoss(RobustCrossEntropyLoss):
    """IMAE loss (emphasis exp(T p (1 - p)), derivative-normalised by default)."""

    def __init__(self, T: float = 8.0, **kwargs):
        super().__init__(IMAE(T=T), **kwargs)
