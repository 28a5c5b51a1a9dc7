"""Distributed training: DDP with a global normaliser equals one process on the whole batch.

Each test spawns one group of gloo processes on CPU (spawning costs seconds,
so every case runs inside the same group) and compares, in the parent, what the
ranks computed with one process computing the concatenated batch:
- data parallel: a small float64 model under DDP, one SGD step, for DM
  (normalize=True, including a beta whose raw weights overflow), a loss-defined
  scheme with class weights (normalize=False), "sum" and "none";
- ``finalize_distributed`` directly (the contract other paths build on);
- vocabulary parallel: each rank holds a slice of the classes.
Shards are uneven, some rows are ignored and, with 3 ranks, one shard has no
row that counts.
"""

import multiprocessing
import os

import pytest
import torch

import robustloss_fast as rl
from robustloss_fast import _finalize, backends, distributed, reference
from robustloss_fast._common import Kernel, KernelSpec, Reduction, StatCol

dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():  # pragma: no cover
    pytest.skip("torch.distributed with the gloo backend is not available in this build", allow_module_level=True)

import torch.multiprocessing as mp  # noqa: E402
from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: E402

IN, HIDDEN, C = 6, 12, 8
LR = 0.5
# The fused CPU op where the extension loaded, and the reference always.
BACKENDS = ["cpu", "torch"] if backends.unavailable_reason("cpu") is None else ["torch"]

# (name, scheme, reduction, normalize, class weights?, sample weights?)
DP_CASES = [
    ("dm_mean", rl.DM(lam=1.0, beta=8.0), "mean", True, False, True),
    ("dm_overflow", rl.DMExponential(beta=1000.0), "mean", True, True, False),
    ("gce_weighted", rl.GCE(q=0.7), "mean", False, True, False),
    ("cce_weighted", rl.CCE(), "mean", False, True, True),
    ("imae_sum", rl.IMAE(T=4.0), "sum", None, False, True),
    ("dm_none", rl.DM(lam=0.5, beta=3.0), "none", None, True, True),
]


def _fin_spec(red, norm):
    # DMExponential(beta=-800) on rows with p ~ 0: every log w is near -800, so
    # a wrong common shift (e.g. 0 taken from a shard with no row that counts)
    # underflows every weight. Raw weights (no normalisation) use a mild beta.
    normalised = red == 1 and norm
    return KernelSpec(Kernel.DM, 0.0, -800.0 if normalised else -3.0, 1.0, Reduction(red), norm, -100)


def _fin_rows(z, y, red, norm):
    return reference.rows(z, y, _fin_spec(red, norm))


def _model():
    return torch.nn.Sequential(
        torch.nn.Linear(IN, HIDDEN), torch.nn.Tanh(), torch.nn.Linear(HIDDEN, C)
    ).double()


def _loss(logits, target, case, data, rows, backend, group):
    name, scheme, reduction, normalize, use_cw, use_sw = case
    out = rl.robust_cross_entropy(
        logits,
        target,
        scheme,
        weight=data["weight"] if use_cw else None,
        sample_weight=data["sw"][rows] if use_sw else None,
        reduction=reduction,
        normalize=normalize,
        backend=backend,
        process_group=group,
    )
    return out.sum() if reduction == "none" else out


def _step(model, loss):
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= LR * p.grad
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _worker(rank, world, rdv, data, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rdv}", rank=rank, world_size=world)
    group = dist.group.WORLD
    lo, hi = data["bounds"][rank], data["bounds"][rank + 1]
    rows = slice(lo, hi)
    res = {}
    for backend in BACKENDS:
        for case in DP_CASES:
            model = _model()
            model.load_state_dict(data["init"])
            ddp = DDP(model)
            loss = _loss(ddp(data["x"][rows]), data["y"][rows], case, data, rows, backend, group)
            res[f"{backend}/{case[0]}/value"] = loss.detach()
            res[f"{backend}/{case[0]}/params"] = _step(model, loss)

    # finalize_distributed on this rank's rows of hard examples (see _fin_rows).
    y = data["y"][rows]
    for red in (0, 1, 2):
        for norm in (True, False):
            r = _fin_rows(data["z_hard"][rows], y, red, norm)
            spec = _fin_spec(red, norm)
            value, stats = distributed.finalize_distributed(r, y, spec, data["weight"], data["sw"][rows], group)
            res[f"fin/{red}/{norm}/value"] = value
            res[f"fin/{red}/{norm}/stats"] = stats

    # Vocabulary parallel: every rank holds all rows, classes [off, off + width).
    off, width = data["vocab"][rank]
    for name, scheme, reduction, normalize, use_cw, use_sw in DP_CASES:
        local = data["z"][:, off : off + width].clone().requires_grad_(True)
        out = rl.robust_cross_entropy(
            local,
            data["y"],
            scheme,
            weight=data["weight"] if use_cw else None,
            sample_weight=data["sw"] if use_sw else None,
            reduction=reduction,
            normalize=normalize,
            process_group=group,
            vocab_parallel=True,
            class_offset=off if data["explicit_offset"] else None,
        )
        upstream = data["upstream"] if reduction == "none" else torch.tensor(1.0, dtype=torch.float64)
        out.backward(upstream)
        res[f"vp/{name}/value"] = out.detach()
        res[f"vp/{name}/grad"] = local.grad
    # SPEC §6 across slices: NaN / +inf in one rank's slice poisons that row only.
    local = data["z_nan"][:, off : off + width].clone().requires_grad_(True)
    out = rl.robust_cross_entropy(local, data["y"], rl.DM(), reduction="none", process_group=group,
                                  vocab_parallel=True, class_offset=off if data["explicit_offset"] else None)  # fmt: skip
    out.backward(data["upstream"])
    res["vp/nan/value"], res["vp/nan/grad"] = out.detach(), local.grad
    bad = data["y"].clone()
    bad[0] = C  # one past the last class: no rank owns it
    try:
        rl.robust_cross_entropy(data["z"][:, off : off + width], bad, rl.DM(), process_group=group, vocab_parallel=True,
                                class_offset=off if data["explicit_offset"] else None)  # fmt: skip
        res["vp/bad_target"] = ""
    except IndexError as exc:
        res["vp/bad_target"] = str(exc)

    torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def _draw(sizes, vocab, ignore_shard=None):
    n = sum(sizes)
    bounds = [0]
    for s in sizes:
        bounds.append(bounds[-1] + s)
    y = torch.randint(0, C, (n,))
    y[torch.rand(n) < 0.2] = -100
    if ignore_shard is not None:
        y[bounds[ignore_shard] : bounds[ignore_shard + 1]] = -100
    y[0] = 1  # at least one row counts
    y[3:5] = torch.tensor([2, 6])  # the rows of z_nan below
    z = torch.randn(n, C, dtype=torch.float64) * 3
    z[2, (int(y[2]) + 1) % C] = float("-inf")  # a masked class
    z_hard = z.clone()
    z_hard.scatter_add_(1, y.clamp(min=0)[:, None], torch.full((n, 1), -15.0, dtype=torch.float64))
    z_nan = z.clone()  # rows 3 and 4 (targets 2 and 6) get a NaN / +inf on another class
    z_nan[3, 5] = float("nan")
    z_nan[4, 1] = float("inf")
    return {
        "z_nan": z_nan,
        "bounds": bounds,
        "x": torch.randn(n, IN, dtype=torch.float64),
        "y": y,
        "z": z,
        "z_hard": z_hard,
        "sw": torch.rand(n, dtype=torch.float64) * 2 - 0.5,  # some negative
        "weight": torch.rand(C, dtype=torch.float64) + 0.2,
        "upstream": torch.randn(n, dtype=torch.float64),
        "init": {k: v.clone() for k, v in _model().state_dict().items()},
        "vocab": vocab,
        "explicit_offset": any(w != vocab[0][1] for _, w in vocab),
    }


def _close(actual, expected, what):
    torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-12, msg=lambda m: f"{what}: {m}")


def _check(data, world, out_dir):
    res = [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(world)]
    b = data["bounds"]
    for backend in BACKENDS:
        for case in DP_CASES:
            key = f"{backend}/{case[0]}"
            model = _model()
            model.load_state_dict(data["init"])
            full = slice(0, b[-1])
            loss = _loss(model(data["x"]), data["y"], case, data, full, backend, None)
            params = _step(model, loss)
            for r in range(world):
                _close(res[r][f"{key}/params"], params, f"{key} rank {r} parameters after one step")
            # The global loss is the mean of the ranks' values.
            _close(sum(res[r][f"{key}/value"] for r in range(world)) / world, loss.detach(), f"{key} value")

    for red in (0, 1, 2):
        for norm in (True, False):
            r_all = _fin_rows(data["z_hard"], data["y"], red, norm)
            value, stats = _finalize.finalize(r_all, data["y"], _fin_spec(red, norm), data["weight"], data["sw"])
            got_stats = torch.cat([res[r][f"fin/{red}/{norm}/stats"] for r in range(world)])
            # coef carries the factor W; lse_nt = m + ls is per row and unscaled.
            alpha, lse = StatCol.ALPHA, slice(StatCol.M, StatCol.LS + 1)
            _close(got_stats[:, alpha] / world, stats[:, alpha], f"finalize coef red={red} norm={norm}")
            assert torch.equal(got_stats[:, lse], stats[:, lse])
            if red == 0:
                got = torch.cat([res[r][f"fin/{red}/{norm}/value"] for r in range(world)]) / world
            else:
                got = sum(res[r][f"fin/{red}/{norm}/value"] for r in range(world)) / world
            _close(got, value, f"finalize value red={red} norm={norm}")
            if red == 1 and norm:
                assert (stats[:, alpha] != 0).any(), "large |beta| underflowed every weight: the case tests nothing"

    for name, scheme, reduction, normalize, use_cw, use_sw in DP_CASES:
        z = data["z"].clone().requires_grad_(True)
        out = rl.robust_cross_entropy(
            z,
            data["y"],
            scheme,
            weight=data["weight"] if use_cw else None,
            sample_weight=data["sw"] if use_sw else None,
            reduction=reduction,
            normalize=normalize,
            backend="torch",
        )
        out.backward(data["upstream"] if reduction == "none" else None)
        grad = torch.cat([res[r][f"vp/{name}/grad"] for r in range(world)], dim=1)
        for r in range(world):
            _close(res[r][f"vp/{name}/value"], out.detach(), f"vocab parallel {name} value, rank {r}")
        _close(grad, z.grad, f"vocab parallel {name} gradient")
    z = data["z_nan"].clone().requires_grad_(True)
    out = rl.robust_cross_entropy(z, data["y"], rl.DM(), reduction="none", backend="torch")
    out.backward(data["upstream"])
    assert out.isnan().sum() == 2 and z.grad.isnan().any(1).sum() == 2, "the NaN case must poison exactly two rows"
    grad = torch.cat([res[r]["vp/nan/grad"] for r in range(world)], dim=1)
    for r in range(world):
        torch.testing.assert_close(res[r]["vp/nan/value"], out.detach(), rtol=1e-9, atol=1e-12, equal_nan=True)
    torch.testing.assert_close(grad, z.grad, rtol=1e-9, atol=1e-12, equal_nan=True)
    for r in range(world):
        assert f"target value {C} " in res[r]["vp/bad_target"], res[r]["vp/bad_target"]


def _run(world, data, tmp_path):
    # forkserver: torch is imported once, in the server, instead of once per
    # rank (most of this test's time on 2 cores); its children are forked
    # from a process that never started a thread pool, unlike this one.
    multiprocessing.set_forkserver_preload(["torch", "robustloss_fast"])
    mp.start_processes(
        _worker, args=(world, str(tmp_path / "rdv"), data, str(tmp_path)), nprocs=world, start_method="forkserver"
    )
    _check(data, world, str(tmp_path))


def test_two_ranks_equal_one_process(tmp_path):
    # Equal vocabulary slices (4, 4): the default class offset rank * C_local.
    data = _draw([7, 5], vocab=[(0, 4), (4, 4)])
    _run(2, data, tmp_path)


def test_three_uneven_ranks_one_without_rows_that_count(tmp_path):
    # Shard 1 has only ignored rows; the vocabulary slices are uneven (3, 1, 4).
    data = _draw([6, 3, 5], vocab=[(0, 3), (3, 1), (4, 4)], ignore_shard=1)
    _run(3, data, tmp_path)


def test_process_group_checks():
    logits, target = torch.randn(3, 4), torch.randint(0, 4, (3,))
    with pytest.raises(ValueError, match="vocab_parallel=True needs"):
        rl.robust_cross_entropy(logits, target, rl.DM(), vocab_parallel=True)
    with pytest.raises(ValueError, match="class_offset"):
        rl.robust_cross_entropy(logits, target, rl.DM(), class_offset=2)
    if not dist.is_initialized():
        with pytest.raises(RuntimeError, match="not initialised"):
            rl.robust_cross_entropy(logits, target, rl.DM(), process_group=object())
