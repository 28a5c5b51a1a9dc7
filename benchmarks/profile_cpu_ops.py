"""Where the time of one fused CPU fwd+bwd goes: the ops one by one.

For each shape, times (median of interleaved samples, microseconds):

* ``rows``      ``robust_ce_rows``: target check + the parallel row pass;
* ``forward``   ``robust_ce_forward``: rows + the sequential cross-row finalize,
                so ``forward - rows`` is the finalize (and its allocations);
* ``backward``  ``robust_ce_backward``: target check + a fresh (N, C) output +
                the parallel gradient pass;
* ``bwd_into_warm`` the same pass writing into memory that was just freed by
                the previous call (what the allocator gives back);
* ``alloc+fill`` ``torch.empty(N, C).fill_(0)``: the price of a fresh, untouched
                gradient buffer (page faults for large ones);
* ``fill``      writing a preallocated (N, C) buffer: ``alloc+fill - fill`` is the
                cost of fresh pages;
* ``copy``      read + write floor (copy into a preallocated buffer);
* ``exp into``  ``torch.exp(z, out=buf)``: one exp per element, read + write, warm
                output -- the compute yardstick of the backward pass;
* ``step``      the whole ``dm_loss(...).backward()`` step, so
                ``step - forward - backward`` is Python, autograd and dispatch;
* ``F.ce step`` and ``log_softmax`` for comparison.

Usage: ``python benchmarks/profile_cpu_ops.py [--threads 2] [--repeats 15] [--cpu-time]``.
``--cpu-time`` runs one thread and times it by its own CPU time, which stays
meaningful on a machine busy with other work (wall time does not).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import robustloss_fast
from robustloss_fast import _bench
from robustloss_fast.schemes import DM

KID = DM().kernel_id
A, B = DM().kernel_params


CLOCK = time.perf_counter


def _timed(fn, min_s=0.01):
    inner, t0 = 0, CLOCK()
    while True:
        fn()
        inner += 1
        dt = CLOCK() - t0
        if dt > min_s:
            return dt / inner


def profile_case(case, repeats):
    z, y = _bench._inputs(case, torch.device("cpu"))
    zd = z.detach()
    stats = torch.ops.robustloss.robust_ce_forward(zd, y, KID, A, B, None, None, -100, 1, True)[1]
    one = torch.ones(())
    src = torch.empty_like(zd).copy_(zd)
    dst = torch.empty_like(zd)

    def step_dm():
        z.grad = None
        robustloss_fast.dm_loss(z, y, backend="cpu").backward()

    def step_ce():
        z.grad = None
        F.cross_entropy(z, y).backward()

    ops = {
        "rows": lambda: torch.ops.robustloss.robust_ce_rows(zd, y, KID, A, B, None, -100, True),
        "forward": lambda: torch.ops.robustloss.robust_ce_forward(zd, y, KID, A, B, None, None, -100, 1, True),
        "backward": lambda: torch.ops.robustloss.robust_ce_backward(one, zd, y, stats, None, -100, KID, A),
        "alloc+fill": lambda: torch.empty_like(zd).fill_(0),
        "copy": lambda: dst.copy_(src),
        "fill": lambda: dst.fill_(0),
        "exp into": lambda: torch.exp(zd, out=dst),
        "step": step_dm,
        "F.ce step": step_ce,
        "log_softmax": lambda: torch.log_softmax(zd, 1),
    }
    for fn in ops.values():
        fn()
    t = {k: [] for k in ops}
    names = list(ops)
    for r in range(repeats):
        for k in names[r % len(names):] + names[: r % len(names)]:
            t[k].append(_timed(ops[k]))
    return {k: statistics.median(v) * 1e6 for k, v in t.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--cpu-time", action="store_true",
                    help="one thread, timed by its CPU time (time.thread_time): robust to other processes")
    args = ap.parse_args(argv)
    global CLOCK
    if args.cpu_time:
        args.threads = 1
        CLOCK = time.thread_time
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = "thread CPU time" if args.cpu_time else "wall time"
    print(f"threads={torch.get_num_threads()} kernel={robustloss_fast.backends.compiled.EXT.cpu_capability()} clock={clock}")
    cols = ["rows", "forward", "backward", "alloc+fill", "fill", "copy", "exp into", "step", "F.ce step", "log_softmax"]
    print("| case | " + " | ".join(f"{c} us" for c in cols) + " | finalize us | overhead us |")
    print("|---|" + "---|" * (len(cols) + 2))
    for case in _bench.default_cases("cpu"):
        r = profile_case(case, args.repeats)
        fin = r["forward"] - r["rows"]
        over = r["step"] - r["forward"] - r["backward"]
        print(f"| {case.label} | " + " | ".join(f"{r[c]:.1f}" for c in cols) + f" | {fin:.1f} | {over:.1f} |", flush=True)


if __name__ == "__main__":
    main()
