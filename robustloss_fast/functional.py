"""The functional API: ``robust_cross_entropy`` and its shortcuts.

Shapes and flags are checked and canonicalised here, once, to 2-D rows
``(N, C)``; the backend computes on rows; the result is restored to the shape
of ``target`` for ``reduction="none"``. Target *values* are checked inside the
op (a data-dependent check here would break ``torch.compile(fullgraph=True)``).
"""

from __future__ import annotations

from typing import Optional

import torch

from . import backends, distributed
from ._common import (
    NORMALIZE_TWO_TERM_MSG,
    Kernel,
    KernelSpec,
    Reduction,
    acc_dtype,
    check_target,
    int64_scalar,
    real_scalar,
    validating_targets,
)
from .schemes import CCE, DM, IMAE, Scheme

__all__ = ["robust_cross_entropy", "dm_loss", "imae_loss", "available_backends", "kernel_spec"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

available_backends = backends.available_backends


#: Target dtypes: F.cross_entropy's int64 and uint8, and int32 besides (what many
#: data pipelines produce; it is widened once, here).
TARGET_DTYPES = (torch.int64, torch.int32, torch.uint8)


def check_target_dtype(target: torch.Tensor) -> None:
    if target.dtype.is_floating_point or target.dtype.is_complex:
        raise TypeError(
            f"target must hold integer class indices (int64, int32 or uint8), got {target.dtype}; "
            "class-probability targets are not supported"
        )
    if target.dtype not in TARGET_DTYPES:
        raise TypeError(f"target must hold class indices as int64, int32 or uint8, got {target.dtype}")


def check_class_weight(weight, num_classes: int, device, name: str = "weight") -> None:
    """A class-weight vector: a floating tensor of shape (C,) on the input's device (any floating dtype:
    it is used in the accumulation dtype)."""
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{name} must be a floating tensor of shape ({num_classes},), got {type(weight).__name__}")
    if not weight.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating tensor of shape ({num_classes},), got {weight.dtype}")
    if tuple(weight.shape) != (num_classes,):
        raise ValueError(f"{name} must have shape ({num_classes},) (one per class), got {tuple(weight.shape)}")
    if weight.device != device:
        raise ValueError(f"{name} is on {weight.device} but input is on {device}")


def _canonical(input: torch.Tensor, target: torch.Tensor, sample_weight: Optional[torch.Tensor]):
    """(logits (N, C), target (N,), sample_weight (N,) or None, shape of the per-element output)."""
    if not isinstance(input, torch.Tensor) or not isinstance(target, torch.Tensor):
        raise TypeError("input and target must be tensors")
    if input.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"input must be float16, bfloat16, float32 or float64 logits, got {input.dtype}")
    check_target_dtype(target)
    if input.device != target.device:
        raise ValueError(f"input is on {input.device} but target is on {target.device}")
    if input.dim() == 0:
        raise ValueError("input must have at least one dimension (the classes)")

    if input.dim() == 1:
        expected = ()
    else:
        expected = (input.shape[0],) + tuple(input.shape[2:])
    if tuple(target.shape) != expected:
        raise ValueError(
            f"target shape {tuple(target.shape)} does not match input shape {tuple(input.shape)}: "
            f"expected {expected} (input (N, C, d1, ...) takes target (N, d1, ...))"
        )
    c = input.shape[0] if input.dim() == 1 else input.shape[1]
    if c < 1:
        raise ValueError("input must have at least one class (C >= 1)")

    if sample_weight is not None:
        if not isinstance(sample_weight, torch.Tensor):
            raise TypeError("sample_weight must be a tensor")
        if not sample_weight.dtype.is_floating_point:
            raise TypeError(f"sample_weight must be a floating tensor, got {sample_weight.dtype}")
        if tuple(sample_weight.shape) != tuple(target.shape):
            raise ValueError(
                f"sample_weight shape {tuple(sample_weight.shape)} must equal target shape {tuple(target.shape)}"
            )
        if sample_weight.device != input.device:
            raise ValueError(f"sample_weight is on {sample_weight.device} but input is on {input.device}")

    if input.dim() == 1:
        logits = input.unsqueeze(0)
    elif input.dim() == 2:
        logits = input
    else:
        logits = input.movedim(1, -1).reshape(-1, c)
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    # A 1-D int64 target is already the rows' (a view of it costs ~1 us of host time per call).
    rows_target = target if target.dim() == 1 and target.dtype == torch.int64 else target.reshape(-1).long()
    rows_sw = None
    if sample_weight is not None:
        rows_sw = sample_weight.reshape(-1).to(acc_dtype(input.dtype)).contiguous()
    return logits, rows_target, rows_sw, tuple(target.shape)


#: KernelSpecs of plain-typed argument sets already validated: a training loop
#: passes the same ones every step, and their checks cost ~2 us of a small-C
#: step's host time (benchmarks/NOTES.md). Cleared when full: a schedule that
#: changes a scheme's parameters every step only refills it.
_SPECS: dict = {}
_SPECS_MAX = 256


def kernel_spec(
    scheme: Scheme,
    reduction: str = "mean",
    normalize: Optional[bool] = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
) -> KernelSpec:
    """Validate the non-tensor arguments of a loss and fold them with the scheme into its ``KernelSpec``.

    The one place where a scheme and the flags become what the backends see:
    the kernel formula and its parameters (label smoothing is CCE's own
    formula, ``Kernel.CCE_LS`` with ``a = eps``), the loss scale, the
    reduction, ``normalize`` with the scheme's default, and ``ignore_index``.
    """
    # Only exact built-in types are looked up (True == 1 must not find an int's entry), and not while
    # Dynamo traces (it would guard on the cache's contents).
    key = None
    if (type(reduction) is str and type(ignore_index) is int and type(label_smoothing) is float
            and (normalize is None or type(normalize) is bool) and not torch.compiler.is_compiling()):
        key = (scheme, reduction, normalize, ignore_index, label_smoothing)
        try:
            spec = _SPECS.get(key)
        except TypeError:  # a scheme that is not hashable
            key = spec = None
        if spec is not None:
            return spec
    spec = _validated_spec(scheme, reduction, normalize, ignore_index, label_smoothing)
    if key is not None:
        if len(_SPECS) >= _SPECS_MAX:
            _SPECS.clear()
        _SPECS[key] = spec
    return spec


def _validated_spec(scheme, reduction, normalize, ignore_index, label_smoothing) -> KernelSpec:
    if not isinstance(scheme, Scheme):
        raise TypeError(f"scheme must be a robustloss_fast.schemes.Scheme (e.g. DM()), got {scheme!r}")
    red = Reduction.parse(reduction)
    if normalize is None:
        normalize = scheme.default_normalize
    if not isinstance(normalize, bool):
        raise TypeError(f"normalize must be a bool or None, got {normalize!r}")
    ignore_index = int64_scalar(ignore_index, "ignore_index")
    label_smoothing = real_scalar(label_smoothing, "label_smoothing")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0.0, 1.0], got {label_smoothing!r}")
    if label_smoothing > 0:
        if type(scheme) is not CCE:
            raise ValueError(
                f"label_smoothing is defined for CCE() only (as in F.cross_entropy), got scheme {scheme!r}; "
                "for robust training with soft labels combine a scheme with ELRLoss or SCE instead"
            )
        kernel, a, b, scale = Kernel.CCE_LS, label_smoothing, 0.0, 1.0
    else:
        a, b = scheme.kernel_params
        kernel, a, b, scale = Kernel(scheme.kernel_id), float(a), float(b), float(scheme.loss_scale)
    spec = KernelSpec(kernel, a, b, scale, red, normalize, ignore_index)
    if spec.two_term and spec.normalised:
        raise ValueError(NORMALIZE_TWO_TERM_MSG)
    return spec


def check_not_differentiable(**tensors) -> None:
    """Weights are constants of the loss (as in F.cross_entropy): refuse ones that require grad.

    A silently missing gradient would break learned re-weighting code; the
    caller should pass ``w.detach()`` if the weights are not to be learned.
    """
    if not torch.is_grad_enabled():
        return
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.requires_grad:
            raise RuntimeError(
                f"robustloss_fast is not differentiable with respect to {name}; pass {name}.detach()"
            )


class _InplaceBackward(torch.autograd.Function):
    """The loss of ``inplace_backward=True``: its backward writes the gradient over the logits.

    Forward is the backend's row pass and its cross-row step
    (``finalize``), so that the per-row stats are at hand; backward
    is the backend's ``grad_inplace``. Safety rests on autograd's version
    counter: the saved logits are checked when backward unpacks them (a
    retained graph's second backward is refused), and the write bumps the
    counter they share with every view of them, so any other node that saved
    them and runs later raises autograd's in-place error instead of reading
    gradients as logits.
    """

    @staticmethod
    def forward(ctx, logits, target, weight, sample_weight, backend, spec: KernelSpec):
        rows = backend.rows(logits, target, spec, weight)
        value, stats = backend.finalize(rows, target, spec, weight, sample_weight)
        ctx.save_for_backward(logits, target, stats, weight)
        ctx.backend, ctx.spec = backend, spec
        return value

    @staticmethod
    def backward(ctx, grad):
        if torch.is_grad_enabled():
            raise RuntimeError("robustloss: double backward (create_graph=True) is not supported")
        logits, target, stats, weight = ctx.saved_tensors
        if torch.compiler.is_compiling():  # compiled autograd: a traced graph plans its own buffers
            return ctx.backend.grad(grad, logits, target, stats, ctx.spec, weight), None, None, None, None, None
        ctx.backend.grad_inplace(grad, logits, target, stats, ctx.spec, weight)
        # A C++ op with an (a!) argument does not bump the version itself; one bump too
        # many (the Triton custom op's own) is harmless.
        torch.autograd.graph.increment_version(logits)
        return logits.detach(), None, None, None, None, None


def _inplace_applies(input: torch.Tensor, logits: torch.Tensor, process_group, vocab_parallel: bool) -> bool:
    """Whether ``inplace_backward=True`` writes into the logits; refuses what it cannot do safely."""
    if process_group is not None or vocab_parallel:
        raise ValueError("inplace_backward=True is not supported with process_group or vocab_parallel")
    owner = input if input._base is None else input._base  # a view writes into its base
    if owner.is_leaf and owner.requires_grad:
        raise ValueError(
            "inplace_backward=True writes the gradient over the logits, but these are (a view of) a leaf "
            "tensor that requires grad (its .grad would be the overwritten logits themselves); compute "
            "them in the graph, or leave inplace_backward off"
        )
    # Under torch.compile Inductor plans the buffers itself; strided rows have no
    # contiguous storage to write into; and saved-tensor hooks (save_on_cpu, checkpointing)
    # switch off autograd's version checks, the guard this option relies on: all three
    # take the ordinary backward.
    return (
        torch.is_grad_enabled()
        and logits.requires_grad
        and logits.is_contiguous()
        and not torch.compiler.is_compiling()
        and not _saved_tensor_hooks_active()
    )


def _saved_tensor_hooks_active() -> bool:
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top is not None and top(False) is not None


def robust_cross_entropy(
    input: torch.Tensor,
    target: torch.Tensor,
    scheme: Scheme,
    *,
    weight: Optional[torch.Tensor] = None,
    sample_weight: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    normalize: Optional[bool] = None,
    label_smoothing: float = 0.0,
    backend: str = "auto",
    process_group=None,
    vocab_parallel: bool = False,
    class_offset: Optional[int] = None,
    inplace_backward: bool = False,
) -> torch.Tensor:
    r"""Robust cross-entropy: the ``softmax - onehot`` direction with the emphasis of ``scheme``.

    For row ``i`` with target ``y``, ``p = softmax(z)_y`` and ``q = 1 - p``, the
    gradient w.r.t. the logits is ``s_i * (w(p_i) / 2) * (r_i - e_y) / D`` where
    ``r`` is the softmax over the non-target classes (so the row's gradient
    has L1 norm ``w(p_i)``), ``s_i = sample_weight_i * weight[y_i]`` and ``D``
    depends on the reduction:

    * ``"none"``: no reduction, ``D = 1``; returns ``s_i * value_i`` shaped
      like ``target``;
    * ``"sum"``: ``D = 1``;
    * ``"mean"``: with ``normalize=True`` (default for derivative-defined
      schemes) ``D = sum_i |s_i| w_i``, the paper's derivative normalisation,
      and the value is ``sum_i s_i w_i (-log p_i) / D``; with
      ``normalize=False`` (default for loss-defined schemes)
      ``D = sum_i weight[y_i]``, exactly ``torch.nn.functional.cross_entropy``'s
      rule.

    ``value_i`` is ``L(p_i)`` for loss-defined schemes (``CCE``, ``MAE``,
    ``MSE``, ``GCE`` and the peers) and ``w_i (-log p_i)`` for
    derivative-defined ones (``DM``, ``IMAE``, ``DMNormal``, ``DMExponential``,
    ``DMBeta``). With ``CCE()`` and ``normalize=False`` this equals
    ``F.cross_entropy``, with ``label_smoothing`` too.

    ``NCE``/``APL`` and label smoothing depend on the whole distribution, not
    on ``p`` alone: their gradient is ``alpha_i r + beta_i u`` off the target
    (``u`` = 1, or the class weights for label smoothing), computed in the same
    fused pass; they have no emphasis ``w(p)``, so ``normalize=True`` is
    refused for them (docs/math.md).

    Args:
        input: logits ``(N, C)``, ``(C,)`` or ``(N, C, d1, ..., dk)``; float16,
            bfloat16, float32 or float64; any strides.
        target: class indices ``(N,)``, ``()`` or ``(N, d1, ..., dk)``; int64,
            int32 or uint8, each in ``[0, C)`` or ``ignore_index``.
        scheme: a scheme from :mod:`robustloss_fast.schemes`.
        weight: per-class weights ``(C,)``, any floating dtype (used in the
            accumulation dtype).
        sample_weight: per-element weights shaped like ``target`` (negative
            values allowed: gradient ascent on those examples).
        ignore_index: target value that contributes nothing.
        reduction: ``"none"``, ``"mean"`` or ``"sum"``.
        normalize: derivative normalisation for ``"mean"`` (ignored otherwise);
            ``None`` picks the scheme's default.
        label_smoothing: in ``[0, 1]``; ``CCE()`` only: the loss is
            ``(1 - eps) CE + eps/C sum_k weight_k (-log P_k)``, exactly
            ``F.cross_entropy(label_smoothing=eps)`` including its ``weight``
            and ``ignore_index`` conventions (class weights weigh every class
            of the smoothing sum; ``"mean"`` divides by ``sum_i weight[y_i]``).
            Two cases differ on purpose: a batch with every row ignored gives
            0 under ``"mean"`` (PyTorch: NaN, SPEC §5), and a masked
            (``-inf``) class with weight 0 adds nothing (PyTorch: NaN).
        backend: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"triton"`` or ``"torch"``
            (the pure-PyTorch reference).
        process_group: a ``torch.distributed`` group (e.g. ``dist.group.WORLD``)
            for data-parallel training: ``D`` is taken over the batch of all
            its ranks (one small collective for ``"mean"``; none for
            ``"sum"``/``"none"``) and the result is ``W`` (the group size)
            times this rank's share of the global loss, so that after DDP
            averages gradients over the ``W`` ranks they equal those of one
            process on the concatenated batch. The global loss is the mean of
            the ranks' values. ``None`` (default): one process, no
            communication (not the default group). See
            :mod:`robustloss_fast.distributed`.
        vocab_parallel: with ``process_group``, ``input`` holds only this
            rank's slice of the classes (tensor-parallel output layer) and the
            rows are the same on every rank; ``weight`` is then the full
            ``(C,)`` vector and the value is the global loss (no ``W`` factor).
        class_offset: first class of this rank's slice for ``vocab_parallel``
            (default ``rank * C_local``).
        inplace_backward: ``True`` makes backward write the gradient over the
            logits' storage instead of a new ``N x C`` tensor (as Liger-Kernel's
            cross-entropy does): at an LLM vocabulary that tensor is the
            largest allocation of the step. The logits then hold their
            gradient after backward: read what you need from them (accuracy,
            argmax) before it. Safe with autograd: if another operation saved
            the same logits for its own backward and runs after this one (e.g.
            ``logits = torch.tanh(x)``), backward raises autograd's in-place
            error instead of computing with overwritten values, and so does a
            second backward through a retained graph -- unless that operation
            saved them under saved-tensor hooks (``save_on_cpu``, activation
            checkpointing), which switch autograd's check off: with hooks active
            at this call the ordinary backward runs, but hooks around an
            earlier operation cannot be seen from here. Refused
            (``ValueError``) for logits that are (a view of) a leaf requiring
            grad and with ``process_group``/``vocab_parallel``. The gradient
            goes wherever the rows are read from: the logits' own storage
            (also a ``(B, C, T)`` view of a ``(B, T, C)`` tensor), or the
            contiguous copy made of rows whose classes are not contiguous.
            Rows that are contiguous only row by row (a slice of a wider
            tensor) get the ordinary out-of-place backward, as do calls under
            ``torch.compile``. The
            ``"torch"`` backend computes the gradient aside and copies it in
            (same numbers, no memory saved).

    Returns:
        The loss: float32 for float16/bfloat16 input, else the input's dtype.
        Raw (un-normalised) weights ``exp(beta ...)`` can overflow for large
        ``|beta|`` with ``"none"``, ``"sum"`` or ``normalize=False``; the
        normalised ``"mean"`` never does.
    """
    spec = kernel_spec(scheme, reduction, normalize, ignore_index, label_smoothing)
    if weight is not None or sample_weight is not None:
        check_not_differentiable(weight=weight, sample_weight=sample_weight)
    logits, rows_target, rows_sw, out_shape = _canonical(input, target, sample_weight)
    c = logits.shape[1]
    be = backends.resolve(backend, input.device)
    inplace = bool(inplace_backward) and _inplace_applies(input, logits, process_group, vocab_parallel)
    if vocab_parallel:
        if process_group is None:
            raise ValueError("vocab_parallel=True needs the process_group that holds the class slices")
        value = distributed.vocab_parallel_cross_entropy_rows(
            be, logits, rows_target, spec, weight, rows_sw, process_group, class_offset
        )
    else:
        if class_offset is not None:
            raise ValueError("class_offset is only used with vocab_parallel=True")
        if validating_targets() and not torch.compiler.is_compiling():
            # Opt-in: the host names a bad value before a GPU kernel asserts on it (one sync).
            check_target(rows_target, c, spec.ignore_index)
        if weight is not None:
            check_class_weight(weight, c, input.device)
            weight = weight.to(acc_dtype(input.dtype)).contiguous()
        if process_group is not None:
            value = distributed.robust_cross_entropy_rows(be, logits, rows_target, spec, weight, rows_sw, process_group)
        elif inplace:
            value = _InplaceBackward.apply(logits, rows_target, weight, rows_sw, be, spec)
        else:
            value = be.loss(logits, rows_target, spec, weight, rows_sw)
    value = scale_loss(value, spec)
    if spec.reduction == Reduction.NONE:
        value = value.reshape(out_shape)
    return value


def scale_loss(value: torch.Tensor, spec: KernelSpec) -> torch.Tensor:
    """The spec's constant loss scale (APL's alpha with NFL), applied once, outside the kernels."""
    return value if spec.scale == 1.0 else value * spec.scale


def dm_loss(input: torch.Tensor, target: torch.Tensor, lam: float = 1.0, beta: float = 8.0, **kwargs) -> torch.Tensor:
    """``robust_cross_entropy`` with ``DM(lam, beta)``: w = exp(beta p^lam (1 - p))."""
    return robust_cross_entropy(input, target, DM(lam=lam, beta=beta), **kwargs)


def imae_loss(input: torch.Tensor, target: torch.Tensor, T: float = 8.0, **kwargs) -> torch.Tensor:
    """``robust_cross_entropy`` with ``IMAE(T)``: w = exp(T p (1 - p))."""
    return robust_cross_entropy(input, target, IMAE(T=T), **kwargs)
