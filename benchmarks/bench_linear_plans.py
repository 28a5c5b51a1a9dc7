"""The fused linear's plans at one memory budget, side by side (CPU or GPU): which is faster where.

Not a test. For each (N, H, V) and dtype, one ``memory_budget`` (default
8 MiB) and ``CCE()``:

* ``planner``: what ``linear_robust_cross_entropy`` picks (``grad_in_forward``
  left to it);
* ``hybrid``: the planner's tiles and chunks run as the hybrid (``grad_hidden``
  in forward, ``grad_weight`` from the tiles; forced where the planner would
  not pick it, as the tests force it);
* ``recompute``: ``grad_in_forward=False`` (tiled, or the split for 16-bit
  inputs whose float32 ``grad_hidden`` sum leaves the tiles narrow).

Time: median of ``--reps`` steps (zero grad + forward + backward) after one
warm-up, in this process (host clock, synchronised on a GPU). The JSON names
the machine, torch and the commit.

    python benchmarks/bench_linear_plans.py [--shapes 510x256x151936 ...] [--dtypes float32 bfloat16]
        [--budget-mib 8] [--reps 3] [--out benchmarks/results/linear_plans_cpu.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

SHAPES = ["510x256x151936", "510x256x32000", "4096x512x32000"]


def run(n, h, v, dtype, budget, reps, device):
    import torch

    import robustloss_fast as rf
    import robustloss_fast.linear as linear

    torch.manual_seed(0)
    dt = getattr(torch, dtype)
    hidden = torch.randn(n, h, device=device, dtype=dt, requires_grad=True)
    weight = (torch.randn(v, h, device=device) * 0.05).to(dt).requires_grad_()
    target = torch.randint(0, v, (n,), device=device)
    real = linear._plan
    out = {}
    for way in ("planner", "hybrid", "recompute"):
        seen = []

        def plan(*args, _way=way, **kwargs):
            p = real(*args, **kwargs)
            if _way == "hybrid" and p.tiled and kwargs["gif"]:
                p = dataclasses.replace(p, gif=True, split_rows=0)
            seen.append(p)
            return p

        linear._plan = plan
        try:
            def step():
                hidden.grad = weight.grad = None
                linear.linear_robust_cross_entropy(hidden, weight, target, rf.CCE(), memory_budget=budget,
                                                   grad_in_forward=False if way == "recompute" else None).backward()
                if device != "cpu":
                    torch.cuda.synchronize()

            step()
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                step()
                times.append(time.perf_counter() - t0)
        finally:
            linear._plan = real
        p = seen[-1]
        kind = ("hybrid" if p.tiled else "3-matmul") if p.gif else ("split" if p.split_rows else
                                                                   "tiled" if p.tiled else "whole rows")  # fmt: skip
        out[way] = {"plan": kind, "rows": p.rows, "tile": [p.tile_rows, p.tile_cols], "median_s": statistics.median(times),
                    "times_s": times}  # fmt: skip
        print(f"{dtype:9s} {n}x{h}x{v} {way:9s} {kind:10s} rows {p.rows:6d} tile {p.tile_rows}x{p.tile_cols}"
              f"  {out[way]['median_s']:.3f} s", flush=True)  # fmt: skip
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="+", default=SHAPES, metavar="NxHxV")
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--budget-mib", type=float, default=8.0)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "linear_plans_cpu.json"))
    args = ap.parse_args()
    import torch

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_linear import _git_head

    from robustloss_fast._bench import _cpu_model

    budget = int(args.budget_mib * (1 << 20))
    results = []
    for shape in args.shapes:
        n, h, v = (int(x) for x in shape.split("x"))
        for dtype in args.dtypes:
            results.append({"N": n, "H": h, "V": v, "dtype": dtype,
                            **run(n, h, v, dtype, budget, args.reps, args.device)})  # fmt: skip
    machine = torch.cuda.get_device_name() if args.device != "cpu" else _cpu_model()
    meta = {"machine": machine, "cpus": os.cpu_count(), "torch": torch.__version__, "git": _git_head(),
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "budget_bytes": budget, "scheme": "CCE()"}
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
