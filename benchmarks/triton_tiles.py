"""Time the Triton backend's tile shapes on one GPU: which BLOCK_C and num_warps for each kernel.

    python benchmarks/triton_tiles.py --out DIR [--dry-run]

The row pass (``rows_kernel``) takes its tile from ``ops._rows_tile(n, c)``,
the backward (``backward_kernel``) from ``ops._backward_tile(n, c)``.
This script swaps one of them for a fixed (BLOCK_C, num_warps), one
candidate at a time, and times the DM loss's forward alone and its whole
training step (zero grad, forward, backward) with CUDA events, so that the
backward's share is the difference. The candidates come from the static
SASS counts in benchmarks/NOTES.md ("Triton tiles"): at BLOCK_C 32768 on
32 warps the row pass spilled, and the backward's prologue is amortised over
16 logits per thread at BLOCK_C 4096 / 8 warps.
Each candidate's gradient is compared with the shipped tiles' (max |diff|):
a tile shape must not change the numbers beyond the order of a float32 sum.

Writes triton_tiles.json and triton_tiles.md to --out. --dry-run runs the
same code on the CPU under the Triton interpreter at a tiny shape (numbers
mean nothing there).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

if "--dry-run" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import triton  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_gpu import DM_BETA, DM_LAM, Clock, machine_info  # noqa: E402

import robustloss_fast as rf  # noqa: E402
from robustloss_fast.backends.triton import ops  # noqa: E402

# (kernel, BLOCK_C, num_warps); None: the shipped choice for that kernel.
ROW_CANDIDATES = [None, (32768, 32), (4096, 4), (4096, 8), (8192, 4), (16384, 8)]
BACKWARD_CANDIDATES = [None, (4096, 4), (8192, 8)]


def fixed_tile(block_c_max, warps):
    """(n, c) -> (BLOCK_N, BLOCK_C, num_warps) with at most ``block_c_max`` columns on ``warps`` warps."""

    def tile(n, c):
        tile.calls += 1
        block_c = min(triton.next_power_of_2(c), block_c_max)
        block_n = max(1, min(ops.SMALL_TILE // block_c, ops.MAX_BLOCK_N, triton.next_power_of_2(max(n, 1))))
        return block_n, block_c, warps

    tile.calls = 0
    return tile


def measure(z, y, clock, reps):
    scheme = rf.schemes.DM(lam=DM_LAM, beta=DM_BETA)

    def forward():
        with torch.no_grad():
            rf.robust_cross_entropy(z, y, scheme, backend="triton")

    def step():
        z.grad = None
        rf.robust_cross_entropy(z, y, scheme, backend="triton").backward()

    t0 = time.perf_counter()
    step()
    clock.sync()
    first_s = time.perf_counter() - t0
    step()
    forward()
    fwd, _ = clock.times(forward, reps)
    full, _ = clock.times(step, reps)
    # a second round, in the other order, against drift
    full2, _ = clock.times(step, reps)
    fwd2, _ = clock.times(forward, reps)
    f = statistics.median(fwd + fwd2)
    s = statistics.median(full + full2)
    return {"forward_ms": f, "step_ms": s, "backward_ms": s - f, "first_call_s": first_s}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--shapes", default="16384x128256,16384x32000", help="NxC,... (bfloat16)")
    ap.add_argument("--reps", type=int, default=40)
    args = ap.parse_args()
    dev = torch.device("cpu" if args.dry_run else "cuda")
    shapes = [(5, 37), (3, 300)] if args.dry_run else [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    reps = 2 if args.dry_run else args.reps
    if args.dry_run:  # the interpreter: shrink the candidates with the shape
        rows_c = [None, (64, 4), (32, 4)]
        back_c = [None, (64, 4), (32, 2)]
    else:
        rows_c, back_c = ROW_CANDIDATES, BACKWARD_CANDIDATES
    clock = Clock(dev)
    result = {"machine": machine_info(dev, args.dry_run), "dtype": "bfloat16", "scheme": f"DM(lam={DM_LAM}, beta={DM_BETA})",
              "shipped": {"MAX_BLOCK_C": ops.MAX_BLOCK_C, "ROWS_MAX_WARPS": ops.ROWS_MAX_WARPS,
                          "BACKWARD_BLOCK_C": ops.BACKWARD_BLOCK_C},
              "cases": []}
    shipped = {"_rows_tile": ops._rows_tile, "_backward_tile": ops._backward_tile}
    for n, c in shapes:
        g = torch.Generator(device=dev).manual_seed(n * 7 + c)
        z = (torch.randn(n, c, device=dev, generator=g) * 4).to(torch.bfloat16).requires_grad_()
        y = torch.randint(0, c, (n,), device=dev, generator=g)
        ref_grad = None
        combos = [("_rows_tile", r) for r in rows_c] + [("_backward_tile", b) for b in back_c if b is not None]
        for name, cand in combos:
            swapped = fixed_tile(*cand) if cand else None
            if swapped:
                setattr(ops, name, swapped)
            try:
                rec = measure(z, y, clock, reps)
                z.grad = None
                rf.robust_cross_entropy(z, y, rf.schemes.DM(lam=DM_LAM, beta=DM_BETA), backend="triton").backward()
                grad = z.grad.float()
                if ref_grad is None:
                    ref_grad = grad.clone()
                rec["grad_max_abs_diff_vs_shipped"] = (grad - ref_grad).abs().max().item()
                rec["grad_max_abs"] = ref_grad.abs().max().item()
                if swapped and swapped.calls == 0:
                    raise RuntimeError("the candidate tile was never asked for: the swap did not take")
            except Exception as exc:  # noqa: BLE001 - one candidate's failure is recorded
                rec = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            finally:
                for attr, fn in shipped.items():
                    setattr(ops, attr, fn)
                z.grad = None
            rows_tile = cand if name == "_rows_tile" and cand else "shipped"
            rec.update(shape=f"{n}x{c}", rows_tile=rows_tile, backward_tile=cand if name == "_backward_tile" else "shipped")
            result["cases"].append(rec)
            print(json.dumps(rec), flush=True)
        del z, y, ref_grad
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "triton_tiles.json"), "w") as f:
        json.dump(result, f, indent=1)
    lines = ["| shape | rows (BLOCK_C, warps) | backward (BLOCK_C, warps) | forward ms | step ms | backward ms | grad max diff |",
             "|---|---|---|---|---|---|---|"]
    for r in result["cases"]:
        if "error" in r:
            lines.append(f"| {r['shape']} | {r['rows_tile']} | {r['backward_tile']} | {r['error']} | | | |")
        else:
            lines.append(f"| {r['shape']} | {r['rows_tile']} | {r['backward_tile']} | {r['forward_ms']:.3f} | "
                         f"{r['step_ms']:.3f} | {r['backward_ms']:.3f} | {r['grad_max_abs_diff_vs_shipped']:.2e} |")
    with open(os.path.join(args.out, "triton_tiles.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
