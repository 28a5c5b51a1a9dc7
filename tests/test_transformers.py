"""Hugging Face transformers integration: tiny models built from configs (no download), on CPU.

Causal LMs of every patched family, sequence/token classifiers, and the
Trainer's compute_loss_func. The unpatched model is the oracle: with CCE()
the patched loss and gradients must be its own.
"""

import copy

import pytest
import torch

transformers = pytest.importorskip(
    "transformers", reason="transformers is not installed (pip install 'robustloss_fast[transformers]')"
)

import robustloss_fast as rf  # noqa: E402
from robustloss_fast.integrations.transformers import (  # noqa: E402
    RobustTrainerLoss,
    apply_robust_loss,
    is_patched,
    patch_causal_lm,
    patch_classifier,
    unpatch,
)

V = 160  # vocabulary
_COMMON = dict(
    vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    # logits of order 1-5, so that the soft-cap below bends them and the losses are not all log(V)
    initializer_range=0.2,
)
_CAP = 2.0
CAUSAL = {
    "llama": lambda: transformers.LlamaConfig(**_COMMON),
    "mistral": lambda: transformers.MistralConfig(**_COMMON),
    "qwen2": lambda: transformers.Qwen2Config(**_COMMON),
    "qwen3": lambda: transformers.Qwen3Config(**_COMMON, head_dim=8),
    "gemma": lambda: transformers.GemmaConfig(**_COMMON, head_dim=8),
    "gemma2": lambda: transformers.Gemma2Config(**_COMMON, head_dim=8, final_logit_softcapping=_CAP),
    "gemma3": lambda: transformers.Gemma3TextConfig(**_COMMON, head_dim=8, final_logit_softcapping=_CAP),
    "phi3": lambda: transformers.Phi3Config(**_COMMON),
}


def _causal(family, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(CAUSAL[family]())
    return model.to(dtype).train()


def _batch(b=3, t=10, seed=None):
    """Token ids and labels with ignored spans: a prompt prefix, right padding, a hole."""
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    ids = torch.randint(3, V, (b, t), generator=g)
    labels = ids.clone()
    labels[0, :4] = -100
    labels[1, t - 3:] = -100
    labels[2, 5] = -100
    return ids, labels


def _grads(model, loss):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.autograd.grad(loss, params)


def _assert_grads_close(got, want, rtol, atol):
    assert len(got) == len(want)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


def _adam_steps(model, ids, labels, steps=6):
    """The model's own loss over ``steps`` Adam steps (lr 1e-2) on one batch."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    values = []
    for _ in range(steps):
        opt.zero_grad()
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        values.append(loss.item())
    return values


def _n_targets(labels):
    return (labels[:, 1:] != -100).sum()


# ----------------------------------------------------------------------------
# Causal LMs


@pytest.mark.parametrize("family", sorted(CAUSAL))
def test_causal_cce_equals_the_unpatched_model(family):
    # float32, training mode, ignored positions; once as a plain call (mean)
    # and once inside a gradient-accumulation step (num_items_in_batch).
    ref = _causal(family)
    model = patch_causal_lm(copy.deepcopy(ref), rf.CCE())
    ids, labels = _batch()
    n = _n_targets(labels)
    for num_items in (None, n + 7):
        extra = {} if num_items is None else {"num_items_in_batch": num_items}
        want = ref(input_ids=ids, labels=labels, **extra)
        got = model(input_ids=ids, labels=labels, **extra)
        assert got.logits is None  # the fused path never made them
        torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-6)
        _assert_grads_close(_grads(model, got.loss), _grads(ref, want.loss), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("family", ["llama", "gemma2", "phi3"])
def test_causal_cce_float64_against_the_formula(family):
    # transformers computes its loss in float32 even for a float64 model; the
    # fused float64 path must agree with the float64 formula on the unpatched
    # logits to float64 rounding: sum of CE over shifted, non-ignored targets / N.
    ref = _causal(family, torch.float64, seed=1)
    model = patch_causal_lm(copy.deepcopy(ref), rf.CCE())
    ids, labels = _batch(seed=2)
    n = int(_n_targets(labels)) + 3
    logits = ref(input_ids=ids).logits
    want = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), reduction="sum"
    ) / n
    got = model(input_ids=ids, labels=labels, num_items_in_batch=n).loss
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    _assert_grads_close(_grads(model, got), _grads(ref, want), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_causal_memory_budget_reaches_the_fused_loss(family, returns_of):
    # 30 positions x V = 160 x H = 32 in float32: 18000 bytes are below the
    # 3-matmul and whole-row plans (20640) and fit vocabulary tiles of all
    # rows (17760), so the patched loss must run the tiled backward, and
    # still be the unpatched model's loss and gradients. Gemma 2's soft-cap
    # keeps the capped logits beside their gradient, twice the bytes a logit:
    # 36000 (whole rows 39840, tiles 34080).
    import robustloss_fast.linear as linear

    plans = returns_of(linear, "_plan")
    ref = _causal(family)
    budget = 36000 if family == "gemma2" else 18000
    model = patch_causal_lm(copy.deepcopy(ref), rf.CCE(), memory_budget=budget)
    ids, labels = _batch()
    want = ref(input_ids=ids, labels=labels).loss
    got = model(input_ids=ids, labels=labels).loss
    assert [(p.gif, p.tile_rows, p.tile_cols) for p in plans] == [(False, 30, 128)]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    _assert_grads_close(_grads(model, got), _grads(ref, want), rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="not both"):
        patch_causal_lm(_causal(family), rf.CCE(), chunk_size=8, memory_budget=18000)


def test_softcap_is_active_in_the_gemma_tests():
    # The parity above would pass vacuously if the cap never bent the logits.
    ref = _causal("gemma2")
    ids, labels = _batch()
    capped = ref(input_ids=ids, labels=labels).loss
    ref.config.final_logit_softcapping = None
    plain = ref(input_ids=ids, labels=labels).loss
    assert abs(capped.item() - plain.item()) > 0.05


@pytest.mark.parametrize("family", sorted(CAUSAL))
def test_causal_dm_steps_lower_the_loss(family):
    model = patch_causal_lm(_causal(family, seed=3), rf.DM(lam=1.0, beta=4.0))
    ids, labels = _batch(seed=4)
    values = _adam_steps(model, ids, labels)
    assert all(torch.isfinite(torch.tensor(values)))
    assert values[-1] < 0.8 * values[0], values
    # The plain cross-entropy falls too: the steps fit the labels.
    unpatch(model)
    model.eval()
    with torch.no_grad():
        ce_after = model(input_ids=ids, labels=labels).loss.item()
    fresh = _causal(family, seed=3).eval()
    with torch.no_grad():
        ce_before = fresh(input_ids=ids, labels=labels).loss.item()
    assert ce_after < ce_before


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_causal_logits_when_asked_are_the_unpatched_ones(family):
    ref = _causal(family)
    model = patch_causal_lm(copy.deepcopy(ref), rf.CCE())
    ids, labels = _batch()
    # No labels (training or generation): untouched.
    torch.testing.assert_close(model(input_ids=ids).logits, ref(input_ids=ids).logits, rtol=0, atol=0)
    # Evaluation mode with labels: logits as usual, and the loss on them.
    ref.eval()
    model.eval()
    want = ref(input_ids=ids, labels=labels)
    got = model(input_ids=ids, labels=labels)
    torch.testing.assert_close(got.logits, want.logits, rtol=0, atol=0)
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-6)
    # skip_logits=False keeps them in training mode, with the same loss and gradients.
    ref.train()
    model = patch_causal_lm(copy.deepcopy(ref), rf.CCE(), skip_logits=False)
    want = ref(input_ids=ids, labels=labels)
    got = model(input_ids=ids, labels=labels)
    torch.testing.assert_close(got.logits, want.logits, rtol=0, atol=0)
    _assert_grads_close(_grads(model, got.loss), _grads(ref, want.loss), rtol=1e-4, atol=1e-6)
    # Greedy generation is the same.
    ref.eval()
    model.eval()
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids[:1], **kw), ref.generate(ids[:1], **kw))


def test_causal_tuple_output_positional_args_and_shift_labels():
    ref = _causal("qwen2")
    model = patch_causal_lm(copy.deepcopy(ref), rf.CCE())
    ids, labels = _batch()
    want = ref(ids, labels=labels).loss
    out = model(ids, return_dict=False, labels=labels)
    assert isinstance(out, tuple)
    torch.testing.assert_close(out[0], want, rtol=1e-5, atol=1e-6)
    # A collator's shift_labels (already aligned with the positions) are used as given.
    shift = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]
    torch.testing.assert_close(model(input_ids=ids, shift_labels=shift).loss, want, rtol=1e-5, atol=1e-6)


def test_causal_unpatch_restores_the_model():
    ref = _causal("mistral")
    model = copy.deepcopy(ref)
    forward = model.forward
    patch_causal_lm(model, rf.DM())
    assert is_patched(model) and "forward" in model.__dict__
    clone = copy.deepcopy(model)  # the copy's forward must run the copy, not the original
    assert clone.forward.__self__ is clone and is_patched(clone)
    ids, labels = _batch()
    assert model(input_ids=ids, labels=labels).logits is None
    unpatch(model)
    assert not is_patched(model) and "forward" not in model.__dict__
    assert model.forward == forward
    got, want = model(input_ids=ids, labels=labels), ref(input_ids=ids, labels=labels)
    assert got.logits is not None
    torch.testing.assert_close(got.loss, want.loss, rtol=0, atol=0)
    # Patching again works, and a second patch replaces the options instead of wrapping twice.
    patch_causal_lm(model, rf.DM())
    patch_causal_lm(model, rf.CCE())
    torch.testing.assert_close(model(input_ids=ids, labels=labels).loss, want.loss, rtol=1e-5, atol=1e-6)
    assert model.forward.__func__.__wrapped__ is type(model).forward


def _micro_batch_grads(model, micro_batches, n_total):
    grads = None
    for ids, labels in micro_batches:
        loss = model(input_ids=ids, labels=labels, num_items_in_batch=n_total).loss
        g = _grads(model, loss)
        grads = g if grads is None else [a + b for a, b in zip(grads, g)]
    return grads


def test_gradient_accumulation_rule():
    model = patch_causal_lm(_causal("llama", torch.float64, seed=5), rf.CCE())
    a, b = _batch(seed=6), _batch(seed=7)
    n_a, n_b = _n_targets(a[1]), _n_targets(b[1])
    n = n_a + n_b
    whole = (torch.cat([a[0], b[0]]), torch.cat([a[1], b[1]]))
    # Loss-defined: the accumulated gradient is the whole batch's mean, exactly.
    acc = _micro_batch_grads(model, [a, b], n)
    _assert_grads_close(acc, _grads(model, model(input_ids=whole[0], labels=whole[1]).loss), rtol=1e-10, atol=1e-13)
    # Derivative-normalised: each micro-batch normalised on its own, weighted by its share n_m / N.
    dm = rf.DM(lam=1.0, beta=6.0)
    patch_causal_lm(model, dm)
    for ids, labels in (a, b):
        got = model(input_ids=ids, labels=labels, num_items_in_batch=n).loss
        plain = model(input_ids=ids, labels=labels).loss  # the micro-batch's normalised mean
        torch.testing.assert_close(got, plain * _n_targets(labels) / n, rtol=1e-12, atol=1e-14)
    acc = _micro_batch_grads(model, [a, b], n)
    full = _grads(model, model(input_ids=whole[0], labels=whole[1]).loss)
    # Exact when the micro-batches have the same mean emphasis (here: the same batch twice)...
    twice = _micro_batch_grads(model, [a, a], 2 * n_a)
    once = _grads(model, model(input_ids=torch.cat([a[0], a[0]]), labels=torch.cat([a[1], a[1]])).loss)
    _assert_grads_close(twice, once, rtol=1e-9, atol=1e-12)
    # ...and not otherwise: the documented consequence of normalising per micro-batch.
    diff = max((x - y).abs().max().item() for x, y in zip(acc, full))
    assert diff > 1e-6
    # With one micro-batch (N = its own count) it is the scheme's mean.
    one = model(input_ids=a[0], labels=a[1], num_items_in_batch=n_a).loss
    torch.testing.assert_close(one, model(input_ids=a[0], labels=a[1]).loss, rtol=1e-12, atol=1e-14)


def test_causal_bfloat16_and_autocast():
    ids, labels = _batch()
    # A bfloat16 model: the loss is float32 (as transformers' upcast), close to the unpatched one.
    ref = _causal("llama", torch.bfloat16)
    model = patch_causal_lm(copy.deepcopy(ref), rf.CCE())
    got, want = model(input_ids=ids, labels=labels).loss, ref(input_ids=ids, labels=labels).loss
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
    # float32 weights under bfloat16 autocast: lm_head's matmul runs in bfloat16 in both.
    ref = _causal("phi3")
    model = patch_causal_lm(copy.deepcopy(ref), rf.CCE())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = model(input_ids=ids, labels=labels).loss, ref(input_ids=ids, labels=labels).loss
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
    gw = _grads(model, got)
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in gw)


def test_causal_refusals():
    # Untested families are refused unless asked for; then the lm_head output
    # transform is checked: OPT has none (works), Granite divides the logits (refused).
    opt_cfg = transformers.OPTConfig(vocab_size=V, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                     num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32,
                                     pad_token_id=0, bos_token_id=1, eos_token_id=2, dropout=0.0)
    torch.manual_seed(0)
    opt = transformers.OPTForCausalLM(opt_cfg).train()
    with pytest.raises(ValueError, match="allow_untested"):
        patch_causal_lm(opt, rf.CCE())
    ref = copy.deepcopy(opt)
    patch_causal_lm(opt, rf.CCE(), allow_untested=True)
    ids, labels = _batch()
    torch.testing.assert_close(opt(input_ids=ids, labels=labels).loss, ref(input_ids=ids, labels=labels).loss,
                               rtol=1e-5, atol=1e-6)
    granite = transformers.GraniteForCausalLM(transformers.GraniteConfig(**_COMMON, logits_scaling=4.0)).train()
    patch_causal_lm(granite, rf.CCE(), allow_untested=True)
    with pytest.raises(NotImplementedError, match="transforms lm_head's output"):
        granite(input_ids=ids, labels=labels)
    with pytest.raises(TypeError, match="ForCausalLM"):
        patch_causal_lm(transformers.LlamaModel(CAUSAL["llama"]()), rf.CCE())
    with pytest.raises(ValueError, match="normalize"):
        patch_causal_lm(_causal("llama"), rf.schemes.NCE(), normalize=True)


# ----------------------------------------------------------------------------
# Sequence and token classification

_ENC = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=64, pad_token_id=0, num_labels=5, initializer_range=0.2)
CLASSIFIERS = {
    "bert": lambda: transformers.BertConfig(**_ENC),
    "roberta": lambda: transformers.RobertaConfig(**_ENC, bos_token_id=1, eos_token_id=2),
    "deberta": lambda: transformers.DebertaConfig(**_ENC),
    "deberta-v2": lambda: transformers.DebertaV2Config(**_ENC),
    "modernbert": lambda: transformers.ModernBertConfig(
        vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1,
        sep_token_id=2, num_labels=5, initializer_range=0.2),
    "llama": lambda: transformers.LlamaConfig(**_COMMON, num_labels=5),
}


def _classifier(family, kind, seed=0, **config_overrides):
    torch.manual_seed(seed)
    auto = {"seq": transformers.AutoModelForSequenceClassification,
            "tok": transformers.AutoModelForTokenClassification}[kind]
    config = CLASSIFIERS[family]()
    for k, v in config_overrides.items():
        setattr(config, k, v)
    return auto.from_config(config)


def _cls_batch(kind, b=4, t=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (b, t), generator=g)
    if kind == "seq":
        labels = torch.randint(0, 5, (b,), generator=g)
        labels[1] = -100
    else:
        labels = torch.randint(0, 5, (b, t), generator=g)
        labels[:, 0] = -100
        labels[2, 5:] = -100
    return ids, labels


@pytest.mark.parametrize("kind", ["seq", "tok"])
@pytest.mark.parametrize("family", sorted(CLASSIFIERS))
def test_classifier_cce_equals_the_unpatched_model(family, kind):
    # Evaluation mode (no dropout) for a deterministic comparison; gradients still flow.
    ref = _classifier(family, kind).eval()
    model = patch_classifier(copy.deepcopy(ref), rf.CCE())
    ids, labels = _cls_batch(kind)
    want, got = ref(input_ids=ids, labels=labels), model(input_ids=ids, labels=labels)
    torch.testing.assert_close(got.logits, want.logits, rtol=0, atol=0)
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-6)
    _assert_grads_close(_grads(model, got.loss), _grads(ref, want.loss), rtol=1e-4, atol=1e-6)
    # With num_items_in_batch (which these heads ignore): sum over the micro-batch / N.
    n = int((labels != -100).sum()) + 5
    got = model(input_ids=ids, labels=labels, num_items_in_batch=n).loss
    logits = ref(input_ids=ids).logits
    want = torch.nn.functional.cross_entropy(logits.reshape(-1, 5), labels.reshape(-1), reduction="sum") / n
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["bert", "modernbert", "roberta"])
def test_classifier_dm_steps_lower_the_loss_and_unpatch(family):
    model = apply_robust_loss(_classifier(family, "seq", seed=2).train(), rf.DM(lam=1.0, beta=4.0))
    ids, labels = _cls_batch("seq", seed=3)
    values = _adam_steps(model, ids, labels)
    assert values[-1] < 0.8 * values[0], values
    unpatch(model)
    assert not is_patched(model) and "forward" not in model.__dict__


def test_classifier_value_is_the_scheme_and_refusals():
    model = _classifier("bert", "seq").eval()
    ids, labels = _cls_batch("seq")
    logits = model(input_ids=ids).logits
    scheme = rf.GCE(q=0.7)
    patch_classifier(model, scheme, class_weight=torch.rand(5) + 0.5)
    cw = model._robustloss_patch.options.class_weight
    torch.testing.assert_close(model(input_ids=ids, labels=labels).loss,
                               rf.robust_cross_entropy(logits, labels, scheme, weight=cw))
    with pytest.raises(NotImplementedError, match="single-label"):
        model(input_ids=ids, labels=torch.rand(4, 5))  # multi-label targets
    reg = _classifier("bert", "seq")
    reg.config.num_labels = 1
    with pytest.raises(NotImplementedError, match="regression"):
        patch_classifier(reg, rf.DM())
    with pytest.raises(TypeError, match="apply_robust_loss"):
        apply_robust_loss(transformers.BertModel(CLASSIFIERS["bert"]()), rf.DM())


# ----------------------------------------------------------------------------
# The Trainer


def test_trainer_loss_function_equals_the_model_loss():
    ref = _causal("gemma2")
    ids, labels = _batch()
    n = int(_n_targets(labels)) + 2
    out = ref(input_ids=ids)
    for num_items in (None, n):
        want = ref(input_ids=ids, labels=labels, num_items_in_batch=num_items).loss
        got = RobustTrainerLoss(rf.CCE(), causal_lm=True)(out, labels, num_items_in_batch=num_items)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="labels"):
        RobustTrainerLoss(rf.CCE())(out, None)


class _Rows(torch.utils.data.Dataset):
    def __init__(self, ids, labels):
        self.ids, self.labels = ids, labels

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.labels[i]}


def _trainer(model, tmp_path, data, **kw):
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, gradient_accumulation_steps=2,
        learning_rate=1e-2, report_to=[], save_strategy="no", logging_steps=1, use_cpu=True, seed=0,
        disable_tqdm=True, dataloader_num_workers=0,
    )
    return transformers.Trainer(model=model, args=args, train_dataset=data, **kw)


@pytest.mark.parametrize("kind", ["causal", "seq"])
def test_trainer_two_steps_with_compute_loss_func(kind, tmp_path):
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")
    if kind == "causal":
        model, (ids, labels) = _causal("qwen3"), _batch(b=8, seed=8)
        loss_fn = RobustTrainerLoss(rf.DM(lam=1.0, beta=4.0), causal_lm=True)
    else:
        model, (ids, labels) = _classifier("roberta", "seq"), _cls_batch("seq", b=8, seed=8)
        loss_fn = RobustTrainerLoss(rf.IMAE(T=4.0))
    calls = []

    def spy(outputs, labels, num_items_in_batch=None):
        calls.append(num_items_in_batch)
        return loss_fn(outputs, labels, num_items_in_batch=num_items_in_batch)

    before = [p.detach().clone() for p in model.parameters()]
    trainer = _trainer(model, tmp_path, _Rows(ids, labels), compute_loss_func=spy)
    result = trainer.train()
    assert trainer.state.global_step == 2
    assert len(calls) == 4 and all(c is not None for c in calls)  # 2 steps x 2 micro-batches, with N
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert any(not torch.equal(a, p.detach()) for a, p in zip(before, model.parameters()))


def test_trainer_with_a_patched_model_matches_the_unpatched_step(tmp_path):
    # Gradient accumulation through the Trainer: with CCE() the patched model's
    # step (fused loss, num_items_in_batch from the Trainer) is the unpatched one's.
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")
    ids, labels = _batch(b=4, seed=9)
    data = _Rows(ids, labels)
    ref = _causal("llama")
    model = patch_causal_lm(copy.deepcopy(ref), rf.CCE())
    _trainer(ref, tmp_path / "a", data, optimizers=(torch.optim.SGD(ref.parameters(), lr=0.5), None)).train()
    _trainer(model, tmp_path / "b", data, optimizers=(torch.optim.SGD(model.parameters(), lr=0.5), None)).train()
    moved = 0.0
    for p, q, r in zip(model.parameters(), ref.parameters(), _causal("llama").parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)
        moved = max(moved, (q - r).abs().max().item())
    assert moved > 1e-3


def test_trainer_patched_classifier_accumulates_like_one_batch(tmp_path):
    # transformers 5.x's BERT heads accept num_items_in_batch and ignore it, so
    # the Trainer's accumulated step is too large by the number of
    # micro-batches; patched, 2 micro-batches of 2 must step like 1 batch of 4.
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")
    base = _classifier("bert", "seq", seed=4, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    ids, labels = _cls_batch("seq", b=4, seed=5)
    labels[1] = 3  # every example counts
    data = _Rows(ids, labels)
    moved = []
    for bs, ga in ((4, 1), (2, 2)):
        model = patch_classifier(copy.deepcopy(base), rf.CCE())
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / f"{bs}"), max_steps=1, per_device_train_batch_size=bs,
            gradient_accumulation_steps=ga, report_to=[], save_strategy="no", use_cpu=True,
            lr_scheduler_type="constant", disable_tqdm=True,
        )
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        transformers.Trainer(model=model, args=args, train_dataset=data, optimizers=(opt, None)).train()
        moved.append([p.detach() - q.detach() for p, q in zip(model.parameters(), base.parameters())])
    assert max(d.abs().max().item() for d in moved[0]) > 1e-3
    for a, b in zip(*moved):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
