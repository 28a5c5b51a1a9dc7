r"""Fused linear layer + robust cross-entropy that never materialises the logits.

``linear_robust_cross_entropy(hidden, weight, target, scheme, ...)`` equals
``robust_cross_entropy(hidden @ weight.T + bias, target, scheme, ...)`` (value
and gradients for ``hidden``, ``weight`` and ``bias``), but holds at most one
chunk of ``chunk_size`` rows of logits (and one of their gradient) at a time.
For a language model with ``N`` tokens and a vocabulary of ``V`` this removes
the two ``N x V`` tensors (logits and their gradient) that dominate memory.

The cross-row normaliser
------------------------
SPEC §5's ``"mean"`` with ``normalize=True`` divides every row's gradient by
``D = sum_i |s_i| w_i``, which needs every row's weight. Two exact ways are
implemented; both see each logit chunk only through the row op
(``robust_ce_rows``: ``(m, ls, log w, x)`` per row, ``lse_nt = m + ls``) and the gradient op
(``robust_ce_backward``: ``g * coef * (r - e_y)``), so the scheme math is the
backend's, not repeated here.

* **Gradient in forward** (``grad_in_forward=True``; the default for
  ``"mean"``/``"sum"`` when a gradient is needed). One pass over the row
  chunks: ``z_k = h_k W^T + b`` (matmul 1), its rows, and its gradient with
  *provisional* coefficients that are exact up to one factor per chunk.
  For the normalised mean the provisional coefficient of row ``i`` is
  ``s_i exp(log w_i - L_{<=k}) / 2`` where ``L_{<=k}`` is the log-sum-exp of
  ``log w_j + log |s_j|`` over the active rows of chunks ``1..k`` (so
  ``exp(L) = D`` at the end). Then ``grad_h_k = G_k W`` (matmul 2) and
  ``grad_W += G_k^T h_k`` (matmul 3), accumulated in float32 with the
  online rescale ``grad_W <- grad_W * exp(L_{<=k-1} - L_{<=k})`` (as in a
  streaming softmax); ``grad_h_k`` gets its factor ``exp(L_{<=k} - L)`` at
  the end. Nothing ever overflows, for any ``beta``. Unnormalised reductions
  need no rescale (``"mean"`` divides by ``sum_i weight[y_i]``, known from
  the targets). Backward only multiplies the stored gradients by the
  (scalar) upstream gradient, in place. **Cost: 3 matmuls** of ``N x H x V``
  in all, the same as an eager ``linear`` + loss; the gradients (float32
  ``grad_weight``, ``grad_hidden``) are held from forward to backward, and
  they are computed even if ``backward`` is never called.
* **Recompute** (``grad_in_forward=False``; always for ``reduction="none"``,
  whose upstream gradient is per element and unknown in forward, and with a
  ``process_group``). Forward: per chunk ``z_k`` (matmul 1) and its rows;
  then the cross-row step over all rows gives exact ``(m, ls, alpha, beta,
  gamma)`` per row; only ``hidden``, ``weight``, ``target`` and these
  ``(N, 5)`` stats are saved. Backward: per chunk recompute ``z_k`` (matmul 2), write
  ``G_k = g_k * coef * (r - e_y)`` with the per-row upstream gradient
  ``g_k``, then ``grad_h_k = G_k W`` (matmul 3) and ``grad_W += G_k^T h_k``
  (matmul 4). **Cost: 4 matmuls**, one more than eager, and nothing but the
  stats held between forward and backward.

Precision: logits and their gradient chunks have the input's dtype (as eager
logits would); row statistics are float32 (float64 for float64 input);
``grad_weight`` and ``grad_bias`` are accumulated across chunks in float32
(float64) even for bfloat16/float16 inputs and rounded once at the end. The
``grad_weight`` product of a 16-bit chunk runs in the input dtype per
vocabulary block (float32 inside the GEMM, the block rounded once) and is
added in float32, so no second ``V x H`` tensor is allocated -- on GPUs and on
CPUs with native bfloat16 GEMMs (AVX512-BF16, AMX). Other CPUs emulate the
16-bit GEMM; there it runs in float32 on float32 copies of the chunk (ATen has
no CPU matmul with a float32 output). ``_add_grad_weight`` has the error
measurements.

Memory beyond the inputs and the returned gradients: two chunks of
``chunk_size x V`` logits (on CPUs without native 16-bit GEMMs, a float32
copy of the 16-bit gradient chunk too), the ``(N, 7)`` row statistics, and -- for
16-bit weights -- the float32 ``V x H`` accumulator of ``grad_weight``
(which fp32 accumulation requires); with ``grad_in_forward`` also a float32
``N x H`` ``grad_hidden``.

Soft-capping
------------
``softcap=c`` computes the loss of ``c * tanh(z / c)`` (Gemma 2's final
logit soft-capping) instead of ``z``. Each chunk of logits is capped in place
before its row op; its gradient chunk ``G_k`` (with respect to the capped
logits) is multiplied by ``dz_c / dz = 1 - (z_c / c)^2`` before the matmuls,
on both paths. No extra chunk is held.

``torch.compile(fullgraph=True)`` traces both paths without a graph break
(tested with ``backend="aot_eager"``); the chunk loop is unrolled, so the
graph grows with ``N / chunk_size``. Host synchronisation on GPUs: none;
bad targets stop the stream with the backends' device-side assertion, and
``set_validate_targets(True)`` checks them on the host once per call (one
synchronisation) before the first chunk.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from dataclasses import replace

from . import _finalize, backends
from ._common import (
    ROW_COLS,
    KernelSpec,
    Reduction,
    acc_dtype,
    check_target,
    real_scalar,
    validating_targets,
)
from .functional import check_class_weight, check_not_differentiable, check_target_dtype, kernel_spec, scale_loss
from .schemes import Scheme

__all__ = ["linear_robust_cross_entropy", "LinearRobustCrossEntropyLoss"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Default chunk: about 2^23 logits (32 MiB in float32), at least 256 rows: on
# a 2-core CPU at (N, H, V) = (4096, 1024, 50257) fp32, forward + backward
# took 11.0 s of CPU with 166-row chunks, 10.7 s with 256, 9.7 s with 512
# (the row-chunked GEMMs lose efficiency as M shrinks).
_CHUNK_ELEMENTS = 1 << 23
_MIN_CHUNK_ROWS = 256
# Vocabulary block of the bfloat16/float16 grad_weight product before it is
# added to the float32 accumulator.
_VOCAB_BLOCK = 4096


def _cpu_flags() -> frozenset:
    """This CPU's feature flags from /proc/cpuinfo (empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


# Read once, at import: torch.compile cannot trace a file read inside the loss.
_FLAGS = _cpu_flags()
_CPU_FAST_16BIT = {
    torch.bfloat16: bool(_FLAGS & {"avx512_bf16", "amx_bf16"}),
    torch.float16: "amx_fp16" in _FLAGS,
}


def _cpu_fast_16bit_gemm(dtype: torch.dtype) -> bool:
    """Whether this CPU multiplies ``dtype`` matrices natively (oneDNN then runs them faster than float32).

    bfloat16 with AVX512-BF16 or AMX-BF16: measured on an AMD EPYC with
    AVX512-BF16, a (256 x 32000)^T (256 x 512) product took 0.12 s per 5 in
    bfloat16 and 0.34 s in float32 on float32 copies. float16 without AMX-FP16
    is emulated (23x slower than the upcast there), so it is not picked;
    neither is anything on a CPU whose flags cannot be read.
    """
    return _CPU_FAST_16BIT.get(dtype, False)


def _logits(h: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    if bias is None:
        return torch.mm(h, weight.t())
    return torch.addmm(bias, h, weight.t())


def _add_grad_weight(
    acc: torch.Tensor, gl: torch.Tensor, h: torch.Tensor, decay: Optional[torch.Tensor] = None, upcast=None
) -> None:
    """acc <- decay * acc + gl^T h, acc in the accumulation dtype (float32 for 16-bit inputs).

    16-bit chunks take one of two paths. The 16-bit GEMM (GPUs; CPUs that
    multiply the dtype natively, :func:`_cpu_fast_16bit_gemm`) runs per
    vocabulary block, accumulating in float32 inside the GEMM; each block
    product is rounded once to the input dtype and added to ``acc`` in
    float32. With ``upcast`` (default on other CPUs, where the float32 GEMM
    is the fast one) the product runs in float32 on float32 copies of the
    chunk and nothing is rounded before the end. Either way the sum across
    chunks is float32: the returned 16-bit ``grad_weight`` is rounded once
    more, and that final rounding dominates (bfloat16, 2048 x 512 x 32000,
    random chunks of 256 rows: max error 3.3e-3 of max |grad_W| upcast, 3.9e-3 with the
    16-bit GEMM, against 1.8e-3 before the final rounding).
    """
    on_cpu = acc.device.type == "cpu"
    if decay is not None and on_cpu and not torch.compiler.is_compiling():
        # On CPU reading the scalar costs nothing and lets the GEMM apply it
        # (its beta) instead of a separate pass over the V x H accumulator.
        beta = float(decay)
    else:
        beta = 1.0
        if decay is not None:
            acc.mul_(decay)
    if upcast is None:
        upcast = on_cpu and gl.dtype != acc.dtype and not _cpu_fast_16bit_gemm(gl.dtype)
    if gl.dtype != acc.dtype and upcast:
        gl, h = gl.to(acc.dtype), h.to(acc.dtype)
    if gl.dtype == acc.dtype:
        acc.addmm_(gl.t(), h, beta=beta)
        return
    v = gl.shape[1]
    for v0 in range(0, v, _VOCAB_BLOCK):
        v1 = min(v0 + _VOCAB_BLOCK, v)
        block = acc[v0:v1]
        if beta != 1.0:
            block.mul_(beta)  # block by block: the accumulator is read once
        block.add_(torch.mm(gl[:, v0:v1].t(), h))


def _softcap_(z: torch.Tensor, cap: float) -> torch.Tensor:
    """z <- cap * tanh(z / cap) in place (in the order Gemma 2 rounds it)."""
    return z.div_(cap).tanh_().mul_(cap)


def _softcap_grad_(gl: torch.Tensor, zc: torch.Tensor, cap: float) -> None:
    """gl <- gl * (1 - (zc / cap)^2), the chain rule through the cap; overwrites zc."""
    gl.mul_(zc.div_(cap).square_().neg_().add_(1))


def _chunks(n: int, chunk: int):
    return [(s, min(s + chunk, n)) for s in range(0, n, chunk)]


def _finalize_all(backend, rows, target, spec, cw, sw, group):
    if group is None:
        return backend.finalize(rows, target, spec, cw, sw)
    from .distributed import finalize_distributed  # lazily: torch.distributed is optional

    return finalize_distributed(rows, target, spec, cw, sw, group)


class _LinearRobustCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, target, cw, sw, spec: KernelSpec, chunk, backend, group, gif, cap):
        n = hidden.shape[0]
        v, hdim = weight.shape
        acc = acc_dtype(hidden.dtype)
        # A chunk's provisional coefficients: its own derivative-normalised
        # mean (rescaled below), or the plain sum ("mean" divides at the end).
        chunk_normalised = replace(spec, reduction=Reduction.MEAN, normalize=True)
        chunk_sum = replace(spec, reduction=Reduction.SUM, normalize=False)
        needs_h, needs_w, needs_b = ctx.needs_input_grad[:3]
        rows = torch.empty((n, ROW_COLS), dtype=acc, device=hidden.device)

        if gif:
            gh = torch.empty((n, hdim), dtype=acc, device=hidden.device) if needs_h else None
            gw = torch.zeros((v, hdim), dtype=acc, device=hidden.device) if needs_w else None
            gb = torch.zeros((v,), dtype=acc, device=hidden.device) if needs_b else None
            one = torch.ones((), dtype=acc, device=hidden.device)
            ninf = torch.full((), -math.inf, dtype=acc, device=hidden.device)
            l_run = ninf
            l_after = []  # L_{<=k}: the reference of chunk k's provisional coefficients

        for s, e in _chunks(n, chunk):
            z = _logits(hidden[s:e], weight, bias)
            if cap is not None:
                _softcap_(z, cap)
            t = target[s:e]
            rows_k = backend.rows(z, t, spec, cw)
            rows[s:e] = rows_k
            if not gif:
                continue
            sw_k = None if sw is None else sw[s:e]
            if spec.normalised:
                # Provisional coef = s exp(log w - L_k) / 2 from the chunk's own
                # normaliser L_k = log sum |s| w, moved to the running reference
                # L_{<=k} by the factor f_k, passed to the gradient op as its
                # upstream scalar (it multiplies every coefficient of the chunk).
                _, st, l_k = backend.finalize(rows_k, t, chunk_normalised, cw, sw_k, log_denominator=True)
                l_new = torch.logaddexp(l_run, l_k)
                dead = l_new == -math.inf
                f_k = torch.where(dead | (l_k == -math.inf), torch.zeros_like(l_k), torch.exp(l_k - l_new))
                f_old = torch.where(dead | (l_run == -math.inf), torch.zeros_like(l_k), torch.exp(l_run - l_new))
                decay = f_old
                if gb is not None:
                    gb.mul_(f_old)
                l_run = l_new
                l_after.append(l_new)
            else:
                # Unnormalised: the coefficients are s times the row's own; "mean" divides at the end.
                _, st = backend.finalize(rows_k, t, chunk_sum, cw, sw_k)
                decay, f_k = None, one
            gl = backend.grad(f_k, z, t, st, spec, cw)
            if cap is not None:
                _softcap_grad_(gl, z, cap)
            del z
            if gh is not None:
                gh[s:e] = torch.mm(gl, weight)
            if gw is not None:
                _add_grad_weight(gw, gl, hidden[s:e], decay)
            if gb is not None:
                gb.add_(gl.sum(0, dtype=acc))
            del gl

        value, stats = _finalize_all(backend, rows, target, spec, cw, sw, group)
        ctx.gif = gif
        ctx.dtypes = (hidden.dtype, weight.dtype, weight.dtype)
        ctx.spec = spec
        ctx.chunk = chunk
        ctx.backend = backend
        ctx.cap = cap
        if gif:
            if spec.normalised:
                if gh is not None:
                    for (s, e), l_k in zip(_chunks(n, chunk), l_after):
                        f = torch.where(l_k == -math.inf, torch.zeros_like(l_k), torch.exp(l_k - l_run))
                        gh[s:e].mul_(f)
            elif spec.reduction == Reduction.MEAN:
                _, _, cw_rows = _finalize.sample_scale(target, cw, None, spec, acc)
                denom = cw_rows.sum()
                inv = torch.where(denom != 0, 1 / torch.where(denom != 0, denom, one), torch.zeros_like(denom))
                for g in (gh, gw, gb):
                    if g is not None:
                        g.mul_(inv)
            ctx.save_for_backward(gh, gw, gb)
        else:
            ctx.save_for_backward(hidden, weight, bias, target, stats, spec.smooth_weight(cw))
        return value

    @staticmethod
    def backward(ctx, grad):
        if torch.is_grad_enabled():  # create_graph=True: refuse rather than drop the second-order term
            raise RuntimeError("robustloss: double backward (create_graph=True) is not supported")
        if ctx.gif:
            return _LinearRobustCE._backward_stored(ctx, grad)
        hidden, weight, bias, target, stats, u = ctx.saved_tensors
        needs_h, needs_w, needs_b = ctx.needs_input_grad[:3]
        acc = stats.dtype
        grad = grad.to(acc)
        gh = torch.empty_like(hidden) if needs_h else None
        gw = torch.zeros(weight.shape, dtype=acc, device=weight.device) if needs_w else None
        gb = torch.zeros(weight.shape[:1], dtype=acc, device=weight.device) if needs_b else None
        for s, e in _chunks(hidden.shape[0], ctx.chunk):
            z = _logits(hidden[s:e], weight, bias)
            if ctx.cap is not None:
                _softcap_(z, ctx.cap)
            g = grad[s:e] if grad.dim() == 1 else grad
            gl = ctx.backend.grad(g, z, target[s:e], stats[s:e], ctx.spec, u)
            if ctx.cap is not None:
                _softcap_grad_(gl, z, ctx.cap)
            del z
            if gh is not None:
                torch.mm(gl, weight, out=gh[s:e])
            if gw is not None:
                _add_grad_weight(gw, gl, hidden[s:e])
            if gb is not None:
                gb.add_(gl.sum(0, dtype=acc))
            del gl
        gw = None if gw is None else gw.to(weight.dtype)
        gb = None if gb is None else gb.to(weight.dtype)
        return (gh, gw, gb) + (None,) * 9

    @staticmethod
    def _backward_stored(ctx, grad):
        gh, gw, gb = ctx.saved_tensors
        compiling = torch.compiler.is_compiling()
        # On CPU the scalar is free to read: skip the pass over V x H when it is 1.
        unit = not compiling and grad.device.type == "cpu" and float(grad) == 1.0
        out = []
        for g, dt in zip((gh, gw, gb), ctx.dtypes):
            if g is None:
                out.append(None)
            elif compiling:
                out.append((g * grad.to(g.dtype)).to(dt))
            else:
                # In place: a second backward through this graph then fails
                # autograd's saved-tensor version check instead of going wrong
                # (with a unit upstream gradient nothing changes and none is needed).
                if not unit:
                    g.mul_(grad.to(g.dtype))
                out.append(g.to(dt))
        return tuple(out) + (None,) * 9


def _check(hidden, weight, bias, target, class_weight, sample_weight):
    if not all(isinstance(x, torch.Tensor) for x in (hidden, weight, target)):
        raise TypeError("hidden, weight and target must be tensors")
    if hidden.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"hidden must be float16, bfloat16, float32 or float64, got {hidden.dtype}")
    if weight.dtype != hidden.dtype or (bias is not None and bias.dtype != hidden.dtype):
        raise TypeError(
            f"hidden, weight and bias must share one dtype, got {hidden.dtype}, {weight.dtype}"
            + ("" if bias is None else f", {bias.dtype}")
        )
    if hidden.dim() < 1:
        raise ValueError("hidden must have shape (N, H), (B, T, H) or (..., H)")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight must have shape (V, H) with H = hidden.shape[-1] = {hidden.shape[-1]}, got {tuple(weight.shape)}"
        )
    if weight.shape[0] < 1:
        raise ValueError("weight must have at least one row (V >= 1 classes)")
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (weight.shape[0],)):
        raise ValueError(f"bias must have shape ({weight.shape[0]},)")
    check_target_dtype(target)
    if tuple(target.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"target shape {tuple(target.shape)} must equal hidden.shape[:-1] = {tuple(hidden.shape[:-1])}"
        )
    for name, x in (("weight", weight), ("bias", bias), ("target", target), ("class_weight", class_weight),
                    ("sample_weight", sample_weight)):
        if x is not None and x.device != hidden.device:
            raise ValueError(f"{name} is on {x.device} but hidden is on {hidden.device}")
    if class_weight is not None:
        check_class_weight(class_weight, weight.shape[0], hidden.device, "class_weight")
    if sample_weight is not None:
        if not sample_weight.dtype.is_floating_point or tuple(sample_weight.shape) != tuple(target.shape):
            raise ValueError(f"sample_weight must be a floating tensor shaped like target {tuple(target.shape)}")


def linear_robust_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    scheme: Scheme,
    *,
    bias: Optional[torch.Tensor] = None,
    class_weight: Optional[torch.Tensor] = None,
    sample_weight: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    normalize: Optional[bool] = None,
    chunk_size: Optional[int] = None,
    backend: str = "auto",
    process_group=None,
    grad_in_forward: Optional[bool] = None,
    label_smoothing: float = 0.0,
    softcap: Optional[float] = None,
) -> torch.Tensor:
    r"""``robust_cross_entropy(hidden @ weight.T + bias, target, scheme, ...)`` without the logits.

    The rows are processed ``chunk_size`` at a time; at most one chunk of
    logits and one of their gradient exist at once. See the module docstring
    for the two exact treatments of the cross-row normaliser ``D`` and their
    cost: **3 matmuls** (``grad_in_forward=True``) or **4 matmuls**
    (recompute in backward) of size ``N x H x V`` per forward + backward.

    Args:
        hidden: ``(N, H)``, ``(B, T, H)`` or ``(..., H)``; float32, float64,
            bfloat16 or float16.
        weight: ``(V, H)`` output projection (same dtype as ``hidden``).
        target: class indices shaped ``hidden.shape[:-1]``, each in ``[0, V)``
            or ``ignore_index``.
        scheme: a scheme of :mod:`robustloss_fast.schemes`.
        bias: optional ``(V,)``.
        class_weight: optional per-class weights ``(V,)`` (the ``weight`` of
            :func:`robust_cross_entropy`).
        sample_weight: optional per-element weights shaped like ``target``.
        ignore_index, reduction, normalize, label_smoothing: as in
            :func:`robust_cross_entropy` (``label_smoothing`` with ``CCE()``
            only; ``class_weight`` then weighs the smoothing sum, as there).
        chunk_size: rows per chunk; default ``2**23 // V``, at least 256.
        backend: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"triton"`` or ``"torch"``
            (chosen as in :func:`robust_cross_entropy`); the chunk matmuls are
            ATen's, the row and gradient passes the backend's ops.
        process_group: with a ``torch.distributed`` group, ``D`` is taken over
            the whole group's batch (see :mod:`robustloss_fast.distributed`);
            uses the recompute path.
        grad_in_forward: ``None`` (default) picks the 3-matmul path for
            ``"mean"``/``"sum"`` when a gradient is needed and no
            ``process_group`` is given; ``False`` forces the recompute path.
            ``True`` is refused for ``"none"`` (its upstream gradient is per
            element). After a ``grad_in_forward`` forward, only one backward
            may run through the graph (the stored gradients are scaled in
            place; a second backward raises autograd's in-place error).

        softcap: ``None`` or a positive ``c``: the logits are
            ``c * tanh((hidden @ weight.T + bias) / c)`` (final logit
            soft-capping, as in Gemma 2), in value and gradient.

    Returns:
        The loss as :func:`robust_cross_entropy` returns it (float32 for 16-bit
        inputs; shaped like ``target`` for ``reduction="none"``).
    """
    spec = kernel_spec(scheme, reduction, normalize, ignore_index, label_smoothing)
    check_not_differentiable(class_weight=class_weight, sample_weight=sample_weight)
    _check(hidden, weight, bias, target, class_weight, sample_weight)
    if grad_in_forward and (spec.reduction == Reduction.NONE or process_group is not None):
        raise ValueError("grad_in_forward=True needs reduction 'mean' or 'sum' and no process_group")
    if softcap is not None:
        # A cap given as any real scalar (a NumPy or one-element tensor included), named if not.
        softcap = real_scalar(softcap, "softcap")
        if not 0 < softcap < math.inf:
            raise ValueError(f"softcap must be None or a positive finite number, got {softcap!r}")
    be = backends.resolve(backend, hidden.device)

    v, hdim = weight.shape
    h2 = hidden.reshape(-1, hdim)
    if not h2.is_contiguous():
        h2 = h2.contiguous()
    if weight.stride(-1) != 1:
        weight = weight.contiguous()
    n = h2.shape[0]
    t = target.reshape(-1).long()
    if chunk_size is None:
        chunk = max(_MIN_CHUNK_ROWS, _CHUNK_ELEMENTS // v)
    else:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
        chunk = chunk_size
    chunk = max(1, min(chunk, n))
    acc = acc_dtype(hidden.dtype)
    cw = None if class_weight is None else class_weight.to(acc).contiguous()
    sw = None if sample_weight is None else sample_weight.reshape(-1).to(acc).contiguous()
    if (t.device.type == "cpu" or validating_targets()) and not torch.compiler.is_compiling():
        # Free on the CPU (a GPU pays one sync: opt-in), and it names the position
        # in the whole batch (a backend's own check sees one chunk at a time).
        check_target(t, v, ignore_index)

    needs_grad = torch.is_grad_enabled() and any(
        x is not None and x.requires_grad for x in (hidden, weight, bias)
    )
    if grad_in_forward is None:
        grad_in_forward = spec.reduction != Reduction.NONE and process_group is None
    gif = bool(grad_in_forward) and needs_grad

    value = _LinearRobustCE.apply(h2, weight, bias, t, cw, sw, spec, chunk, be, process_group, gif, softcap)
    value = scale_loss(value, spec)
    if spec.reduction == Reduction.NONE:
        value = value.reshape(target.shape)
    return value


class LinearRobustCrossEntropyLoss(nn.Module):
    """Module form of :func:`linear_robust_cross_entropy`.

    ``forward(hidden, weight, target, bias=None, sample_weight=None)``; the
    output layer's ``weight``/``bias`` are passed in (as with Liger's fused
    linear cross-entropy) so the module can sit after any ``nn.Linear``.
    ``class_weight`` is a registered buffer.
    """

    def __init__(
        self,
        scheme: Scheme,
        class_weight: Optional[torch.Tensor] = None,
        ignore_index: int = -100,
        reduction: str = "mean",
        normalize: Optional[bool] = None,
        chunk_size: Optional[int] = None,
        backend: str = "auto",
        process_group=None,
        grad_in_forward: Optional[bool] = None,
        label_smoothing: float = 0.0,
        softcap: Optional[float] = None,
    ):
        super().__init__()
        kernel_spec(scheme, reduction, normalize, ignore_index, label_smoothing)  # fail at construction
        self.scheme = scheme
        self.register_buffer("class_weight", class_weight)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.normalize = normalize
        self.chunk_size = chunk_size
        self.backend = backend
        self.process_group = process_group
        self.grad_in_forward = grad_in_forward
        self.label_smoothing = label_smoothing
        self.softcap = softcap

    def forward(self, hidden, weight, target, bias=None, sample_weight=None):
        return linear_robust_cross_entropy(
            hidden,
            weight,
            target,
            self.scheme,
            bias=bias,
            class_weight=self.class_weight,
            sample_weight=sample_weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            normalize=self.normalize,
            chunk_size=self.chunk_size,
            backend=self.backend,
            process_group=self.process_group,
            grad_in_forward=self.grad_in_forward,
            label_smoothing=self.label_smoothing,
            softcap=self.softcap,
        )

    def extra_repr(self) -> str:
        return f"scheme={self.scheme!r}, ignore_index={self.ignore_index}, reduction={self.reduction!r}"
