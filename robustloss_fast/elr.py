"""Early-learning regularisation (ELR; Liu et al., NeurIPS 2020) on top of any scheme.

ELR keeps, for every training example ``i``, a running target ``t_i``: an
exponential moving average of the model's own (detached) predictions. It adds
``lam * mean_i log(1 - <t_i, p_i>)`` to the loss, which pulls the prediction
``p_i = softmax(z_i)`` towards what the model predicted early in training,
before it memorised wrong labels. Paper settings: CIFAR-10 ``beta=0.7,
lam=3``; CIFAR-100 ``beta=0.9, lam=7``.

The classification term is :func:`robustloss_fast.robust_cross_entropy` with
the given scheme (fused kernels); the regulariser is a function of the whole
distribution and runs in plain tensor ops (N x C temporaries), as in the
authors' code, which this follows in two details: ``p`` is clamped to
``[1e-4, 1 - 1e-4]`` inside the regulariser, and the EMA is updated with the
clamped prediction renormalised to sum 1.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .functional import robust_cross_entropy
from .schemes import CCE, Scheme

__all__ = ["ELRLoss"]

_CLAMP = 1e-4


class ELRLoss(nn.Module):
    """``scheme`` loss + ``lam * mean_i log(1 - <t_i, softmax(z_i)>)`` with EMA targets ``t``.

    Args:
        num_examples: size of the training set (``index`` values are in
            ``[0, num_examples)``).
        num_classes: C.
        lam: weight of the regulariser (3 for CIFAR-10, 7 for CIFAR-100).
        beta: EMA momentum of the targets, ``t <- beta t + (1 - beta) p``.
        scheme: the classification term's scheme (``CCE()`` as in the paper).
        weight, ignore_index, normalize, backend: passed to
            :func:`robust_cross_entropy` (mean reduction). Ignored rows add
            nothing to either term and their targets are not updated.

    ``forward(input (N, C), target (N,), index (N,))`` updates ``t[index]``
    (a registered buffer: it is saved in ``state_dict`` and follows ``.to()``)
    and returns the scalar loss. Updating state in forward is data dependent:
    the module is not meant for ``torch.compile(fullgraph=True)``.
    """

    def __init__(
        self,
        num_examples: int,
        num_classes: int,
        lam: float = 3.0,
        beta: float = 0.7,
        scheme: Scheme = CCE(),
        weight: Optional[torch.Tensor] = None,
        ignore_index: int = -100,
        normalize: Optional[bool] = None,
        backend: str = "auto",
    ):
        super().__init__()
        for name, value in (("num_examples", num_examples), ("num_classes", num_classes)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ELRLoss: {name} must be a positive int, got {value!r}")
        if not 0.0 <= float(beta) < 1.0:
            raise ValueError(f"ELRLoss: beta must be in [0, 1), got {beta!r}")
        if not float(lam) >= 0.0:
            raise ValueError(f"ELRLoss: lam must be >= 0, got {lam!r}")
        if not isinstance(scheme, Scheme):
            raise TypeError(f"ELRLoss: scheme must be a robustloss_fast.schemes.Scheme, got {scheme!r}")
        self.num_examples, self.num_classes = num_examples, num_classes
        self.lam, self.beta, self.scheme = float(lam), float(beta), scheme
        self.ignore_index, self.normalize, self.backend = ignore_index, normalize, backend
        self.register_buffer("weight", weight)
        self.register_buffer("ema", torch.zeros(num_examples, num_classes))

    def forward(self, input: torch.Tensor, target: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        if input.dim() != 2 or input.shape[1] != self.num_classes:
            raise ValueError(f"ELRLoss: input must have shape (N, {self.num_classes}), got {tuple(input.shape)}")
        if not isinstance(index, torch.Tensor) or index.dtype.is_floating_point or index.dtype == torch.bool:
            raise TypeError("ELRLoss: index must be an integer tensor of example indices")
        if tuple(index.shape) != (input.shape[0],):
            raise ValueError(f"ELRLoss: index must have shape ({input.shape[0]},), got {tuple(index.shape)}")
        index = index.to(device=self.ema.device, dtype=torch.long)
        bad = (index < 0) | (index >= self.num_examples)
        if bool(bad.any()):
            raise IndexError(
                f"ELRLoss: index value {int(index[bad][0])} is out of range for {self.num_examples} examples"
            )

        loss = robust_cross_entropy(
            input, target, self.scheme, weight=self.weight, ignore_index=self.ignore_index,
            normalize=self.normalize, backend=self.backend,
        )  # fmt: skip

        valid = (target != self.ignore_index).to(self.ema.device)
        acc = torch.float64 if input.dtype == torch.float64 else torch.float32
        p = torch.softmax(input.to(acc), dim=1).clamp(_CLAMP, 1.0 - _CLAMP)
        with torch.no_grad():
            rows = index[valid]
            update = (p.detach() / p.detach().sum(dim=1, keepdim=True)).to(self.ema)[valid]
            self.ema[rows] = self.beta * self.ema[rows] + (1.0 - self.beta) * update
        t = self.ema[index].to(p)
        reg = torch.log(1.0 - (t * p).sum(dim=1))
        valid = valid.to(p.device)
        count = valid.sum()
        reg = torch.where(valid, reg, torch.zeros_like(reg)).sum() / count.clamp(min=1)
        return loss + self.lam * reg.to(loss.dtype)

    def extra_repr(self) -> str:
        return (
            f"num_examples={self.num_examples}, num_classes={self.num_classes}, lam={self.lam}, "
            f"beta={self.beta}, scheme={self.scheme!r}"
        )
