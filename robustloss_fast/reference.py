"""The pure-PyTorch reference backend: SPEC written out in tensor ops.

This is the oracle of every parity test, so it favours clarity over speed and
shares no code with the kernels. It implements the same two ops as every
backend, on canonical 2-D rows:

``forward(logits (N, C), target (N,), kernel_id, a, b, weight, sample_weight,
ignore_index, reduction, normalize) -> (value, stats)``
    ``value`` is the reduced loss (``(N,)`` for ``reduction="none"``);
    ``stats`` is ``(N, 2)``: per row ``lse_nt`` (logsumexp over the non-target
    classes) and ``coef``, the factor of ``(r - e_y)`` in the final gradient
    (``s_i w_i / 2``, divided by ``D`` for ``"mean"``).

``backward(grad, logits, target, stats, ignore_index) -> grad_logits``
    ``grad_logits[i] = g_i * coef_i * (r_i - e_{y_i})`` with
    ``r_ij = exp(z_ij - lse_nt_i)`` for ``j != y_i`` (SPEC §3), zero for ignored
    rows and for rows with no finite non-target logit.

Math (SPEC §2-§5), per row with margin ``d = z_y - lse_nt``:
``log p = -softplus(-d)``, ``log q = -softplus(d)`` (q never formed as 1 - p);
the emphasis is handled as ``log w`` so that the derivative normaliser
``D = sum |s_i| w_i`` is a log-sum-exp over the batch and cannot overflow.
"""

from __future__ import annotations

import math

import torch

from .schemes import KERNEL_IDS

_CCE, _MAE, _MSE, _GCE = (KERNEL_IDS[k] for k in ("CCE", "MAE", "MSE", "GCE"))
_DM, _DMN, _DMB = (KERNEL_IDS[k] for k in ("DM", "DM_NORMAL", "DM_BETA"))
_POLY, _FOCAL, _TAYLOR = (KERNEL_IDS[k] for k in ("POLY", "FOCAL", "TAYLOR"))
_LOSS_DEFINED = (_CCE, _MAE, _MSE, _GCE, _POLY, _FOCAL, _TAYLOR)

NONE, MEAN, SUM = 0, 1, 2


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """SPEC §6: float64 accumulates in float64, everything else in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _softplus(x: torch.Tensor) -> torch.Tensor:
    # Exact log(1 + e^x); F.softplus's threshold would drop e^-x for x > 20.
    return x.clamp(min=0) + torch.log1p(torch.exp(-x.abs()))


def log_weight(kernel_id: int, a: float, b: float, logp, logq, p, q) -> torch.Tensor:
    """log w(p) of SPEC §4 for one kernel formula (NaN for a NaN row, whatever the formula)."""
    lw = _log_weight(kernel_id, a, b, logp, logq, p, q)
    return torch.where(torch.isnan(p), p, lw)


def _log_weight(kernel_id: int, a: float, b: float, logp, logq, p, q) -> torch.Tensor:
    ln2 = math.log(2.0)
    if kernel_id == _CCE:
        return ln2 + logq
    if kernel_id == _MAE:
        return ln2 + logp + logq
    if kernel_id == _MSE:
        return 2 * ln2 + logp + 2 * logq
    if kernel_id == _GCE:
        return ln2 + a * logp + logq
    if kernel_id == _DM:
        plam = torch.ones_like(p) if a == 0 else torch.exp(a * logp)
        return b * plam * q
    if kernel_id == _DMN:
        return -b * p * (p - 2 * a)
    if kernel_id == _DMB:
        t1 = torch.zeros_like(logp) if a == 1 else (a - 1) * logp
        t2 = torch.zeros_like(logq) if b == 1 else (b - 1) * logq
        return t1 + t2
    # Loss-defined peers: log of w = 2q (-p L'(p)).
    if kernel_id == _POLY:
        return ln2 + logq + torch.log(a + b * p)
    if kernel_id == _FOCAL:
        # p >= q: w = 2 q^(g+1) (1 + g p (-log p) / q) in logs (q may underflow, log q does not);
        # p < q: w = 2 q^g (q - g p log p).
        ratio = torch.where(q > 0, -logp / q, torch.ones_like(q))
        confident = ln2 + (a + 1) * logq + torch.log1p(a * p * ratio)
        plogp = torch.where(p == 0, torch.zeros_like(p), p * logp)
        mod = torch.zeros_like(logq) if a == 0 else a * logq
        return torch.where(p >= q, confident, ln2 + mod + torch.log(q - a * plogp))
    if kernel_id == _TAYLOR:
        return ln2 + logq + torch.log(-torch.expm1(a * logq))
    raise ValueError(f"unknown kernel id {kernel_id}")


def loss_value(kernel_id: int, a: float, b: float, logp, logq, p, q) -> torch.Tensor:
    """L(p) of a loss-defined scheme, accurate as p -> 1."""
    if kernel_id == _CCE:
        return -logp
    if kernel_id == _MAE:
        return q
    if kernel_id == _MSE:
        return q * q
    if kernel_id == _GCE:
        return -torch.expm1(a * logp) / a
    if kernel_id == _POLY:
        return (torch.zeros_like(logp) if a == 0 else -a * logp) + b * q
    if kernel_id == _FOCAL:
        return -logp if a == 0 else -torch.exp(a * logq) * logp
    if kernel_id == _TAYLOR:
        return sum(q**k / k for k in range(1, int(a) + 1))
    raise ValueError(f"kernel id {kernel_id} is not loss-defined")


def check_target(target: torch.Tensor, num_classes: int, ignore_index: int) -> None:
    """Raise IndexError naming the first target outside [0, C) that is not ignore_index."""
    bad = (target != ignore_index) & ((target < 0) | (target >= num_classes))
    if bool(bad.any()):
        value = int(target[bad][0])
        raise IndexError(
            f"target value {value} is out of bounds for {num_classes} classes "
            f"(valid: 0..{num_classes - 1}, or ignore_index={ignore_index})"
        )


def row_probs(z: torch.Tensor, y: torch.Tensor):
    """(z_y, lse_nt, log p, log q, p, q) of every row (SPEC §2), in z's dtype."""
    n, c = z.shape
    onehot = torch.zeros((n, c), dtype=torch.bool, device=z.device)
    onehot.scatter_(1, y[:, None], True)
    z_y = z.gather(1, y[:, None]).squeeze(1)
    lse_nt = torch.logsumexp(z.masked_fill(onehot, -math.inf), dim=1)
    # SPEC §6: NaN or +inf anywhere in a row makes that row NaN (logsumexp
    # would turn a +inf non-target into lse_nt = +inf and p = 0).
    bad = torch.isnan(z).any(1) | torch.isposinf(z).any(1)
    lse_nt = torch.where(bad, torch.full_like(lse_nt, math.nan), lse_nt)
    d = z_y - lse_nt
    logp = -_softplus(-d)
    logq = -_softplus(d)
    return z_y, lse_nt, logp, logq, logp.exp(), logq.exp()


def rows_from_probs(kernel_id, a, b, valid, lse_nt, logp, logq, p, q, normalised):
    """The op ``robust_ce_rows`` from row probabilities: (N, 3) = (lse_nt, log w, x).

    ``x`` is ``-log p`` under derivative normalisation, else the row's value
    (``L(p)`` or ``w (-log p)``). Ignored rows are written as the compiled op
    writes them: ``(-inf, -inf, 0)``.
    """
    lw = log_weight(kernel_id, a, b, logp, logq, p, q)
    if normalised:
        x = -logp
    elif kernel_id in _LOSS_DEFINED:
        x = loss_value(kernel_id, a, b, logp, logq, p, q)
    else:
        x = lw.exp() * (-logp)
    ninf = torch.full_like(lw, -math.inf)
    return torch.stack(
        [torch.where(valid, lse_nt, ninf), torch.where(valid, lw, ninf), torch.where(valid, x, torch.zeros_like(x))],
        dim=1,
    )


def rows(logits, target, kernel_id, a, b, ignore_index, normalised):
    """The op ``robust_ce_rows`` in tensor ops (checks the targets outside ``torch.compile``)."""
    if not torch.compiler.is_compiling():
        check_target(target, logits.shape[1], ignore_index)
    valid = target != ignore_index
    y = torch.where(valid, target, torch.zeros_like(target))
    _, lse_nt, logp, logq, p, q = row_probs(logits.to(acc_dtype(logits.dtype)), y)
    return rows_from_probs(kernel_id, a, b, valid, lse_nt, logp, logq, p, q, normalised)


def forward(logits, target, kernel_id, a, b, weight, sample_weight, ignore_index, reduction, normalize):
    n, c = logits.shape
    acc = acc_dtype(logits.dtype)
    normalised = reduction == MEAN and normalize
    r = rows(logits, target, kernel_id, a, b, ignore_index, normalised)
    lse_nt, lw, x = r[:, 0], r[:, 1], r[:, 2]
    valid = target != ignore_index
    y = torch.where(valid, target, torch.zeros_like(target))

    s = torch.ones(n, dtype=acc, device=logits.device)
    cw = torch.ones(n, dtype=acc, device=logits.device)
    if weight is not None:
        cw = weight.to(acc)[y]
        s = s * cw
    if sample_weight is not None:
        s = s * sample_weight.to(acc)
    zero = torch.zeros((), dtype=acc, device=logits.device)
    s = torch.where(valid, s, zero)

    # Rows with s = 0 contribute 0, even where their raw value overflowed (0 * inf).
    sx = torch.where(valid & (s != 0), s * x, zero)

    if normalised:
        # Normalised weights are a softmax of log w over the batch (SPEC §5):
        # shift by the largest log-weight among rows that count.
        active = valid & (s != 0)
        lw_active = torch.where(active, lw, torch.full_like(lw, -math.inf))
        m = torch.cat([lw_active, torch.full((1,), -math.inf, dtype=acc, device=logits.device)]).max()
        m = torch.where(m == -math.inf, zero, m)
        e = torch.where(active, torch.exp(lw - m), zero)
        denom = (s.abs() * e).sum()
        ok = denom != 0
        safe = torch.where(ok, denom, torch.ones_like(denom))
        value = torch.where(ok, (torch.where(active, s * e * x, zero)).sum() / safe, zero)
        coef = torch.where(ok, s * e / (2 * safe), zero)
    else:
        w = torch.where(valid & (s != 0), lw.exp(), zero)
        coef = s * w / 2
        if reduction == NONE:
            value = sx
        elif reduction == SUM:
            value = sx.sum()
        else:
            denom = torch.where(valid, cw, zero).sum()
            ok = denom != 0
            safe = torch.where(ok, denom, torch.ones_like(denom))
            value = torch.where(ok, sx.sum() / safe, zero)
            coef = torch.where(ok, coef / safe, zero)
    coef = torch.where(valid, coef, zero)
    stats = torch.stack([lse_nt, coef], dim=1)
    return value, stats


def backward(grad, logits, target, stats, ignore_index):
    n, c = logits.shape
    acc = stats.dtype
    z = logits.to(acc)
    valid = target != ignore_index
    y = torch.where(valid, target, torch.zeros_like(target))
    lse_nt, coef = stats[:, 0], stats[:, 1]
    onehot = torch.zeros((n, c), dtype=torch.bool, device=z.device)
    onehot.scatter_(1, y[:, None], True)
    # r_y is excluded by selection, not by multiplying with 0: exp(z_y - lse_nt) may be inf.
    direction = torch.where(onehot, torch.full_like(z, -1.0), torch.exp(z - lse_nt[:, None]))
    # G = 0 when no non-target class has a finite logit (C = 1, all masked).
    no_nt = (lse_nt == -math.inf)[:, None]
    direction = torch.where(no_nt, torch.zeros_like(direction), direction)
    g = grad.to(acc)
    g = g[:, None] if g.dim() == 1 else g
    out = g * coef[:, None] * direction
    out = torch.where(valid[:, None], out, torch.zeros_like(out))
    return out.to(logits.dtype)


class ReferenceFunction(torch.autograd.Function):
    """Autograd glue for the reference: forward value, SPEC gradient in backward."""

    @staticmethod
    def forward(ctx, logits, target, kernel_id, a, b, weight, sample_weight, ignore_index, reduction, normalize):
        value, stats = forward(
            logits, target, kernel_id, a, b, weight, sample_weight, ignore_index, reduction, normalize
        )
        ctx.save_for_backward(logits, target, stats)
        ctx.ignore_index = ignore_index
        return value

    @staticmethod
    def backward(ctx, grad):
        if torch.is_grad_enabled():  # create_graph=True: refuse rather than drop the second-order term
            raise RuntimeError("robustloss: double backward (create_graph=True) is not supported")
        logits, target, stats = ctx.saved_tensors
        grad_logits = backward(grad, logits, target, stats, ctx.ignore_index)
        return grad_logits, None, None, None, None, None, None, None, None, None
