"""Per-example analysis: probabilities and emphasis, detached."""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

from . import reference
from .functional import _canonical
from .schemes import Scheme

__all__ = ["ExampleWeights", "example_weights", "EmphasisStats", "emphasis_stats"]


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
    if scheme.two_term:
        raise ValueError(
            f"{type(scheme).__name__} depends on the whole distribution, not on p alone: it has no emphasis w(p)"
        )
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


class EmphasisStats(NamedTuple):
    """DM Definitions 1-2 for one batch.

    ``psi``: the emphasis mode of the scheme, ``argmax_p w(p)`` (None where
    ``w`` has no unique maximum, e.g. ``DM(beta=0)``); it depends on the scheme
    only. ``sigma``: the variance of the normalised weights over the batch's
    valid examples (0-dim tensor; nan for a batch with no valid example).
    ``w``: those normalised weights, shaped like target (0 where ignored).
    """

    psi: Optional[float]
    sigma: torch.Tensor
    w: torch.Tensor


@torch.no_grad()
def emphasis_stats(
    input: torch.Tensor,
    target: torch.Tensor,
    scheme: Scheme,
    ignore_index: int = -100,
) -> EmphasisStats:
    r"""Emphasis mode ``psi`` and emphasis variance ``sigma`` of ``scheme`` on a batch (DM Defs. 1-2).

    With the normalised weights ``\hat w_i = w(p_i) / \sum_j w(p_j)`` of the
    ``n`` valid examples (they sum to 1, mean ``1/n``),
    ``sigma = (1/n) \sum_i (\hat w_i - 1/n)^2`` (population variance). It is 0
    when every example is weighted equally and grows as the emphasis
    concentrates on fewer examples; it scales as ``1/n^2``, so compare it
    between batches of the same size (``n^2 sigma`` is size-free).
    """
    ew = example_weights(input, target, scheme, normalize=True, ignore_index=ignore_index)
    w = ew.w[target != ignore_index]
    sigma = w.var(correction=0) if w.numel() > 0 else torch.full((), math.nan, dtype=ew.w.dtype, device=ew.w.device)
    return EmphasisStats(scheme.emphasis_mode, sigma, ew.w)
