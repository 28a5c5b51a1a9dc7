"""Per-example analysis: probabilities and emphasis, detached."""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

from . import reference
from .functional import _canonical
from .schemes import Scheme

__all__ = ["ExampleWeights", "example_weights"]


class ExampleWeights(NamedTuple):
    """``p``: probability of the target; ``w``: emphasis (normalised if asked). Shaped like target."""

    p: torch.Tensor
    w: torch.Tensor


@torch.no_grad()
def example_weights(
    input: torch.Tensor,
    target: torch.Tensor,
    scheme: Scheme,
    normalize: Optional[bool] = None,
    ignore_index: int = -100,
) -> ExampleWeights:
    """Per-example ``p = softmax(input)_y`` and emphasis ``w(p)`` of ``scheme``.

    With ``normalize=True`` (the default for derivative-defined schemes) the
    weights are divided by their sum over the valid examples, computed in the
    log domain (a softmax of ``log w``), so they sum to one and never overflow.
    Ignored examples get ``p = nan`` and ``w = 0``. Results are detached, in
    float32 (float64 for float64 input).
    """
    if not isinstance(scheme, Scheme):
        raise TypeError(f"scheme must be a robustloss_fast.schemes.Scheme, got {scheme!r}")
    if normalize is None:
        normalize = scheme.default_normalize
    logits, tgt, _, shape = _canonical(input, target, None)
    acc = reference.acc_dtype(logits.dtype)
    reference.check_target(tgt, logits.shape[1], ignore_index)
    valid = tgt != ignore_index
    y = torch.where(valid, tgt, torch.zeros_like(tgt))
    _, _, logp, logq, p, q = reference.row_probs(logits.to(acc), y)
    a, b = scheme.kernel_params
    lw = reference.log_weight(scheme.kernel_id, a, b, logp, logq, p, q)
    lw = torch.where(valid, lw, torch.full_like(lw, -math.inf))
    if normalize:
        w = torch.softmax(lw, dim=0) if bool(valid.any()) else torch.zeros_like(lw)
    else:
        w = lw.exp()
    p = torch.where(valid, p, torch.full_like(p, math.nan))
    return ExampleWeights(p.reshape(shape), w.reshape(shape))
