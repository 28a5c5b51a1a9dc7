"""The cross-row step of SPEC §5 in tensor ops, for paths that compute rows in pieces.

The fused ops do this step inside the kernel call. Callers that produce the
row statistics in several calls -- chunks of a fused linear layer, shards of a
distributed batch, the Triton backend -- concatenate the ``rows`` ``(N, 7) =
(m, ls, log w, x, alpha, beta, gamma)`` from ``robust_ce_rows`` and finish
here. It is written without data-dependent Python branches, so it traces under
``torch.compile(fullgraph=True)``.

Returns ``(value, stats)`` exactly as ``robust_ce_forward`` does:
``stats (N, 5) = (m, ls, alpha, beta, gamma)``, the row's gradient
``g (alpha r_j + beta u_j)`` off the target and ``g gamma`` at it.
"""

from __future__ import annotations

from typing import Optional

import torch

from ._common import KernelSpec, Reduction, RowCol


def sample_scale(
    target: torch.Tensor,
    weight: Optional[torch.Tensor],
    sample_weight: Optional[torch.Tensor],
    spec: KernelSpec,
    dtype: torch.dtype,
):
    """(valid, s, class weight of each row): s_i = sample_weight_i * weight[y_i], 0 when ignored.

    Where the spec puts the class weights into the rows (label smoothing:
    PyTorch weighs every class of the smoothing sum), ``s_i`` is the sample
    weight alone; the class weights still make the mean's ``D``.
    """
    valid = target != spec.ignore_index
    y = torch.where(valid, target, torch.zeros_like(target))
    zero = torch.zeros((), dtype=dtype, device=target.device)
    ones = torch.ones(target.shape, dtype=dtype, device=target.device)
    cw = weight.to(dtype)[y] if weight is not None else ones
    cw = torch.where(valid, cw, zero)
    s = torch.where(valid, ones, zero) if spec.weight_in_rows else cw
    # An ignored row's sample weight is never read, even a NaN one (0 * NaN would poison D).
    s = s if sample_weight is None else torch.where(valid, s * sample_weight.to(dtype), zero)
    return valid, s, cw


def normalised_term(s, e, x, lw):
    """A row's term ``s e x`` of the derivative-normalised value (schemes.h ``normalised_term``):
    an infinite ``x`` keeps its infinity where ``e`` underflowed to 0 (any ``w > 0`` times inf
    is inf, whatever precision this step runs in); only an exact ``w = 0`` gives NaN."""
    keep = torch.isinf(x) & (lw > float("-inf")) & (e == 0)
    return torch.where(keep, torch.where(s > 0, x, -x), s * e * x)


def finalize(
    rows: torch.Tensor,
    target: torch.Tensor,
    spec: KernelSpec,
    weight: Optional[torch.Tensor] = None,
    sample_weight: Optional[torch.Tensor] = None,
    *,
    across=None,
    log_denominator: bool = False,
):
    """(value, stats) from per-row ``rows = (m, ls, log w, x, alpha, beta, gamma)``; see the module docstring.

    ``log_denominator`` (derivative-normalised specs only) adds a third
    result, ``log D = log sum_i |s_i| w_i`` (``-inf`` when no row counts), from
    the shift and sum already made here: what the fused linear layer needs to
    move a chunk's coefficients to a running normaliser.

    The reduction, derivative normalisation, ``ignore_index`` and where the
    class weights go come from ``spec``.

    ``across`` (optional) extends the batch beyond these rows, for shards of
    one batch held elsewhere (``robustloss_fast.distributed``). It provides
    ``shift_sum(m, d) -> (M, D)``: from this call's shift ``m`` (the largest
    active ``log w``, 0 when no row counts) and ``d = sum |s_i| exp(log w_i - m)``
    (0 exactly when no row counts), the common shift and the whole batch's
    ``D = sum |s_i| exp(log w_i - M)``; ``sum(d) -> D`` for the class-weight
    count of ``normalize=False``; and ``scale``, a factor on value and coef.
    Without it nothing changes.
    """
    dtype = rows.dtype
    row_max, lw, x = rows[:, RowCol.M], rows[:, RowCol.LOGW], rows[:, RowCol.X]
    lse_parts = rows[:, : RowCol.LS + 1]  # (m, ls): passed through to the stats
    valid, s, cw = sample_scale(target, weight, sample_weight, spec, dtype)
    zero = torch.zeros((), dtype=dtype, device=rows.device)

    if spec.normalised:
        # Softmax of log w over the rows that count (s != 0): shift by their max.
        active = valid & (s != 0)
        lw_active = torch.where(active, lw, torch.full_like(lw, float("-inf")))
        m = torch.cat([lw_active, lw_active.new_full((1,), float("-inf"))]).max()
        m = torch.where(m == float("-inf"), zero, m)
        e = torch.where(active, torch.exp(lw - m), zero)
        denom = (s.abs() * e).sum()
        if across is not None:
            # The softmax runs over the whole batch: re-shift to its common max.
            m, denom = across.shift_sum(m, denom)
            e = torch.where(active, torch.exp(lw - m), zero)
        ok = denom != 0
        safe = torch.where(ok, denom, torch.ones_like(denom))
        value = torch.where(ok, torch.where(active, normalised_term(s, e, x, lw), zero).sum() / safe, zero)
        # G = 0 for a row with no finite non-target logit (SPEC §3); it still counts in D.
        coef = torch.where(ok & active & (row_max != float("-inf")), s * e / (2 * safe), zero)
        if across is not None:
            value, coef = value * across.scale, coef * across.scale
        stats = torch.cat([lse_parts, torch.stack([coef, torch.zeros_like(coef), -coef], dim=1)], dim=1)
        if log_denominator:
            return value, stats, m + torch.log(denom)
        return value, stats

    if log_denominator:
        raise ValueError("log_denominator is defined for derivative-normalised specs only")

    # Rows with s = 0 contribute 0, even where their raw weight overflowed (0 * inf).
    counts = valid & (s != 0)
    sx = torch.where(counts, s * x, zero)
    scale = s
    if spec.reduction == Reduction.NONE:
        value = sx
    elif spec.reduction == Reduction.SUM:
        value = sx.sum()
    else:
        denom = cw.sum() if across is None else across.sum(cw.sum())
        ok = denom != 0
        safe = torch.where(ok, denom, torch.ones_like(denom))
        value = torch.where(ok, sx.sum() / safe, zero)
        scale = torch.where(ok, s / safe, zero)
    if across is not None:
        value, scale = value * across.scale, scale * across.scale
    coefs = torch.where(counts[:, None], scale[:, None] * rows[:, RowCol.ALPHA :], zero)
    return value, torch.cat([lse_parts, coefs], dim=1)
