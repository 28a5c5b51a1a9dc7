r"""Robust losses for Hugging Face ``transformers`` models in one line.

Three entry points:

* :func:`patch_causal_lm` -- a loaded ``*ForCausalLM`` (Llama, Mistral,
  Qwen2/Qwen3, Gemma/Gemma2/Gemma3 text, Phi3) computes its training loss with
  :func:`~robustloss_fast.linear_robust_cross_entropy` on the last hidden
  states and ``lm_head``'s weight: with ``labels`` in training mode the
  ``(tokens x vocabulary)`` logits are never materialised and the output's
  ``logits`` is ``None``. The label shift, ``ignore_index``, Gemma's final
  logit soft-capping, ``shift_labels`` and ``num_items_in_batch`` are those
  of transformers' ``ForCausalLMLoss``. Without ``labels`` (generation) the
  model is untouched; in evaluation mode the logits are computed as usual and
  the loss is the scheme's on them.
* :func:`patch_classifier` -- a ``*ForSequenceClassification`` or
  ``*ForTokenClassification`` (BERT, RoBERTa, DeBERTa, ModernBERT, the
  decoder families' heads, ...) with a single-label problem: the model's loss
  becomes the scheme's on its logits.
* :class:`RobustTrainerLoss` -- ``Trainer(compute_loss_func=RobustTrainerLoss(DM()))``:
  the Trainer's hook, computed from the logits the model returns.

:func:`apply_robust_loss` picks the patch from the model's class;
:func:`unpatch` undoes it. The patch is per instance: it wraps ``model.forward``
(keeping its signature, which the Trainer and ``generate`` inspect) and
changes neither the class, the parameters nor the state dict.

Gradient accumulation and ``num_items_in_batch``
------------------------------------------------
The Trainer accumulates ``M`` micro-batches (over all ranks with
``average_tokens_across_devices``) and passes each forward
``N = num_items_in_batch``, the number of targets that are not ignored in the
whole accumulated batch; it then adds the micro-batches' losses without
dividing by ``M``. With ``n_m`` the targets of micro-batch ``m`` and
``g_i = (softmax - onehot)`` of target ``i``:

* **Loss-defined schemes** (``CCE``, ``MAE``, ``GCE``, ``SCE``, ``NCE``, ...,
  i.e. ``normalize=False``): ``loss_m = sum_{i in m} L_i / N``, transformers'
  own rule (``reduction="sum"`` divided by ``N``). The accumulated gradient is
  exactly that of the mean over the accumulated batch; with ``CCE()`` it is
  transformers' loss.
* **Derivative-normalised schemes** (``DM``, ``IMAE``, ``DMNormal``, ...,
  ``normalize=True``): the paper normalises by ``D = sum_i w_i`` over the batch,
  which needs every micro-batch's weights before the first backward. We
  normalise **per micro-batch** and weigh each micro-batch by its share of
  the targets: ``loss_m = (n_m / N) * sum_{i in m} w_i (-log p_i) / D_m`` with
  ``D_m = sum_{i in m} w_i``. The accumulated gradient is
  ``(1/N) sum_m sum_{i in m} (w_i / wbar_m) g_i`` with ``wbar_m = D_m / n_m``,
  the micro-batch's mean emphasis, where the paper's is
  ``(1/N) sum_i (w_i / wbar) g_i`` with the accumulated batch's ``wbar = D / N``.
  Both give the step one unit of emphasis in all (the weights ``w_i / (N wbar)``
  sum to 1), and they are equal when every micro-batch has the same mean
  emphasis -- in particular without accumulation (``M = 1``). Otherwise an
  example is weighed against its own micro-batch only: a micro-batch of easy
  (or of hard) examples gets ``n_m / N`` of the step however large its
  emphasis, so the normalisation acts on the micro-batch, not on the
  accumulated batch. Exactness would need a forward pass over all
  micro-batches before the first backward. When the emphasis must be compared
  across the whole batch, use larger micro-batches, or ``normalize=False``
  (raw weights, accumulated exactly, but without the normalisation's fixed
  gradient scale, and overflowing for ``|beta|`` in the hundreds).

Without ``num_items_in_batch`` (a plain ``model(...)`` call, or a Trainer that
does not pass it) the loss is the scheme's ``reduction="mean"`` over the call.

Supported: single-label targets; ``labels`` and ``shift_labels`` as
transformers takes them; float32/float64/bfloat16/float16 and autocast.
Not supported (refused with an error): vision-language and other multimodal
models, mixture-of-experts models with a router loss, ``lm_head`` adapters
(e.g. LoRA on the output layer), multi-label and regression heads, any
transform of ``lm_head``'s output other than the soft-capping named in the
config (checked once, on the first patched training call), and
``torch.nn.DataParallel`` (its replicas would call the original module's
forward; use DDP).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import types
from collections.abc import Mapping
from typing import Any, Callable, Optional

import torch
from torch import nn

from ..functional import kernel_spec, robust_cross_entropy
from ..linear import linear_robust_cross_entropy
from ..schemes import Scheme

__all__ = [
    "apply_robust_loss",
    "patch_causal_lm",
    "patch_classifier",
    "unpatch",
    "is_patched",
    "RobustTrainerLoss",
    "TESTED_CAUSAL_LM_TYPES",
]

# Families whose causal-LM forward is checked by tests/test_transformers.py:
# lm_head on the last hidden states, then optionally the config's soft-capping.
TESTED_CAUSAL_LM_TYPES = frozenset(
    {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3"}
)
_CLASSIFIER_SUFFIXES = ("ForSequenceClassification", "ForTokenClassification")
_STATE = "_robustloss_patch"
# Values lm_head returns in place of the logits while the fused loss runs;
# what the forward makes of them shows how it transforms real logits
# (identity, or the config's soft-capping). Exact in every float dtype.
_PROBE = (-40.0, -3.0, 0.5, 24.0)


# ----------------------------------------------------------------------------
# The loss of one call, with transformers' normalisation across micro-batches


def _accumulated(compute: Callable[[str], torch.Tensor], target: torch.Tensor, ignore_index: int,
                 normalize: bool, num_items_in_batch) -> torch.Tensor:
    """The loss of one micro-batch under the module docstring's rule.

    ``compute(reduction)`` is the scheme's loss over the micro-batch.
    """
    if num_items_in_batch is None:
        return compute("mean")
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(target.device)
    if normalize:
        share = (target != ignore_index).sum() / num_items_in_batch
        return compute("mean") * share
    return compute("sum") / num_items_in_batch


def _shifted(labels: Optional[torch.Tensor], shift_labels: Optional[torch.Tensor], ignore_index: int):
    """Targets aligned with the positions: ``labels[t + 1]``, the last position ignored."""
    if shift_labels is not None:
        return shift_labels
    return nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]


class _Options:
    """A patch's (or the Trainer loss's) scheme and flags, validated once."""

    def __init__(self, scheme, *, ignore_index=-100, normalize=None, label_smoothing=0.0, backend="auto",
                 class_weight=None):
        # reduction "mean" is the strictest: it refuses normalize=True where the scheme has no emphasis
        norm = kernel_spec(scheme, "mean", normalize, ignore_index, label_smoothing).normalize
        if class_weight is not None and (not torch.is_tensor(class_weight) or not class_weight.is_floating_point()):
            raise TypeError("class_weight must be a floating tensor of shape (num_labels,)")
        self.scheme = scheme
        self.ignore_index = ignore_index
        self.normalize = normalize
        self.effective_normalize = norm
        self.label_smoothing = label_smoothing
        self.backend = backend
        self.class_weight = class_weight

    def __repr__(self):
        return f"scheme={self.scheme!r}, normalize={self.effective_normalize}, ignore_index={self.ignore_index}"

    def logits_loss(self, logits: torch.Tensor, target: torch.Tensor, num_items_in_batch) -> torch.Tensor:
        """The loss of ``logits (..., C)`` against ``target (...)``."""
        c = logits.shape[-1]
        z = logits.reshape(-1, c)
        t = target.reshape(-1).to(z.device)
        cw = None if self.class_weight is None else self.class_weight.to(z.device)

        def compute(reduction):
            return robust_cross_entropy(z, t, self.scheme, weight=cw, ignore_index=self.ignore_index,
                                        reduction=reduction, normalize=self.normalize,
                                        label_smoothing=self.label_smoothing, backend=self.backend)

        return _accumulated(compute, t, self.ignore_index, self.effective_normalize, num_items_in_batch)


# ----------------------------------------------------------------------------
# Wrapping model.forward


@functools.lru_cache(maxsize=None)
def _positional_names(fn) -> tuple:
    params = list(inspect.signature(fn).parameters.values())[1:]  # after self
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return tuple(p.name for p in params if p.kind in kinds)


def _as_keywords(fn, args: tuple, kwargs: dict) -> dict:
    names = _positional_names(fn)
    if len(args) > len(names):
        raise TypeError(f"forward takes {len(names)} positional arguments but {len(args)} were given")
    for name, value in zip(names, args):
        if name in kwargs:
            raise TypeError(f"forward got multiple values for argument {name!r}")
        kwargs[name] = value
    return kwargs


def _pop_return_dict(model, kwargs: dict) -> bool:
    """Whether the caller wants a tuple; asks the inner forward for a ModelOutput if needed."""
    passed = kwargs.pop("return_dict", None)
    want = passed if passed is not None else getattr(model.config, "return_dict", True)
    if passed is not None or not want:
        kwargs["return_dict"] = True
    return not want


def _with(out, want_tuple: bool, **fields):
    """``out`` (a ModelOutput) with ``fields`` replaced, in the field order of its class."""
    values = dict(out.items())
    values.update(fields)
    new = type(out)(**values)
    return new.to_tuple() if want_tuple else new


class _Patch:
    def __init__(self, kind: str, inner, previous, options: _Options, **extra):
        self.kind = kind
        self.inner = inner  # the function the patch wraps (called with the model as self)
        self.previous = previous  # the instance-level forward before ours, if any
        self.options = options
        self.active = True
        self.checked = False  # the lm_head output transform, checked on the first fused call
        self.__dict__.update(extra)

    def __repr__(self):
        return f"<robustloss_fast {self.kind} patch: {self.options!r}>"


def _install(model, kind: str, options: _Options, **extra):
    state = model.__dict__.get(_STATE)
    if state is not None:
        # Patching again changes the options; the wrapper stays as it is.
        state.options, state.active, state.checked = options, True, False
        state.__dict__.update(extra)
        return model
    bound = model.forward
    if not isinstance(bound, types.MethodType) or bound.__self__ is not model:
        raise TypeError(f"{type(model).__name__}.forward is not a method of the model; cannot patch it")
    inner = bound.__func__

    @functools.wraps(inner)  # keeps the signature: Trainer and generate() read it
    def forward(self, *args, **kwargs):
        st = self.__dict__.get(_STATE)
        if st is None or not st.active:
            return inner(self, *args, **kwargs)
        return (_causal_forward if st.kind == "causal_lm" else _classifier_forward)(self, st, args, kwargs)

    state = _Patch(kind, inner, model.__dict__.get("forward"), options, ours=forward, **extra)
    model.__dict__[_STATE] = state
    # A bound method (not a closure over the model) so that deepcopy rebinds it to the copy.
    model.forward = types.MethodType(forward, model)
    return model


def unpatch(model):
    """Undo :func:`patch_causal_lm` / :func:`patch_classifier`; returns the model.

    The original forward is restored. If something wrapped ``forward`` after
    the patch (e.g. accelerate's mixed-precision wrapper) that wrapper stays
    and the patch inside it becomes a pass-through.
    """
    state = model.__dict__.pop(_STATE, None)
    if state is None:
        return model
    state.active = False
    current = model.__dict__.get("forward")
    if isinstance(current, types.MethodType) and current.__func__ is state.ours:
        if state.previous is None:
            del model.__dict__["forward"]
        else:
            model.__dict__["forward"] = state.previous
    return model


def is_patched(model) -> bool:
    """Whether ``model`` carries an active robustloss_fast patch."""
    state = model.__dict__.get(_STATE)
    return state is not None and state.active


# ----------------------------------------------------------------------------
# Causal language models


def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _softcap_of(model) -> Optional[float]:
    cap = getattr(_text_config(model.config), "final_logit_softcapping", None)
    return None if cap is None else float(cap)


def _check_transform(model, logits: Optional[torch.Tensor], probe: torch.Tensor, cap: Optional[float]) -> None:
    """The forward must turn lm_head's output into logits the fused loss reproduces."""
    name = type(model).__name__
    if logits is None or logits.shape[-1] != probe.numel():
        raise NotImplementedError(
            f"{name}: the forward does not return lm_head's output as its logits; the fused loss cannot stand in"
        )
    got = logits.reshape(-1, probe.numel())[0].detach().double().cpu()
    want = probe.double()
    if cap is not None:
        want = cap * torch.tanh(want / cap)
    eps = torch.finfo(logits.dtype).eps
    if not torch.allclose(got, want, rtol=8 * eps, atol=8 * eps * max(1.0, cap or 1.0)):
        detail = f"soft-capping at {cap}" if cap is not None else "no transform"
        raise NotImplementedError(
            f"{name} transforms lm_head's output in a way the fused loss does not reproduce (config says "
            f"{detail}; lm_head output {probe.tolist()} became {got.tolist()}); use an unpatched model or "
            "RobustTrainerLoss"
        )


def _fused_loss(model, state, hidden, target, num_items_in_batch):
    head = model.get_output_embeddings()
    opts = state.options
    weight, bias = head.weight, head.bias
    h = hidden
    dev = h.device.type
    cast = torch.is_autocast_enabled(dev) if dev in ("cuda", "cpu", "xpu", "mps") else False
    if cast:
        # What lm_head would compute under autocast: the matmul in the autocast dtype.
        dt = torch.get_autocast_dtype(dev)
        h, weight = h.to(dt), weight.to(dt)
        bias = None if bias is None else bias.to(dt)

    def compute(reduction):
        with torch.autocast(dev, enabled=False) if cast else contextlib.nullcontext():
            return linear_robust_cross_entropy(
                h, weight, target, opts.scheme, bias=bias, ignore_index=opts.ignore_index, reduction=reduction,
                normalize=opts.normalize, label_smoothing=opts.label_smoothing, backend=opts.backend,
                chunk_size=state.chunk_size, memory_budget=state.memory_budget, softcap=state.softcap,
            )

    return _accumulated(compute, target, opts.ignore_index, opts.effective_normalize, num_items_in_batch)


def _causal_forward(model, state, args, kwargs):
    kwargs = _as_keywords(state.inner, args, kwargs)
    labels = kwargs.pop("labels", None)
    shift_labels = kwargs.pop("shift_labels", None)
    if labels is None and shift_labels is None:
        return state.inner(model, **kwargs)  # generation, or logits only: untouched
    num_items = kwargs.pop("num_items_in_batch", None)
    want_tuple = _pop_return_dict(model, kwargs)
    opts = state.options
    fused = state.skip_logits if state.skip_logits is not None else model.training

    if not fused:
        out = state.inner(model, **kwargs)
        target = _shifted(labels, shift_labels, opts.ignore_index)
        loss = opts.logits_loss(out.logits, target, num_items)
        return _with(out, want_tuple, loss=loss)

    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        raise NotImplementedError(
            f"{type(model).__name__}'s output layer is a {type(head).__name__}, not nn.Linear (an adapter or a "
            "quantised layer?); the fused loss needs lm_head's plain weight"
        )
    captured = []
    probe = None if state.checked else torch.tensor(_PROBE)

    def capture(h):
        captured.append(h)
        shape = (*h.shape[:-1], len(_PROBE))
        if probe is None:  # checked already: any few values will do
            return h.new_zeros(()).expand(shape).contiguous()
        return probe.to(device=h.device, dtype=h.dtype).expand(shape).contiguous()

    before = head.__dict__.get("forward")
    head.forward = capture
    try:
        out = state.inner(model, **kwargs)
    finally:
        if before is None:
            del head.__dict__["forward"]
        else:
            head.__dict__["forward"] = before
    if len(captured) != 1:
        raise NotImplementedError(
            f"{type(model).__name__}'s forward called lm_head {len(captured)} times; the fused loss expects one call"
        )
    if probe is not None:
        _check_transform(model, out.logits, probe, state.softcap)
        state.checked = True
    # lm_head's own device (a device map may put it apart from the last layer)
    hidden = captured[0].to(head.weight.device)
    target = _shifted(labels, shift_labels, opts.ignore_index).to(hidden.device)
    if tuple(target.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"labels shape {tuple(target.shape)} does not match the positions lm_head saw "
            f"{tuple(hidden.shape[:-1])} (logits_to_keep with labels is not supported)"
        )
    loss = _fused_loss(model, state, hidden, target, num_items)
    return _with(out, want_tuple, loss=loss, logits=None)


def patch_causal_lm(model, scheme: Scheme, *, ignore_index: int = -100, normalize: Optional[bool] = None,
                    label_smoothing: float = 0.0, chunk_size: Optional[int] = None,
                    memory_budget: Optional[int] = None, backend: str = "auto",
                    skip_logits: Optional[bool] = None, allow_untested: bool = False):
    r"""Make a loaded causal LM compute its loss with ``scheme`` through the fused linear + loss.

    ``loss = linear_robust_cross_entropy(h, lm_head.weight, labels shifted by one,
    scheme, softcap=config.final_logit_softcapping)`` with transformers'
    ``num_items_in_batch`` rule (module docstring). With ``CCE()`` this is the
    model's own loss, to rounding.

    Args:
        model: a ``*ForCausalLM`` of a family in ``TESTED_CAUSAL_LM_TYPES``
            (Llama, Mistral, Qwen2, Qwen3, Gemma, Gemma2, Gemma3 text, Phi3).
        scheme: e.g. ``DM(lam=1.0, beta=8.0)``, ``GCE()``, ``CCE()``.
        ignore_index, normalize, label_smoothing, backend, chunk_size,
            memory_budget: as in :func:`~robustloss_fast.linear_robust_cross_entropy`
            (``memory_budget`` bytes bound what the loss holds beyond the
            hidden states, ``lm_head.weight`` and their gradients).
        skip_logits: ``None`` (default): the fused path (no logits returned)
            when ``labels`` are given in training mode, logits and a loss on
            them in evaluation mode. ``True``/``False`` force one of the two.
        allow_untested: patch other causal LMs too. Their lm_head output
            transform is still checked on the first call; anything else their
            forward adds to the loss (e.g. a router loss) would be lost.

    Returns:
        The same model (patched in place); :func:`unpatch` undoes it.
    """
    name = type(model).__name__
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "get_output_embeddings"):
        raise TypeError(f"expected a transformers PreTrainedModel, got {name}")
    model_type = getattr(config, "model_type", None)
    if not name.endswith("ForCausalLM"):
        raise TypeError(
            f"{name} is not a *ForCausalLM model (vision-language and encoder-decoder models are not supported)"
        )
    if model_type not in TESTED_CAUSAL_LM_TYPES and not allow_untested:
        raise ValueError(
            f"model_type {model_type!r} is not among the tested families {sorted(TESTED_CAUSAL_LM_TYPES)}; "
            "pass allow_untested=True to patch it anyway"
        )
    if getattr(_text_config(config), "output_router_logits", False):
        raise NotImplementedError(f"{name} adds a router loss to its loss; mixture-of-experts models are not supported")
    if not isinstance(model.get_output_embeddings(), nn.Linear):
        raise NotImplementedError(f"{name}'s output layer is not an nn.Linear")
    if chunk_size is not None and memory_budget is not None:
        raise ValueError("give chunk_size or memory_budget, not both")
    if skip_logits is not None and not isinstance(skip_logits, bool):
        raise TypeError(f"skip_logits must be None or a bool, got {skip_logits!r}")
    options = _Options(scheme, ignore_index=ignore_index, normalize=normalize, label_smoothing=label_smoothing,
                       backend=backend)
    return _install(model, "causal_lm", options, softcap=_softcap_of(model), chunk_size=chunk_size,
                    memory_budget=memory_budget, skip_logits=skip_logits)


# ----------------------------------------------------------------------------
# Sequence and token classification


def _single_label(model, labels: torch.Tensor) -> None:
    config = model.config
    problem = getattr(config, "problem_type", None)
    if problem not in (None, "single_label_classification"):
        raise NotImplementedError(f"problem_type {problem!r}: only single-label classification is supported")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise NotImplementedError(
            f"labels of dtype {labels.dtype}: only single-label (integer class) targets are supported "
            "(multi-label and regression are not)"
        )


def _classifier_forward(model, state, args, kwargs):
    kwargs = _as_keywords(state.inner, args, kwargs)
    labels = kwargs.pop("labels", None)
    if labels is None:
        return state.inner(model, **kwargs)
    _single_label(model, labels)
    num_items = kwargs.pop("num_items_in_batch", None)
    want_tuple = _pop_return_dict(model, kwargs)
    out = state.inner(model, **kwargs)
    loss = state.options.logits_loss(out.logits, labels, num_items)
    return _with(out, want_tuple, loss=loss)


def patch_classifier(model, scheme: Scheme, *, class_weight: Optional[torch.Tensor] = None,
                     ignore_index: int = -100, normalize: Optional[bool] = None, label_smoothing: float = 0.0,
                     backend: str = "auto"):
    r"""Make a sequence or token classifier's loss ``robust_cross_entropy(logits, labels, scheme)``.

    For any ``*ForSequenceClassification`` (logits ``(B, C)``, labels ``(B,)``)
    or ``*ForTokenClassification`` (logits ``(B, T, C)``, labels ``(B, T)``,
    ``-100`` ignored) with ``num_labels >= 2`` and single-label targets. Its
    logits are unchanged. ``num_items_in_batch`` follows the module
    docstring's rule; note that transformers' own BERT-style heads ignore it.

    Args:
        model: the classifier.
        scheme: e.g. ``DM(lam=1.0, beta=8.0)``, ``IMAE(T=8.0)``, ``GCE()``.
        class_weight: optional ``(num_labels,)`` class weights (the ``weight``
            of :func:`~robustloss_fast.robust_cross_entropy`).
        ignore_index, normalize, label_smoothing, backend: as there.

    Returns:
        The same model (patched in place); :func:`unpatch` undoes it.
    """
    name = type(model).__name__
    config = getattr(model, "config", None)
    if config is None:
        raise TypeError(f"expected a transformers PreTrainedModel, got {name}")
    if not name.endswith(_CLASSIFIER_SUFFIXES):
        raise TypeError(f"{name} is neither a *ForSequenceClassification nor a *ForTokenClassification model")
    if getattr(config, "num_labels", 0) < 2:
        raise NotImplementedError(f"{name} has num_labels={getattr(config, 'num_labels', None)}: regression heads "
                                  "are not supported")
    problem = getattr(config, "problem_type", None)
    if problem not in (None, "single_label_classification"):
        raise NotImplementedError(f"problem_type {problem!r}: only single-label classification is supported")
    if class_weight is not None and tuple(class_weight.shape) != (config.num_labels,):
        raise ValueError(f"class_weight must have shape ({config.num_labels},), got {tuple(class_weight.shape)}")
    options = _Options(scheme, ignore_index=ignore_index, normalize=normalize, label_smoothing=label_smoothing,
                       backend=backend, class_weight=class_weight)
    return _install(model, "classifier", options)


def apply_robust_loss(model, scheme: Scheme, **kwargs):
    """:func:`patch_causal_lm` or :func:`patch_classifier`, by the model's class name."""
    name = type(model).__name__
    if name.endswith("ForCausalLM"):
        return patch_causal_lm(model, scheme, **kwargs)
    if name.endswith(_CLASSIFIER_SUFFIXES):
        return patch_classifier(model, scheme, **kwargs)
    raise TypeError(
        f"{name}: apply_robust_loss patches *ForCausalLM, *ForSequenceClassification and *ForTokenClassification "
        "models"
    )


# ----------------------------------------------------------------------------
# The Trainer's compute_loss_func


class RobustTrainerLoss:
    r"""A ``compute_loss_func`` for ``transformers.Trainer``.

    ``Trainer(..., compute_loss_func=RobustTrainerLoss(DM(lam=1.0, beta=8.0)))``.
    The Trainer calls the model without ``labels`` and then
    ``loss_fn(outputs, labels, num_items_in_batch=...)``; the loss is the
    scheme's on ``outputs.logits`` (already soft-capped by the model where it
    caps), with the module docstring's ``num_items_in_batch`` rule. The logits
    are materialised here; for a causal LM's memory saving, patch the model
    with :func:`patch_causal_lm` instead and leave ``compute_loss_func`` unset.

    Args:
        scheme: the scheme.
        causal_lm: shift the labels by one as causal LMs do (``labels[t + 1]``
            is the target of position ``t``); ``False`` for classifiers.
        class_weight, ignore_index, normalize, label_smoothing, backend: as in
            :func:`~robustloss_fast.robust_cross_entropy`.
    """

    def __init__(self, scheme: Scheme, *, causal_lm: bool = False, class_weight: Optional[torch.Tensor] = None,
                 ignore_index: int = -100, normalize: Optional[bool] = None, label_smoothing: float = 0.0,
                 backend: str = "auto"):
        if not isinstance(causal_lm, bool):
            raise TypeError(f"causal_lm must be a bool, got {causal_lm!r}")
        self.causal_lm = causal_lm
        self.options = _Options(scheme, ignore_index=ignore_index, normalize=normalize,
                                label_smoothing=label_smoothing, backend=backend, class_weight=class_weight)

    def __repr__(self):
        return f"RobustTrainerLoss({self.options!r}, causal_lm={self.causal_lm})"

    def __call__(self, outputs: Any, labels: Optional[torch.Tensor], num_items_in_batch=None) -> torch.Tensor:
        if labels is None:
            raise ValueError("RobustTrainerLoss needs labels (the batch has no 'labels' column)")
        logits = outputs["logits"] if isinstance(outputs, Mapping) else outputs[0]
        if labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise NotImplementedError(f"labels of dtype {labels.dtype}: only single-label targets are supported")
        if self.causal_lm:
            labels = _shifted(labels, None, self.options.ignore_index)
        return self.options.logits_loss(logits, labels, num_items_in_batch)
