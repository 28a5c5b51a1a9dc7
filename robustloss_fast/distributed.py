r"""Robust cross-entropy over a batch split across processes (``torch.distributed``).

Data parallel (``process_group=group``)
---------------------------------------
Each of the ``W`` ranks of ``group`` holds a shard of one global batch. The
cross-row normaliser of SPEC §5 is taken over the *global* batch:

* ``reduction="mean", normalize=True``: ``D = sum_{i in batch} |s_i| w_i``,
  combined in the log domain (no overflow for any ``beta``);
* ``reduction="mean", normalize=False``: ``D = sum_{i in batch} weight[y_i]``
  (the global number of valid rows without class weights);
* ``"sum"`` and ``"none"`` have no normaliser and communicate nothing.

Every rank returns ``W`` times *its share* of the global loss:

    loss_r = W * sum_{i in shard r} s_i value_i / D        ("mean")
    loss_r = W * sum_{i in shard r} s_i value_i            ("sum")
    loss_r = W * (s_i value_i for i in shard r)            ("none", per element)

and the gradient w.r.t. its logits is ``W * g * s_i * G_i / D``. DDP averages
parameter gradients over the ranks (divides their sum by ``W``), so after
``backward`` every rank holds exactly the gradient of one process computing the
same loss on the concatenated batch (for ``"none"``: of the sum of the
elements the caller reduces with ``sum``). The global loss value is the mean
of ``loss_r`` over the ranks (``dist.all_reduce(loss.detach(), op=AVG)`` to log
it). The rule holds for uneven shards, empty shards and shards whose rows are
all ignored. Every rank of ``group`` must call the loss with the same
``reduction`` and ``normalize`` (the collective is issued or skipped by them).

Communication: ``normalize=True`` issues one ``all_gather`` of two numbers per
rank (the rank's largest log-weight ``m_r`` and ``d_r = sum |s| exp(log w - m_r)``);
every rank then forms ``M = max_r m_r`` and ``D = sum_r d_r exp(m_r - M)``
itself. A max and a sum cannot share one ``all_reduce``; gathering the
``2 W`` numbers costs one latency instead of two. ``normalize=False`` issues one
``all_reduce`` of one number. The collectives are enqueued like kernels
(NCCL) and nothing of them is read back to Python; the only host
synchronisation is the backends' bad-target check of the forward pass (one
8-byte copy on CUDA). The backward
pass communicates nothing (the weights are constants for differentiation, as in
the paper); DDP's own gradient all-reduce does the rest.

Vocabulary parallel (``process_group=group, vocab_parallel=True``)
------------------------------------------------------------------
Every rank holds the same rows but only the classes
``[class_offset, class_offset + C_local)`` of them (a vocabulary-parallel
output layer); ``target`` holds global class indices and ``weight`` is the full
``(C,)`` vector. The row statistics are combined with two ``all_reduce`` calls
(see docs/vocab_parallel.md); the value is then the global loss on every rank
and each rank's gradient is its slice of the single-process gradient (no
``W`` factor: tensor-parallel ranks do not average gradients).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from . import _finalize
from ._common import KernelSpec, RowCol, StatCol, acc_dtype

try:
    import torch.distributed as dist
except ImportError:  # pragma: no cover - torch builds without distributed support
    dist = None

__all__ = ["finalize_distributed", "robust_cross_entropy_rows", "vocab_parallel_rows"]


def _check_group(process_group) -> None:
    if dist is None or not dist.is_available():
        raise RuntimeError("process_group was given but this torch build has no torch.distributed")
    if not dist.is_initialized():
        raise RuntimeError("process_group was given but torch.distributed is not initialised (init_process_group)")
    if not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(f"process_group must be a torch.distributed.ProcessGroup, got {process_group!r}")


def _all_gather(local: torch.Tensor, group) -> torch.Tensor:
    """(W, *local.shape): every rank's ``local``, stacked in rank order."""
    world = dist.get_world_size(group)
    flat = local.reshape(-1).contiguous()
    out = flat.new_empty(world * flat.numel())
    # all_gather_single is the newer name of all_gather_into_tensor (a flat,
    # rank-major output), which older releases only have under the old name.
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, flat, group=group)
    return out.view(world, *local.shape)


class _AcrossGroup:
    """The ``across`` hook of ``_finalize.finalize``: the batch is the union of the group's shards."""

    def __init__(self, group):
        self.group = group
        self.scale = dist.get_world_size(group)

    def shift_sum(self, m: torch.Tensor, d: torch.Tensor):
        # A rank whose rows all have zero weight (d == 0) must not pull the
        # common shift up to its placeholder m = 0: send -inf instead.
        m = torch.where(d != 0, m, torch.full_like(m, -math.inf))
        both = _all_gather(torch.stack([m, d]), self.group)
        ms, ds = both[:, 0], both[:, 1]
        big = ms.max()
        big = torch.where(big == -math.inf, torch.zeros_like(big), big)
        # Ranks with d_r = 0 have m_r = -inf: exp(-inf) * 0 = 0, never NaN.
        return big, (ds * torch.exp(ms - big)).sum()

    def sum(self, d: torch.Tensor) -> torch.Tensor:
        d = d.clone()
        dist.all_reduce(d, op=dist.ReduceOp.SUM, group=self.group)
        return d


def finalize_distributed(
    rows: torch.Tensor,
    target: torch.Tensor,
    spec: KernelSpec,
    weight: Optional[torch.Tensor],
    sample_weight: Optional[torch.Tensor],
    process_group,
):
    """``_finalize.finalize`` with the normaliser of the whole group's batch (data parallel).

    ``rows`` (N, 7) are this rank's rows (a backend's ``rows`` with the same
    ``spec``).
    Returns ``(value, stats)`` like ``robust_ce_forward``, scaled by the world
    size ``W`` (see the module docstring): ``value`` is ``W`` times this rank's
    share of the global loss and the stats' ``(alpha, beta, gamma)`` (the gradient's
    coefficients) carry the same factor, so the backward op's gradient is ready for DDP's
    averaging. ``"none"``/``"sum"`` communicate nothing; ``"mean"`` issues one small
    collective (all ranks must call it). Not differentiable itself: wrap it
    (see ``robust_cross_entropy_rows``) and use the backend's ``grad``.
    """
    _check_group(process_group)
    return _finalize.finalize(rows, target, spec, weight, sample_weight, across=_AcrossGroup(process_group))


class _DataParallelFunction(torch.autograd.Function):
    """rows -> finalize_distributed in forward; the backend's backward op in backward."""

    @staticmethod
    def forward(ctx, logits, target, spec, weight, sw, group, backend):
        rows = backend.rows(logits, target, spec, weight)
        value, stats = finalize_distributed(rows, target, spec, weight, sw, group)
        ctx.save_for_backward(logits, target, stats, spec.smooth_weight(weight))
        ctx.spec, ctx.backend = spec, backend
        return value

    @staticmethod
    def backward(ctx, grad):
        if torch.is_grad_enabled():  # create_graph=True: refuse rather than drop the second-order term
            raise RuntimeError("robustloss: double backward (create_graph=True) is not supported")
        logits, target, stats, u = ctx.saved_tensors
        grad_logits = ctx.backend.grad(grad, logits, target, stats, ctx.spec, u)
        return (grad_logits,) + (None,) * 6


def robust_cross_entropy_rows(backend, logits, target, spec, weight, sample_weight, process_group):
    """Differentiable data-parallel loss on canonical rows (the ``process_group`` path of the API).

    ``backend`` is a ``robustloss_fast.backends.Backend``: its row and gradient
    passes run this rank's rows; the cross-row step spans the group.
    """
    _check_group(process_group)
    return _DataParallelFunction.apply(logits, target, spec, weight, sample_weight, process_group, backend)


# ----------------------------------------------------------------------------
# Vocabulary parallel: each rank holds a slice of the classes of every row.
# ----------------------------------------------------------------------------


def _local_target(logits, target, ignore_index, class_offset):
    """(valid, owned, local column of the target): owned rows have their target in this slice."""
    c_local = logits.shape[1]
    valid = target != ignore_index
    col = target - class_offset
    owned = valid & (col >= 0) & (col < c_local)
    col = torch.where(owned, col, torch.zeros_like(col))
    return valid, owned, col


def vocab_parallel_rows(backend, logits, target, spec: KernelSpec, class_offset, process_group):
    """Rows (N, 7) of the full-vocabulary logits (one-term schemes), from this rank's class slice.

    Identical on every rank of ``process_group``. Two ``all_reduce`` calls:
    MAX of (largest local non-target logit, bad-row flag), then SUM of
    (local ``sum exp(z_j - M)`` over non-target classes, target logit where
    owned, 1 where owned). A valid target owned by no rank or several (out of
    range, or overlapping slices) is an error.

    A one-term row depends on its logits only through its margin
    ``d = (z_y - m) - ls`` (spec §2), so the scheme math is the backend's own
    row pass run on the two-class rows ``[z_y - m, ls]`` with target 0 (their
    margin is ``d``); the rows then get the true ``(m, ls)`` back.
    """
    acc = acc_dtype(logits.dtype)
    z = logits.to(acc)
    n, c_local = z.shape
    valid, owned, col = _local_target(z, target, spec.ignore_index, class_offset)
    is_target = torch.zeros((n, c_local), dtype=torch.bool, device=z.device)
    is_target.scatter_(1, col[:, None], owned[:, None])
    # SPEC §6: NaN or +inf anywhere in the row makes the row NaN; carried as a flag
    # because MAX all-reduces do not agree on NaN across backends.
    bad = (torch.isnan(z) | torch.isposinf(z)).any(1)
    z_nt = z.masked_fill(is_target | torch.isnan(z), -math.inf)
    empty = z.new_full((n, 1), -math.inf)  # C_local = 0 shards have no max of their own
    m_local = torch.cat([z_nt, empty], dim=1).max(1).values
    packed = torch.stack([m_local, bad.to(acc)], dim=1)
    dist.all_reduce(packed, op=dist.ReduceOp.MAX, group=process_group)
    m, bad = packed[:, 0], packed[:, 1] != 0
    m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    z_y = torch.where(owned, z.gather(1, col[:, None]).squeeze(1), torch.zeros_like(m))
    sums = torch.stack([torch.exp(z_nt - m_safe[:, None]).sum(1), z_y, owned.to(acc)], dim=1)
    dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=process_group)
    sum_nt, z_y, owners = sums[:, 0], sums[:, 1], sums[:, 2]
    wrong = valid & (owners != 1)
    if z.device.type == "cpu" and not torch.compiler.is_compiling():
        if bool(wrong.any()):
            raise IndexError(
                f"target value {int(target[wrong][0])} is not in exactly one rank's class slice "
                f"(this rank holds classes {class_offset}..{class_offset + c_local - 1})"
            )
    else:
        # No host sync on accelerators: the check fails at a later synchronisation.
        torch._assert_async(~wrong.any(), "robust_cross_entropy(vocab_parallel=True): a target is in no rank's slice")
    dead = m == -math.inf
    nan = torch.full_like(m, math.nan)
    ls = torch.where(dead, torch.zeros_like(m), torch.log(sum_nt))
    m, ls = torch.where(bad, nan, m), torch.where(bad, nan, ls)
    # The pair's own "m" is ls (or -inf when no non-target logit is finite).
    pair = torch.stack([z_y - m_safe, torch.where(dead, m, ls)], dim=1)
    pair_target = torch.where(valid, torch.zeros_like(target), target)
    rows = backend.rows(pair, pair_target, spec, None)
    return torch.cat([torch.stack([m, ls], dim=1), rows[:, RowCol.LOGW :]], dim=1)


def _vocab_parallel_backward(grad, logits, target, stats, ignore_index, class_offset):
    """This slice of ``g (alpha r - ...)``: ``alpha r`` from the global lse_nt, ``gamma`` at an owned target.

    One-term schemes only (``beta = 0``).
    """
    acc = stats.dtype
    z = logits.to(acc)
    valid, owned, col = _local_target(z, target, ignore_index, class_offset)
    m, ls = stats[:, StatCol.M], stats[:, StatCol.LS]
    alpha, gamma = stats[:, StatCol.ALPHA], stats[:, StatCol.GAMMA]
    is_target = torch.zeros(z.shape, dtype=torch.bool, device=z.device)
    is_target.scatter_(1, col[:, None], owned[:, None])
    r = torch.exp((z - m[:, None]) - ls[:, None])
    r = torch.where((m == -math.inf)[:, None], torch.zeros_like(r), r)
    direction = torch.where(is_target, gamma[:, None].expand_as(z), alpha[:, None] * r)
    g = grad.to(acc)
    g = g[:, None] if g.dim() == 1 else g
    out = torch.where(valid[:, None], g * direction, torch.zeros_like(direction))
    return out.to(logits.dtype)


class _VocabParallelFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, spec, weight, sw, group, offset, backend):
        rows = vocab_parallel_rows(backend, logits, target, spec, offset, group)
        # Every rank holds the same rows: the normaliser is local, no W factor.
        value, stats = _finalize.finalize(rows, target, spec, weight, sw)
        ctx.save_for_backward(logits, target, stats)
        ctx.ignore_index, ctx.offset = spec.ignore_index, offset
        return value

    @staticmethod
    def backward(ctx, grad):
        if torch.is_grad_enabled():  # create_graph=True: refuse rather than drop the second-order term
            raise RuntimeError("robustloss: double backward (create_graph=True) is not supported")
        logits, target, stats = ctx.saved_tensors
        grad_logits = _vocab_parallel_backward(grad, logits, target, stats, ctx.ignore_index, ctx.offset)
        return (grad_logits,) + (None,) * 7


def vocab_parallel_cross_entropy_rows(
    backend, logits, target, spec: KernelSpec, weight, sample_weight, process_group, class_offset=None
):
    """Differentiable vocabulary-parallel loss on canonical rows (the ``vocab_parallel=True`` path).

    ``class_offset`` defaults to ``rank * C_local`` (equal slices in rank order).
    ``weight`` is the full ``(C,)`` class-weight vector. ``backend`` runs the
    row pass (on the combined row statistics, see ``vocab_parallel_rows``).
    """
    _check_group(process_group)
    if spec.two_term:
        raise NotImplementedError(
            "vocab_parallel=True supports the schemes of p alone; label smoothing and NCE/APL need one more "
            "all_reduce of the row's logit sum, not implemented"
        )
    if class_offset is None:
        class_offset = dist.get_rank(process_group) * logits.shape[1]
    if isinstance(class_offset, bool) or not isinstance(class_offset, int) or class_offset < 0:
        raise TypeError(f"class_offset must be a non-negative int, got {class_offset!r}")
    if weight is not None:
        if not isinstance(weight, torch.Tensor) or not weight.dtype.is_floating_point or weight.dim() != 1:
            raise TypeError("weight must be a floating tensor of shape (C,) over the full vocabulary")
        if weight.shape[0] < class_offset + logits.shape[1]:
            raise ValueError(
                f"weight has {weight.shape[0]} classes but this rank's slice ends at class "
                f"{class_offset + logits.shape[1]}: pass the full-vocabulary weight"
            )
        weight = weight.to(acc_dtype(logits.dtype)).contiguous()
    return _VocabParallelFunction.apply(
        logits, target, spec, weight, sample_weight, process_group, class_offset, backend
    )
