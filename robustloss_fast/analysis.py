"""Per-example analysis: probabilities and emphasis, detached.

The emphasis comes from a backend's own row pass (the ``log w`` column of its
rows, spec §9), so these helpers report exactly what the kernels weigh.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

from . import backends
from ._common import Kernel, KernelSpec, Reduction, RowCol, acc_dtype
from .functional import _canonical
from .schemes import Scheme

__all__ = ["ExampleWeights", "example_weights", "EmphasisStats", "emphasis_stats", "log_emphasis"]


def _one_term_spec(scheme: Scheme, ignore_index: int = -100) -> KernelSpec:
    if not isinstance(scheme, Scheme):
        raise TypeError(f"scheme must be a robustloss_fast.schemes.Scheme, got {scheme!r}")
    if scheme.two_term:
        raise ValueError(
            f"{type(scheme).__name__} depends on the whole distribution, not on p alone: it has no emphasis w(p)"
        )
    a, b = scheme.kernel_params
    return KernelSpec(Kernel(scheme.kernel_id), float(a), float(b), 1.0, Reduction.NONE, False, ignore_index)


@torch.no_grad()
def log_emphasis(scheme: Scheme, p: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """``log w(p)`` of a scheme of ``p`` alone at the probabilities ``p`` (float64, shaped like ``p``).

    Evaluated by the backend's row pass on two-class rows whose target has
    probability ``p``: logits ``[logit(p), 0]`` (``[-inf, 0]`` at ``p = 0`` and
    ``[0, -inf]`` at ``p = 1``, a masked class), target 0.
    """
    spec = _one_term_spec(scheme)
    p = p.to(torch.float64).reshape(-1)
    one = p == 1
    logit = torch.log(p) - torch.log1p(-p)
    pair = torch.stack(
        [torch.where(one, torch.zeros_like(p), logit), torch.where(one, torch.full_like(p, -math.inf), torch.zeros_like(p))],
        dim=1,
    )
    target = torch.zeros(p.shape, dtype=torch.long, device=p.device)
    rows = backends.resolve(backend, p.device).rows(pair, target, spec, None)
    return rows[:, RowCol.LOGW].reshape(p.shape)


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
    spec = _one_term_spec(scheme, ignore_index)
    if normalize is None:
        normalize = scheme.default_normalize
    logits, tgt, _, shape = _canonical(input, target, None)
    rows = backends.resolve("auto", logits.device).rows(logits, tgt, spec, None)
    valid = tgt != ignore_index
    y = torch.where(valid, tgt, torch.zeros_like(tgt))
    # Spec §2: p is the sigmoid of the margin (z_y - m) - ls (NaN rows stay NaN).
    z_y = logits.gather(1, y[:, None]).squeeze(1).to(acc_dtype(logits.dtype))
    p = torch.sigmoid((z_y - rows[:, RowCol.M]) - rows[:, RowCol.LS])
    lw = torch.where(valid, rows[:, RowCol.LOGW], torch.full_like(rows[:, RowCol.LOGW], -math.inf))
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
