"""Where should the gradient be written: in forward, or in backward from saved row stats?

The shipped design (``robustloss[cpu]``) computes per-row statistics in
forward (one read of the logits) and writes the gradient in backward from
them (one more read, one write): 2 reads + 1 write, and only ``(N, 2)`` stats
are kept between the passes.

The alternative writes the gradient in forward and keeps it: built here from
the existing ops, forward runs ``robust_ce_forward`` then
``robust_ce_backward(ones)`` (the same 2 reads + 1 write), and backward only
rescales the kept gradient by the upstream ``g`` -- in place (one more read +
write), or not at all when ``g == 1`` (the usual ``loss.backward()``).

A fourth variant runs the shipped placement through the same plain
``torch.autograd.Function`` as the two alternatives: the shipped path's
``register_autograd`` wrapper and API checks cost a fixed ~50-70 us a step,
which would otherwise be mistaken for an effect of the placement.

Reported: fwd+bwd time and peak extra memory of each (``_bench.run``,
interleaved), the forward-only time (what a forward without backward costs,
e.g. a validation loss on logits that require grad), and the bytes each design
keeps alive between forward and backward.

Usage: ``python benchmarks/bench_grad_placement.py [--quick] [--repeats 15]``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import sys
import time

import torch

import robustloss_fast  # noqa: F401  (registers the ops)
from robustloss_fast import _bench
from robustloss_fast.schemes import DM

HERE = os.path.dirname(os.path.abspath(__file__))
_KID = DM().kernel_id
_A, _B = DM(lam=_bench.DM_LAM, beta=_bench.DM_BETA).kernel_params
_MEAN, _IGNORE = 1, -100


class _GradInForward(torch.autograd.Function):
    """Writes the (g = 1) gradient in forward and keeps it for backward."""

    @staticmethod
    def forward(ctx, logits, target, skip_unit):
        value, stats = torch.ops.robustloss.robust_ce_forward(logits, target, _KID, _A, _B, None, None, _IGNORE, _MEAN, True)
        one = torch.ones((), dtype=stats.dtype)
        grad = torch.ops.robustloss.robust_ce_backward(one, logits, target, stats, None, _IGNORE, _KID, _A)
        ctx.save_for_backward(grad)
        ctx.skip_unit = skip_unit
        return value

    @staticmethod
    def backward(ctx, g):
        (grad,) = ctx.saved_tensors
        if ctx.skip_unit and bool(g == 1):
            return grad, None, None
        # In place: the kept buffer is ours (a second backward would need retain_graph
        # and a copy; this is the fastest form of the design).
        return grad.mul_(g.to(grad.dtype)), None, None


class _GradInBackward(torch.autograd.Function):
    """The shipped placement through the same plain autograd.Function as the alternatives.

    The shipped path goes through ``torch.library.register_autograd`` and
    ``robust_cross_entropy``'s checks, whose fixed cost differs; this variant
    isolates the effect of *where* the gradient is written.
    """

    @staticmethod
    def forward(ctx, logits, target):
        value, stats = torch.ops.robustloss.robust_ce_forward(logits, target, _KID, _A, _B, None, None, _IGNORE, _MEAN, True)
        ctx.save_for_backward(logits, target, stats)
        return value

    @staticmethod
    def backward(ctx, g):
        logits, target, stats = ctx.saved_tensors
        return torch.ops.robustloss.robust_ce_backward(g, logits, target, stats, None, _IGNORE, _KID, _A), None


def grad_in_backward_plain(z, y):
    return _GradInBackward.apply(z, y)


def grad_in_forward_rescale(z, y):
    return _GradInForward.apply(z, y, False)


def grad_in_forward_skip_unit(z, y):
    return _GradInForward.apply(z, y, True)


def _current(z, y):
    return robustloss_fast.dm_loss(z, y, lam=_bench.DM_LAM, beta=_bench.DM_BETA, backend="cpu")


DESIGNS = {
    "grad in backward (shipped)": _current,
    "grad in backward, plain Function": grad_in_backward_plain,
    "grad in forward + rescale": grad_in_forward_rescale,
    "grad in forward, skip g == 1": grad_in_forward_skip_unit,
}


def forward_only_ms(case, repeats=15, clock=time.perf_counter):
    """Median ms of forward alone (grad enabled, no backward), per design, interleaved."""
    z, y = _bench._inputs(case, torch.device("cpu"))
    names = list(DESIGNS)
    for fn in DESIGNS.values():
        fn(z, y)
    t = {n: [] for n in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            inner, t0 = 0, clock()
            while True:
                DESIGNS[name](z, y)
                inner += 1
                if clock() - t0 > 0.01:
                    break
            t[name].append((clock() - t0) / inner)
    return {n: statistics.median(v) * 1e3 for n, v in t.items()}


def kept_bytes(case):
    """Bytes saved for backward beyond the inputs: stats (N, 2) fp32 vs the gradient (N, C)."""
    return {
        "grad in backward (shipped)": case.n * 2 * 4,
        "grad in backward, plain Function": case.n * 2 * 4,
        "grad in forward + rescale": case.grad_bytes,
        "grad in forward, skip g == 1": case.grad_bytes,
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--out-dir", default=os.path.join(HERE, "results"))
    ap.add_argument("--clock", choices=["wall", "thread"], default="wall",
                    help="thread: one thread timed by its CPU time (a diagnostic for busy machines)")
    ap.add_argument("--wait-quiet", type=float, metavar="CORES", default=None,
                    help="first wait (up to 10 min) until other processes use at most CORES cores")
    args = ap.parse_args(argv)
    if args.wait_quiet is not None:
        load = _bench.wait_until_quiet(args.wait_quiet)
        print(f"other processes: {load:.2f} cores" if load is not None else "load unknown", file=sys.stderr)

    cases = _bench.default_cases("cpu", quick=args.quick)
    # Correctness first: every design must give the shipped gradient.
    for case in cases[:2]:
        z, y = _bench._inputs(case, torch.device("cpu"), seed=3)
        grads = {}
        for name, fn in DESIGNS.items():
            z.grad = None
            (2.0 * fn(z, y)).backward()  # g = 2 exercises the rescale
            grads[name] = z.grad.clone()
        ref = grads["grad in backward (shipped)"]
        for name, g in grads.items():
            torch.testing.assert_close(g, ref, rtol=0, atol=0, msg=f"{name} differs on {case.label}")

    result = _bench.run(
        cases,
        variants=[],
        extra=DESIGNS,
        repeats=args.repeats,
        clock=args.clock,
        progress=lambda d, t, label: print(f"[{d}/{t}] {label}", file=sys.stderr, flush=True),
    )
    threads = torch.get_num_threads()
    if args.clock == "thread":
        torch.set_num_threads(1)
    for entry, case in zip(result["cases"], cases):
        fwd = forward_only_ms(
            case, repeats=max(5, args.repeats // 2), clock=time.thread_time if args.clock == "thread" else time.perf_counter
        )
        kept = kept_bytes(case)
        for name, rec in entry["results"].items():
            rec["forward_only_ms"] = fwd[name]
            rec["kept_between_passes_bytes"] = kept[name]
    torch.set_num_threads(threads)
    result["experiment"] = "gradient placement: forward vs backward (see benchmarks/bench_grad_placement.py)"

    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M")
    path = os.path.join(args.out_dir, f"grad_placement_{stamp}{'_quick' if args.quick else ''}{'_thread' if args.clock == 'thread' else ''}.json")
    _bench.write_json(result, path)

    m = result["machine"]
    print(
        f"Machine: {m['cpu']}, {m['torch_threads']} threads, torch {m['torch']}, "
        f"other processes {m.get('other_processes_cores')} cores, clock: {result['settings']['clock']}\n"
    )
    print("| case | design | fwd+bwd ms | IQR ms | vs shipped | fwd only ms | peak extra MiB (x grad) | kept fwd->bwd |")
    print("|---|---|---|---|---|---|---|---|")
    for entry in result["cases"]:
        base = entry["results"]["grad in backward (shipped)"]["median_s"]
        for name, rec in entry["results"].items():
            peak = rec["peak_extra_bytes"]
            mem = "n/a" if peak is None else f"{peak / 2**20:.2f} ({rec['peak_extra_over_grad']:.2f}x)"
            print(
                f"| {entry['label']} | {name} | {rec['median_s'] * 1e3:.3f} | "
                f"{rec['q1_s'] * 1e3:.3f}-{rec['q3_s'] * 1e3:.3f} | {base / rec['median_s']:.2f}x | "
                f"{rec['forward_only_ms']:.3f} | {mem} | {rec['kept_between_passes_bytes'] / 2**20:.3f} MiB |"
            )
    print(f"\nwrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
