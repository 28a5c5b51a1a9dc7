"""Fused linear + robust loss vs materialised logits: time and peak memory (CPU).

Not a test. For each (N, H, V) and dtype, every method runs in a fresh
process so its RSS high-water mark is its own:

* ``eager``: ``logits = hidden @ W.T`` then the pure-PyTorch DM
  (``robust_cross_entropy(..., backend="torch")``), then ``backward``;
* ``fused_logits``: the same logits, the library's fused CPU kernel;
* ``fused_logits_inplace``: the same with ``inplace_backward=True`` (the
  logits' gradient written over the logits);
* ``linear``: ``linear_robust_cross_entropy`` (default: gradient in forward,
  3 matmuls);
* ``linear_recompute``: the same with ``grad_in_forward=False`` (4 matmuls);
* ``linear_hybrid``: the default with ``bench_gpu.split_budget``'s
  ``memory_budget`` (tiles of 2048 columns and no float32 sum): for 16-bit
  inputs the hybrid, ``grad_hidden`` in forward and ``grad_weight`` from
  vocabulary tiles, 4 matmuls (float32, which needs no ``grad_hidden`` sum,
  gets the tiled recompute there);
* ``linear_tiled``: recomputing with ``bench_gpu.lean_budget``'s
  ``memory_budget`` (the float32 ``grad_hidden`` sum and vocabulary tiles:
  4 matmuls, no ``V x H`` float32 sum);
* ``linear_split``: recomputing with ``bench_gpu.split_budget``'s (too small
  for that sum: the backward split in two, 5 matmuls, no float32 sum;
  16-bit only, as a float32 ``grad_hidden`` needs no separate sum);
* ``linear_cce``: ``linear_robust_cross_entropy`` with ``CCE()`` (plain
  cross-entropy, the default gradient placement);
* ``torch_linear_ce``: PyTorch's own ``F.linear_cross_entropy`` (plain
  cross-entropy, torch >= 2.13; skipped where torch lacks it) as a user
  calls it, ``options=None``: its reference path, which materialises the
  logits;
* ``torch_linear_ce_chunked``: the same with
  ``options=LinearCrossEntropyOptions()``, PyTorch's chunked path (its CPU
  defaults: ``acc_policy="accurate"``, ``chunking_method="aspect_ratio"``).
  ``linear_cce`` must match both in time and memory.

Each (method, shape, dtype) runs in two fresh processes, so that each
RSS high-water mark is the method's own:

* memory: peak extra = VmHWM during the first forward + backward minus the
  RSS just before it (inputs allocated), from /proc/self/status (the
  high-water mark is reset through /proc/self/clear_refs). ``transient``
  subtracts the gradients that remain allocated afterwards (hidden.grad,
  weight.grad), which every method must produce. This process runs with
  ``MALLOC_MMAP_THRESHOLD_=4194304`` (all methods alike): glibc's dynamic
  mmap threshold otherwise keeps freed blocks just under 32 MiB (a chunk of
  logits) on the heap, and the high-water mark then counts allocator
  retention instead of live tensors (measured: about 6 extra chunks for the
  chunked methods; eager's blocks are larger and unaffected).
  ``--malloc-default`` turns it off.
* time: median wall time of the forward + backward runs after the first,
  with glibc's default allocator settings (what a user runs with: the fixed
  threshold makes every chunk-sized allocation a fresh mmap with its page
  faults: on the AMD EPYC VM of benchmarks/NOTES.md they doubled the bf16
  chunked methods' time at 2048 x 512 x 32000 and added 0-7% in fp32). The
  process CPU time (all threads) is recorded too, a steadier measure when
  other jobs share the machine.

``--dtypes`` picks the dtypes (float16 too); ``--no-onednn`` turns oneDNN
off in the measured processes (``torch.backends.mkldnn.enabled = False``),
as on a CPU without native bfloat16 GEMMs: ATen's are then emulated.

    python benchmarks/bench_linear.py [--quick | --shapes NxHxV ...] [--methods M ...] [--dtypes D ...] [--no-onednn] [--out benchmarks/results/linear_cpu.json]
    python benchmarks/bench_linear.py --plot benchmarks/results/linear_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

SHAPES = [(2048, 512, 32000), (4096, 1024, 50257)]
DTYPES = ["float32", "bfloat16"]
_NO_ONEDNN = "BENCH_LINEAR_NO_ONEDNN"
METHODS = [
    "eager",
    "fused_logits",
    "fused_logits_inplace",
    "linear",
    "linear_recompute",
    "linear_hybrid",
    "linear_tiled",
    "linear_split",
    "linear_cce",
    "torch_linear_ce",
    "torch_linear_ce_chunked",
]


def run_one(method: str, n: int, hdim: int, v: int, dtype: str, repeats: int) -> dict:
    import torch

    import robustloss_fast as rf
    from robustloss_fast._bench import reset_rss_peak, status_kib
    from robustloss_fast.linear import linear_robust_cross_entropy

    dt = getattr(torch, dtype)
    if os.environ.get(_NO_ONEDNN) == "1":
        torch.backends.mkldnn.enabled = False
    torch.manual_seed(0)
    hidden = (torch.randn(n, hdim) / hdim**0.5).to(dt).requires_grad_()
    weight = torch.randn(v, hdim).to(dt).requires_grad_()
    target = torch.randint(0, v, (n,))
    target[::17] = -100
    scheme = rf.CCE() if method == "linear_cce" else rf.DM()
    budget = None
    if method == "linear_split" and dt.itemsize > 2:
        return {"method": method, "N": n, "H": hdim, "V": v, "dtype": dtype,
                "skipped": "only 16-bit inputs split the backward"}  # fmt: skip
    if method in ("linear_hybrid", "linear_tiled", "linear_split"):
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from bench_gpu import lean_budget, split_budget

        budget = (lean_budget if method == "linear_tiled" else split_budget)(n, hdim, v, dt.itemsize)
    if method.startswith("torch_linear_ce") and not hasattr(torch.nn.functional, "linear_cross_entropy"):
        return {"method": method, "N": n, "H": hdim, "V": v, "dtype": dtype,
                "skipped": f"torch {torch.__version__} has no F.linear_cross_entropy"}  # fmt: skip

    def step():
        hidden.grad = None
        weight.grad = None
        if method in ("eager", "fused_logits", "fused_logits_inplace"):
            logits = hidden @ weight.t()
            be = "torch" if method == "eager" else "cpu"
            inplace = method == "fused_logits_inplace"
            loss = rf.robust_cross_entropy(logits, target, scheme, backend=be, inplace_backward=inplace)
        elif method == "torch_linear_ce":
            loss = torch.nn.functional.linear_cross_entropy(hidden, weight, target, ignore_index=-100)
        elif method == "torch_linear_ce_chunked":
            opts = torch.nn.LinearCrossEntropyOptions()
            loss = torch.nn.functional.linear_cross_entropy(hidden, weight, target, ignore_index=-100, options=opts)
        else:
            # linear, linear_cce and linear_hybrid: the default (the budget picks the hybrid).
            gif = False if method in ("linear_recompute", "linear_tiled", "linear_split") else None
            loss = linear_robust_cross_entropy(hidden, weight, target, scheme, grad_in_forward=gif, memory_budget=budget)
        loss.backward()
        return loss

    import gc

    gc.collect()
    reset_ok = reset_rss_peak()
    rss0 = status_kib("VmRSS")
    t0 = time.perf_counter()
    loss = step()
    first = time.perf_counter() - t0
    hwm = status_kib("VmHWM")
    grads_bytes = sum(x.grad.numel() * x.grad.element_size() for x in (hidden, weight))
    times, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    extra = (hwm - rss0) * 1024
    return {
        "method": method,
        "N": n,
        "H": hdim,
        "V": v,
        "dtype": dtype,
        "loss": float(loss.detach()),
        "first_s": first,
        "times_s": times,
        "median_s": statistics.median(times) if times else first,
        "cpu_times_s": cpu,
        "median_cpu_s": statistics.median(cpu) if cpu else None,
        "peak_extra_bytes": extra,
        "transient_bytes": extra - grads_bytes,
        "grads_bytes": grads_bytes,
        "hwm_reset": reset_ok,
        "threads": torch.get_num_threads(),
    }


def _git_head():
    """The checkout's commit (and whether it had uncommitted changes), or None outside git."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True)  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return None
    return {"commit": head.stdout.strip(), "dirty": bool(dirty.stdout.strip())}


def _child(method, n, h, v, dtype, repeats, env) -> dict:
    cmd = [sys.executable, __file__, "--child", method, str(n), str(h), str(v), dtype, str(repeats)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="only the small shape")
    ap.add_argument("--shapes", nargs="+", metavar="NxHxV", help="these shapes instead (e.g. 16384x128x8000)")
    ap.add_argument("--methods", nargs="+", choices=METHODS, help="only these methods (default: all)")
    ap.add_argument("--dtypes", nargs="+", choices=["float32", "bfloat16", "float16"], default=DTYPES)
    ap.add_argument("--no-onednn", action="store_true", help="measure with oneDNN off (no native bfloat16 GEMM)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "linear_cpu.json"))
    ap.add_argument("--malloc-default", action="store_true", help="do not fix glibc's mmap threshold")
    ap.add_argument("--plot", metavar="JSON", help="only draw the PNG next to an existing JSON")
    ap.add_argument("--child", nargs=6, metavar=("METHOD", "N", "H", "V", "DTYPE", "REPEATS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        m, n, h, v, dt, r = args.child
        print(json.dumps(run_one(m, int(n), int(h), int(v), dt, int(r))))
        return
    if args.plot:
        plot(args.plot)
        return
    shapes = SHAPES[:1] if args.quick else SHAPES
    if args.shapes:
        shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes]
    os.environ[_NO_ONEDNN] = "1" if args.no_onednn else "0"
    mem_env = dict(os.environ)
    if not args.malloc_default:
        mem_env["MALLOC_MMAP_THRESHOLD_"] = str(4 << 20)
    results = []
    for n, h, v in shapes:
        repeats = 3 if n * h * v < 1e11 else 1
        for dt in args.dtypes:
            for m in args.methods or METHODS:
                res = _child(m, n, h, v, dt, repeats, dict(os.environ))
                if "skipped" not in res:
                    mem = _child(m, n, h, v, dt, 0, mem_env)
                    res["default_malloc_peak_extra_bytes"] = res["peak_extra_bytes"]
                    for key in ("peak_extra_bytes", "transient_bytes", "hwm_reset"):
                        res[key] = mem[key]
                results.append(res)
                if "skipped" in res:
                    print(f"{dt:9s} N={n} H={h} V={v} {m:23s} skipped: {res['skipped']}", flush=True)
                    continue
                print(
                    f"{dt:9s} N={n} H={h} V={v} {m:23s} time {res['median_s']:7.2f} s "
                    f"(cpu {res['median_cpu_s']:7.2f} s)  "
                    f"peak extra {res['peak_extra_bytes'] / 2**20:8.1f} MiB  "
                    f"transient {res['transient_bytes'] / 2**20:8.1f} MiB",
                    flush=True,
                )
    import torch

    from robustloss_fast._bench import _cpu_model

    meta = {
        "machine": _cpu_model(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "memory_malloc_mmap_threshold": mem_env.get("MALLOC_MMAP_THRESHOLD_"),
        "time_malloc": "glibc defaults",
        "load_average_at_end": os.getloadavg(),
        "git": _git_head(),
        "onednn": not args.no_onednn,
    }
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)
    print("wrote", args.out)
    plot(args.out)


def plot(path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(path) as f:
        results = json.load(f)["results"]
    configs = sorted({(r["N"], r["H"], r["V"], r["dtype"]) for r in results})
    fig, axes = plt.subplots(1, 2, figsize=(14, 5))
    width = 0.8 / len(METHODS)
    for k, m in enumerate(METHODS):
        rows = {(r["N"], r["H"], r["V"], r["dtype"]): r for r in results if r["method"] == m and "skipped" not in r}
        xs = [i + k * width for i in range(len(configs))]
        axes[0].bar(xs, [rows[c]["median_s"] if c in rows else 0 for c in configs], width, label=m)
        axes[1].bar(xs, [rows[c]["transient_bytes"] / 2**20 if c in rows else 0 for c in configs], width, label=m)
    labels = [f"N={n} H={h}\nV={v}\n{dt}" for n, h, v, dt in configs]
    for ax, title in zip(axes, ("forward + backward time (s)", "peak transient memory (MiB)")):
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(configs))], labels, fontsize=8)
        ax.set_title(title)
    axes[1].set_yscale("log")
    axes[0].legend()
    fig.suptitle("robust loss after a linear layer (DM; CCE and PyTorch's linear_cross_entropy: plain CE), CPU (N x H x V)")
    fig.tight_layout()
    png = os.path.splitext(path)[0] + ".png"
    fig.savefig(png, dpi=110)
    print("wrote", png)


if __name__ == "__main__":
    main()
