"""The GPU benchmark: robustloss_fast and the losses a user would otherwise pick, in one run.

Three parts: ``cross_row`` times one op (below); in the other two one *step*
is what a training loop does with the loss: zero the gradients, forward,
backward.

``logits`` (issue #14): materialised logits ``z (N, C)`` (spread 3, uniform
targets) at 16384x128256 bf16, 16384x32000 bf16, 8192x1000 fp32 and
65536x10 fp32. Variants: ``F.cross_entropy``; eager DM (plain PyTorch, the
Caffe layer's gradient in tensor ops); both under ``torch.compile``;
Liger-Kernel's cross-entropy; ours, DM (normalised mean, the default) and CCE
on the ``cuda`` and ``triton`` backends and DM on ``auto`` (and an in-place
variant when ``robust_cross_entropy`` has such a keyword). Each case also times
a device-to-device copy of the logits: reading the logits once and writing a
gradient once is all a loss must do, so the copy is the floor.

``linear`` (issue #15): ``hidden (N, 4096) @ weight (128256, 4096).T`` and the
loss, bf16, both inputs requiring gradients, N = 8192 and 32768. Variants:
eager ``F.cross_entropy((h @ W.T).float(), y)``, eager DM on the same logits,
``torch.compile`` of the eager CE, ``F.linear_cross_entropy`` (chunked; torch
>= 2.13), Liger's FusedLinearCrossEntropy, Apple's cut-cross-entropy, and
``linear_robust_cross_entropy`` with DM and CCE (the default plan; the hybrid
with a memory budget of Liger's one chunk of logits, 4 matmuls and no float32
sum across chunks; DM recomputing at the "lean" and "split" budgets, 4 and 5
matmuls; DM also in fixed chunks of 2048 rows, the default's size before it
grew to 2 GiB). The floor is the three
N x H x V matrix products of any forward + backward at the bf16 rate of a
large product measured in the same run.

Method: CUDA-event time of each step,
warm-ups first (compilation and Triton JIT stay out; the first call's time is
recorded apart), then two rounds of repeats (variant order reversed in the
second; both rounds' medians are recorded, a spread to read differences
against), medians and quartiles. When the inputs are under 4x the L2 cache a
256 MB buffer is written before every step so the step does not start from a
warm cache. A variant that writes its gradient into its input (Liger) gets the
input restored before every step, outside the timed region. "Extra" memory =
peak allocated during one step above what was allocated before it (inputs
there, gradients unset): the gradients the step leaves count. Every
variant's gradient is compared once with a float64 reference computed here
(logits), or with the eager variant of the same loss (linear): relative L1,
``sum |g - ref| / sum |ref|``. A variant whose memory estimate exceeds what
is free is skipped, and the JSON says why; so is any variant that finds its
library or backend missing, and any work the time budget (``--budget-s``)
leaves no room for.

``cross_row`` (first, a few seconds): the cross-row step alone (the
backend's ``finalize`` on float32 rows of the normalised DM mean), per GPU
backend, at 512 to 65536 rows. Both GPU backends run it in one launch up to
1024 rows and in two above (the limit this table set: one launch cost 27-31 us
at 8192 rows on an H200, two 7-12 us), so 1024 against 1025 and 2048 rows
say whether the limit still sits where one launch is cheaper. "eager": CUDA events around each call, the
host's cost to issue it included (what a step sees when the host is the
slower side); "graph": 20 calls in a CUDA graph, replayed, per call (the
device's time alone).

``--dry-run`` runs the same code on the CPU with tiny shapes (compiled
variants through the ``aot_eager`` backend; Triton kernels, ours and Liger's,
under the Triton interpreter) and writes the same JSON schema and PNG: the
check that costs no GPU time.

    PYTHONPATH=$PWD python benchmarks/bench_gpu.py --out DIR [--only cross_row|logits|linear] [--budget-s 300]
    PYTHONPATH=$PWD python benchmarks/bench_gpu.py --dry-run --out /tmp/bench
    python benchmarks/bench_gpu.py --table DIR/bench_gpu.json      # the markdown tables again
    python benchmarks/bench_gpu.py --source-digest                 # match a JSON to a checkout

Writes DIR/bench_gpu.json (rewritten after every case, so a run cut short
keeps what it measured), DIR/bench_gpu.md and DIR/bench_gpu.png.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import inspect
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback

if __name__ == "__main__" and "--dry-run" in sys.argv[1:]:
    # Triton reads this once, when it is first imported: before torch is.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

SCHEMA = "robustloss_fast/bench_gpu/1"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

LOGITS_SHAPES = [(16384, 128256, "bfloat16"), (16384, 32000, "bfloat16"), (8192, 1000, "float32"), (65536, 10, "float32")]
# The dry run's Triton kernels run under the interpreter, one program at a time: few rows.
LOGITS_SHAPES_DRY = [(16, 1000, "bfloat16"), (16, 320, "bfloat16"), (16, 100, "float32"), (32, 10, "float32")]
CROSS_ROW_ROWS = [512, 1024, 1025, 2048, 8192, 65536]
CROSS_ROW_ROWS_DRY = [16, 17]
CROSS_ROW_GRAPH_CALLS = 20
LINEAR_TOKENS, LINEAR_H, LINEAR_V = [8192, 32768], 4096, 128256
LINEAR_TOKENS_DRY, LINEAR_H_DRY, LINEAR_V_DRY = [16, 32], 32, 500
DM_LAM, DM_BETA = 1.0, 8.0
LOGIT_SPREAD = 3.0

LOGITS_VARIANTS = [
    "F.cross_entropy",
    "eager DM",
    "compile DM",
    "compile F.cross_entropy",
    "Liger CE",
    "ours DM cuda",
    "ours CCE cuda",
    "ours DM triton",
    "ours CCE triton",
    "ours DM auto",
    "ours CCE auto",
]
INPLACE_VARIANT = "ours DM auto in-place"
LINEAR_VARIANTS = [
    "eager CE",
    "eager DM",
    "compile CE",
    "torch linear_cross_entropy",
    "Liger FLCE",
    "Apple CCE",
    "ours DM",
    "ours CCE",
    "ours DM hybrid",
    "ours CCE hybrid",
    "ours DM lean",
    "ours DM split",
    "ours DM 2048-row chunks",
]
# The default chunks before 2 GiB (512 MiB: 2048 rows at V = 128256), timed beside the new default.
FIXED_CHUNK_ROWS = {"ours DM 2048-row chunks": 2048}


def lean_budget(n, h, v, itemsize):
    """memory_budget of the "lean" variant: the float32 grad_hidden sum, tiles of all N rows by
    min(8192, V / 4) columns, the row statistics and 64 KiB -- recomputing (grad_in_forward=False),
    the vocabulary-tiled path (no V x H float32 accumulator; 4 matmuls). 256 MiB at N = 8192,
    H = 4096, bf16."""
    return 4 * n * h + n * min(8192, v // 4) * itemsize + 48 * n + (1 << 16)


def split_budget(n, h, v, itemsize):
    """memory_budget of the "split" variant: tiles of all N rows by min(2048, V / 4) columns, the row
    statistics and 4 KiB -- recomputing, too little for the float32 grad_hidden sum beside tiles of 1024
    columns, so the backward splits in two (5 matmuls, no float32 sum of either gradient). 32.4 MiB at
    N = 8192, bf16."""
    return n * min(2048, v // 4) * itemsize + 48 * n + (1 << 12)


def liger_budget(n, h, v, itemsize):
    """memory_budget of the "hybrid" variants: the bytes of Liger's one chunk of logits, whose rows are
    the power of two at or above N / ceil(V / H) (256 rows, 62.6 MiB at N = 8192, H = 4096, V = 128256
    in bf16; 1024 rows, 250.5 MiB at N = 32768) -- the hybrid at Liger's memory: grad_hidden in forward
    in chunks of a little fewer rows, grad_weight from tiles of all N rows (4 matmuls, no float32 sum
    across chunks)."""
    rows = 1 << max(0, math.ceil(math.log2(max(1, -(-n // -(-v // h))))))
    return rows * v * itemsize


# A variant's last word: its memory_budget function and grad_in_forward (None: the default plan).
_BUDGETS = {"lean": (lean_budget, False), "split": (split_budget, False), "hybrid": (liger_budget, None)}


def _budget_of(name):
    """(memory_budget function or None, grad_in_forward) of the variant."""
    return _BUDGETS.get(name.rsplit(" ", 1)[-1], (None, None))


class Skip(Exception):
    """A variant that cannot run here; the message says why and goes into the JSON."""


# --------------------------------------------------------------------------- the machine


def _run_text(cmd, cwd=None):
    try:
        out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def source_digest() -> str:
    """sha256 of the library's sources (path and bytes): names the code measured where git is absent."""
    h = hashlib.sha256()
    paths = []
    for top in ("robustloss_fast", "csrc"):
        for dirpath, dirnames, filenames in os.walk(os.path.join(ROOT, top)):
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
            paths += [os.path.join(dirpath, f) for f in filenames if f.endswith((".py", ".cpp", ".cu", ".h", ".cuh"))]
    paths += [os.path.join(ROOT, f) for f in ("setup.py", "pyproject.toml")]
    for path in sorted(p for p in paths if os.path.isfile(p)):
        h.update(os.path.relpath(path, ROOT).encode() + b"\0")
        with open(path, "rb") as f:
            h.update(f.read())
        h.update(b"\0")
    return h.hexdigest()


def _git_state():
    commit = _run_text(["git", "rev-parse", "HEAD"], cwd=ROOT)
    if commit is None:
        # The device machine gets a copy of the working tree without .git.
        return {"commit": os.environ.get("GIT_COMMIT") or None, "commit_from": "GIT_COMMIT" if os.environ.get("GIT_COMMIT") else None}
    dirty = _run_text(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT)
    return {"commit": commit, "commit_from": "git", "modified_files": None if dirty is None else len(dirty.splitlines())}


def _version(module):
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:  # noqa: BLE001 - any failure means "unknown"
        return None


def _nvidia_smi():
    """The card's state as nvidia-smi reads it, at the start and the end (read, never changed)."""
    # One unknown field fails the whole query: fall back to the two that every driver has.
    for fields in ("name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,temperature.gpu,power.draw,memory.used",
                   "name,driver_version"):
        text = _run_text(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader"])
        if text:
            return dict(zip(fields.split(","), (x.strip() for x in text.splitlines()[0].split(","))))
    return None


def machine_info(device, dry_run):
    import robustloss_fast as rf
    from robustloss_fast._bench import _cpu_model

    info = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": str(device),
        "dry_run": dry_run,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _version("triton"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "git": _git_state(),
        "source_digest": source_digest(),
        "robustloss_fast": getattr(rf, "__version__", None),
        "available_backends": rf.available_backends(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET"),
        "peers": {"liger_kernel": _version("liger-kernel"), "cut_cross_entropy": _version("cut-cross-entropy")},
        "gpu": None,
        "driver": None,
    }
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info["gpu"] = {
            "name": p.name,
            "capability": f"{p.major}.{p.minor}",
            "multiprocessors": p.multi_processor_count,
            "memory_bytes": p.total_memory,
            "l2_bytes": getattr(p, "L2_cache_size", None),
        }
        smi = _nvidia_smi()
        info["nvidia_smi_start"] = smi
        info["driver"] = smi.get("driver_version") if smi else None
    return info


# --------------------------------------------------------------------------- timing


class Clock:
    """Times steps: CUDA events on a GPU, the host clock on the CPU (dry run)."""

    def __init__(self, device, flush_bytes=0):
        self.device = device
        self.cuda = device.type == "cuda"
        self.flush_buf = None
        if self.cuda and flush_bytes:
            self.flush_buf = torch.empty(flush_bytes // 4, dtype=torch.int32, device=device)

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def times(self, step, reps, prepare=None):
        """Per-step device time (ms) and host time spent issuing the step (ms), ``reps`` steps."""
        host = []
        if not self.cuda:
            dev = []
            for _ in range(reps):
                if prepare is not None:
                    prepare()
                t0 = time.perf_counter()
                step()
                dev.append((time.perf_counter() - t0) * 1e3)
            return dev, dev
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        # No synchronisation between steps: as in training, the host runs ahead
        # unless the step itself waits on the device.
        for start, end in events:
            if prepare is not None:
                prepare()
            if self.flush_buf is not None:
                self.flush_buf.zero_()
            start.record()
            t0 = time.perf_counter()
            step()
            host.append((time.perf_counter() - t0) * 1e3)
            end.record()
        torch.cuda.synchronize(self.device)
        return [s.elapsed_time(e) for s, e in events], host

    def wall(self, fn):
        """Seconds of one synchronised call (warm-ups, first calls)."""
        self.sync()
        t0 = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - t0


def _stats(times):
    xs = sorted(times)
    if len(xs) >= 2:
        q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    else:
        q1 = q3 = xs[0]
    return {"median_ms": statistics.median(xs), "q1_ms": q1, "q3_ms": q3, "min_ms": xs[0], "reps": len(xs)}


class Budget:
    """Wall-clock budget of the run: work that would not fit is skipped, not started."""

    def __init__(self, seconds):
        self.t0 = time.monotonic()
        self.seconds = seconds

    def elapsed(self):
        return time.monotonic() - self.t0


def _free_bytes(device):
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _extra_bytes(device, step, prepare=None):
    """Peak allocated during one step above what was allocated before it (None on the CPU)."""
    if device.type != "cuda":
        return None
    if prepare is not None:
        prepare()
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


# Steps run once more under torch.profiler, after everything is timed: each kernel's device time,
# so that a step's time over its floor can be traced to the kernels it goes to (GEMMs, row passes,
# the copies and sums between them) without another run on the GPU. Last, because a profiler
# session leaves CUPTI behind it (slower launches were reported after one; with CUDA graphs,
# crashes on its re-initialisation), and because timing must not see it.
PROFILED_LOGITS = ["Liger CE", "compile DM", "ours DM auto"]  # at the first logits shape
PROFILED_LINEAR = ["compile CE", "Liger FLCE", "ours DM", "ours DM hybrid", "ours DM 2048-row chunks"]  # first N


def _kernel_profile(device, step, prepare=None, top=12):
    """One step under torch.profiler: device time (ms) and launches per kernel, the largest first.

    On the CPU (the dry run) the same for the ATen ops by self CPU time, which checks only that this
    runs and what the JSON holds.
    """
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    if prepare is not None:
        prepare()
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        step()
        if cuda:
            torch.cuda.synchronize(device)
    spent = {}
    for e in prof.events():
        on_device = e.device_type != torch.autograd.DeviceType.CPU
        # GPU user annotations (record_function ranges, Inductor's graph calls) span kernels: not kernels.
        if on_device != cuda or getattr(e, "is_user_annotation", False):
            continue
        us = e.time_range.elapsed_us() if cuda else e.self_cpu_time_total
        ms, calls = spent.get(e.name, (0.0, 0))
        spent[e.name] = (ms + us / 1e3, calls + 1)
    total = sum(ms for ms, _ in spent.values())
    ranked = sorted(spent.items(), key=lambda kv: -kv[1][0])
    rows = [{"kernel": name[:160], "ms": ms, "calls": calls} for name, (ms, calls) in ranked[:top]]
    rest = ranked[top:]
    return {"unit": "device ms" if cuda else "self CPU ms (dry run)", "total_ms": total,
            "launches": sum(c for _, (_, c) in ranked), "top": rows,
            "rest": {"kinds": len(rest), "ms": sum(ms for _, (ms, _) in rest), "calls": sum(c for _, (_, c) in rest)}}


def _lost_context(exc):
    """True for errors after which the CUDA context is unusable (every later call would fail)."""
    text = str(exc)
    return any(s in text for s in ("illegal memory access", "device-side assert", "unspecified launch failure",
                                   "misaligned address", "CUDA error: an illegal"))


def _exc_record(exc):
    kind = "skipped" if isinstance(exc, (Skip, torch.cuda.OutOfMemoryError)) else "error"
    msg = str(exc).strip().splitlines()
    reason = (msg[0] if msg else "") if isinstance(exc, Skip) else f"{type(exc).__name__}: {' '.join(msg)[:400]}"
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        reason = "out of memory: " + reason
    rec = {"status": kind, "reason": reason, "exception": type(exc).__name__}
    if kind == "error":
        rec["traceback"] = traceback.format_exc(limit=6)[-2000:]
    return rec


def _rel_l1(got, ref_chunks):
    """sum |got - ref| / sum |ref| over row chunks ``(rows, ref_chunk)`` (float64 sums)."""
    num = den = 0.0
    finite = True
    for rows, ref in ref_chunks:
        g = got[rows].double()
        finite = finite and bool(torch.isfinite(g).all())
        num += float((g - ref).abs().sum())
        den += float(ref.abs().sum())
    return (num / den if den else float("nan")), finite


# --------------------------------------------------------------------------- losses written here


def eager_dm(z, y, lam=DM_LAM, beta=DM_BETA):
    """DM as a user writes it in PyTorch: the Caffe layer's gradient with tensor ops.

    The emphasis ``w = exp(beta p^lam (1 - p))`` is a constant (detached);
    ``w / (2 (1 - p) + 1e-6) / sum w`` times the cross-entropy of the row has
    the gradient ``w / (2 D) (r - e_y)`` of the library's DM (``r`` the
    softmax over the other classes, ``D = sum w``), up to the 1e-6.
    """
    zf = z.float()  # 16-bit logits: the loss in float32, as one writes it for them
    p = torch.softmax(zf, dim=1).gather(1, y[:, None]).squeeze(1).detach()
    q = 1 - p
    w = torch.exp(beta * p.pow(lam) * q)
    coef = w / (2 * q + 1e-6) / w.sum()
    return (coef * F.cross_entropy(zf, y, reduction="none")).sum()


def eager_ce_linear(h, w, y):
    return F.cross_entropy((h @ w.T).float(), y)


def eager_dm_linear(h, w, y):
    return eager_dm((h @ w.T).float(), y)


class LogitsReference:
    """The exact gradients of mean CE and normalised DM on ``z``, in float64, one row chunk at a time."""

    def __init__(self, z, y, chunk_bytes=1 << 29):
        self.z, self.y = z, y
        n, c = z.shape
        self.rows = max(1, chunk_bytes // (8 * c))
        lse, zy = [], []
        for i in range(0, n, self.rows):
            zc = z[i : i + self.rows].double()
            lse.append(torch.logsumexp(zc, dim=1))
            zy.append(zc.gather(1, y[i : i + self.rows, None]).squeeze(1))
        self.lse, zy = torch.cat(lse), torch.cat(zy)
        logp = zy - self.lse
        p = logp.exp()
        self.q = -torch.expm1(logp)  # 1 - p without cancellation
        self.w = torch.exp(DM_BETA * p.pow(DM_LAM) * self.q)
        self.d = self.w.sum()

    def chunks(self, family):
        n = self.z.shape[0]
        for i in range(0, n, self.rows):
            rows = slice(i, min(i + self.rows, n))
            sm = torch.exp(self.z[rows].double() - self.lse[rows, None])
            yc = self.y[rows, None]
            if family == "ce":
                g = sm.scatter_add_(1, yc, torch.full_like(sm[:, :1], -1.0)) / n
            else:
                coef = self.w[rows] / (2 * self.d)
                g = (coef / self.q[rows])[:, None] * sm
                g.scatter_(1, yc, -coef[:, None])
            yield rows, g


# --------------------------------------------------------------------------- variants


def _compile(fn, dry_run):
    # On the CPU the dry run checks that Dynamo captures the function; Inductor's
    # C++ code generation would cost more than the whole dry run.
    return torch.compile(fn, dynamic=False, backend="aot_eager" if dry_run else "inductor")


def _inplace_keyword():
    """The keyword of robust_cross_entropy that writes the gradient into the logits, if it has one."""
    import robustloss_fast as rf

    for name, param in inspect.signature(rf.robust_cross_entropy).parameters.items():
        if param.kind == param.KEYWORD_ONLY and ("inplace" in name.lower() or "in_place" in name.lower()):
            return name
    return None


def _ours(scheme_name, backend, **kw):
    import robustloss_fast as rf

    scheme = rf.schemes.DM(lam=DM_LAM, beta=DM_BETA) if scheme_name == "DM" else rf.schemes.CCE()
    if backend != "auto" and backend not in rf.available_backends():
        raise Skip(f"backend {backend!r} is not available here (available: {', '.join(rf.available_backends())})")

    def fn(z, y):
        return rf.robust_cross_entropy(z, y, scheme, backend=backend, **kw)

    return fn


def logits_variant(name, dry_run):
    """(loss function of (z, y), gradient family, memory estimate in units of (logits bytes, float32 logits bytes))."""
    if name == "F.cross_entropy":
        return F.cross_entropy, "ce", (4, 0)
    if name == "eager DM":
        return eager_dm, "dm", (2, 5)
    if name == "compile DM":
        return _compile(eager_dm, dry_run), "dm", (2, 3)
    if name == "compile F.cross_entropy":
        return _compile(lambda z, y: F.cross_entropy(z, y), dry_run), "ce", (3, 1)
    if name == "Liger CE":
        try:
            from liger_kernel.transformers import LigerCrossEntropyLoss
        except Exception as exc:  # noqa: BLE001 - an absent or broken peer is a skip
            raise Skip(f"liger_kernel not importable ({type(exc).__name__}: {exc})") from None
        return LigerCrossEntropyLoss(), "ce", (1, 0)
    if name == INPLACE_VARIANT:
        if _inplace_keyword() is None:
            raise Skip("robust_cross_entropy has no in-place keyword")
        return _ours_inplace(), "dm", (1, 0)
    if name.startswith("ours "):
        _, scheme, backend = name.split()
        if dry_run and backend == "cuda":
            raise Skip("dry run on the CPU: backend 'cuda' runs on CUDA tensors")
        return _ours(scheme, backend), scheme.lower() if scheme == "DM" else "ce", (3, 0)
    raise ValueError(f"unknown variant {name!r}")


def linear_variant(name, dry_run):
    """(loss function of (hidden, weight, target), gradient family, memory estimate (N, H, V, itemsize) -> bytes)."""
    grads = lambda n, h, v, s: (n * h + v * h) * s  # noqa: E731 - the gradients every variant leaves
    fp32_acc = lambda n, h, v, s: 4 * (n * h + v * h)  # noqa: E731
    if name == "eager CE":
        return eager_ce_linear, "ce", lambda n, h, v, s: 12 * n * v + grads(n, h, v, s)
    if name == "eager DM":
        return eager_dm_linear, "dm", lambda n, h, v, s: 16 * n * v + grads(n, h, v, s)
    if name == "compile CE":
        return _compile(eager_ce_linear, dry_run), "ce", lambda n, h, v, s: 8 * n * v + grads(n, h, v, s)
    if name == "torch linear_cross_entropy":
        if not hasattr(F, "linear_cross_entropy") or not hasattr(torch.nn, "LinearCrossEntropyOptions"):
            raise Skip(f"torch {torch.__version__} has no F.linear_cross_entropy with chunking options (torch >= 2.13)")
        opts = torch.nn.LinearCrossEntropyOptions()
        fn = lambda h, w, y: F.linear_cross_entropy(h, w, y, options=opts)  # noqa: E731
        return fn, "ce", lambda n, h, v, s: 2 * grads(n, h, v, s) + fp32_acc(n, h, v, s) + (1 << 31)
    if name == "Liger FLCE":
        try:
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        except Exception as exc:  # noqa: BLE001
            raise Skip(f"liger_kernel not importable ({type(exc).__name__}: {exc})") from None
        loss = LigerFusedLinearCrossEntropyLoss()
        return (lambda h, w, y: loss(w, h, y)), "ce", lambda n, h, v, s: 2 * grads(n, h, v, s) + fp32_acc(n, h, v, s) + (1 << 31)
    if name == "Apple CCE":
        try:
            from cut_cross_entropy import linear_cross_entropy
        except Exception as exc:  # noqa: BLE001
            raise Skip(f"cut_cross_entropy not importable ({type(exc).__name__}: {exc})") from None
        return linear_cross_entropy, "ce", lambda n, h, v, s: 2 * grads(n, h, v, s) + fp32_acc(n, h, v, s) + (1 << 30)
    if name.startswith("ours "):
        import robustloss_fast as rf
        from robustloss_fast.linear import _plan

        scheme = rf.schemes.DM(lam=DM_LAM, beta=DM_BETA) if name.startswith("ours DM") else rf.schemes.CCE()
        budget_of, gif = _budget_of(name)
        rows = FIXED_CHUNK_ROWS.get(name)

        def fn(h, w, y):
            budget = budget_of(h.shape[0], h.shape[1], w.shape[0], h.element_size()) if budget_of else None
            return rf.linear_robust_cross_entropy(h, w, y, scheme, memory_budget=budget, chunk_size=rows,
                                                  grad_in_forward=gif)

        def estimate(n, h, v, s):
            # The layer's own model of its working memory, plus the gradients it returns.
            dtype = {2: torch.bfloat16, 4: torch.float32}[s]
            plan = _plan(n, v, h, dtype, "cuda", needs_h=True, needs_w=True, needs_b=False, gif=gif is not False,
                         cap=None, budget=budget_of(n, h, v, s) if budget_of else None, chunk_size=rows)
            return plan.working_bytes + grads(n, h, v, s)

        return fn, "dm" if name.startswith("ours DM") else "ce", estimate
    raise ValueError(f"unknown variant {name!r}")


# --------------------------------------------------------------------------- one case, every variant


class Runner:
    """What a run shares: device, budget, settings, and whether the CUDA context still works."""

    def __init__(self, device, budget, dry_run, compile_reserve_s=None):
        self.device = device
        self.budget = budget
        self.dry_run = dry_run
        self.broken = None  # why the CUDA context is unusable, once it is
        self.clock = Clock(device)
        if dry_run:
            self.warmup, self.min_reps, self.max_reps, self.target_s = 1, 2, 2, 0.0
            self.compile_reserve_s = 5.0
        else:
            self.warmup, self.min_reps, self.max_reps, self.target_s = 3, 8, 60, 0.3
            # A cold Inductor compile of a forward + backward graph takes tens of
            # seconds; one whose graphs --prewarm put in the caches, a few.
            self.compile_reserve_s = 60.0 if compile_reserve_s is None else compile_reserve_s

    def settings(self):
        cuda = self.device.type == "cuda"
        return {
            "step": "zero grad (grad = None) + forward + backward",
            "timer": "CUDA events around each step, no synchronisation between steps" if cuda
            else "host clock around each step (CPU dry run)",
            "warmup_steps": self.warmup,
            "reps": f"{self.min_reps}..{self.max_reps} (about {self.target_s} s of steps) per variant, in two rounds, "
                    "the second in reverse variant order; fewer when the budget is short",
            "stat": "median of all reps; q1/q3 quartiles; round_medians_ms: each round's median; "
                    "host_ms: median host time to issue one step",
            "extra_memory": "torch.cuda.max_memory_allocated during one step - memory_allocated before it "
                            "(gradients unset before, left set after)" if cuda else "not measured on the CPU",
            "l2_flush": "a 256 MB buffer is zeroed before every timed step when the inputs are under 4x the L2",
            "dm": {"lam": DM_LAM, "beta": DM_BETA, "reduction": "mean", "normalize": True},
            "logit_spread": LOGIT_SPREAD,
            "compile_backend": "aot_eager (dry run)" if self.dry_run else "inductor",
            "budget_s": self.budget.seconds,
        }

    def skip_all(self, names, reason):
        return {name: {"status": "skipped", "reason": reason} for name in names}

    def _lost(self, name, rec, exc):
        if self.device.type == "cuda" and _lost_context(exc):
            self.broken = f"{name}: {rec['reason'][:200]}"

    def _prepare(self, name, build, make_step, check_grad, estimate, restore, changed):
        """Build one variant, call it once (timed apart), check its gradient and memory; a record with private keys."""
        built = build(name)
        fn, family = built[0], built[1]
        rec = {"status": "ok"}
        est, free = estimate(name, built), _free_bytes(self.device)
        if est is not None:
            rec["estimated_bytes"] = int(est)
        if est is not None and free is not None and est > 0.9 * free:
            raise Skip(f"would not fit: needs about {est / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free")
        step = make_step(fn)
        restore()
        rec["first_call_s"] = self.clock.wall(step)
        # The gradient of the first call, before anything else touches it, and
        # whether the variant wrote into its input (then the input is restored
        # before every step, outside the timed region).
        rec.update(check_grad(name, family))
        rec["mutates_input"] = bool(changed())
        prep = restore if rec["mutates_input"] else None
        warm = []
        for _ in range(max(self.warmup - 1, 0)):
            if prep:
                prep()
            warm.append(self.clock.wall(step))
        rec["extra_bytes"] = _extra_bytes(self.device, step, prep)
        t = min(warm) if warm else rec["first_call_s"]
        rec["_t"] = t
        rec["_reps"] = max(self.min_reps, min(self.max_reps, int(self.target_s / max(t, 1e-6))))
        return rec, step, prep

    def measure(self, names, build, make_step, check_grad, estimate, deadline, restore, changed, flush_bytes=0):
        """Every variant of one case: prepare each, then time them all in two rounds.

        build(name) -> (fn, family, estimate data); make_step(fn) -> step();
        check_grad(name, family) -> dict; estimate(name, built) -> bytes or None;
        restore() puts the inputs back (a variant may write into them); changed() says whether it did.
        """
        results, live = {}, {}
        for name in names:
            if self.broken:
                results[name] = {"status": "skipped", "reason": f"CUDA context lost earlier ({self.broken})"}
                continue
            left = deadline - self.budget.elapsed()
            need = self.compile_reserve_s if name.startswith("compile") else 2.0
            if left < need:
                results[name] = {"status": "skipped",
                                 "reason": f"time budget: {max(left, 0):.0f} s left for this part, {need:.0f} s needed"}
                continue
            try:
                rec, step, prep = self._prepare(name, build, make_step, check_grad, estimate, restore, changed)
                live[name] = (step, prep)
            except Exception as exc:  # noqa: BLE001 - one variant's failure is recorded, not fatal
                rec = _exc_record(exc)
                self._lost(name, rec, exc)
            finally:
                if not self.broken:
                    restore()
                    if self.device.type == "cuda":
                        torch.cuda.empty_cache()
            results[name] = rec
        # Fit the repeats into what is left of this part's time.
        left = deadline - self.budget.elapsed()
        cost = sum(results[n]["_t"] * results[n]["_reps"] for n in live)
        scale = min(1.0, 0.8 * left / cost) if cost > 0 else 1.0
        clock = Clock(self.device, flush_bytes)
        samples = {n: ([], []) for n in live}
        for order in (list(live), list(live)[::-1]):
            for n in order:
                if self.broken or n not in live:
                    continue
                step, prep = live[n]
                reps = max(1, int(results[n]["_reps"] * scale) // 2)
                try:
                    dev_ms, host_ms = clock.times(step, reps, prep)
                    samples[n][0].append(dev_ms)
                    samples[n][1].extend(host_ms)
                except Exception as exc:  # noqa: BLE001
                    results[n] = _exc_record(exc)
                    del live[n]
                    self._lost(n, results[n], exc)
                finally:
                    if not self.broken:
                        restore()
        for n, rec in results.items():
            rec.pop("_t", None)
            rec.pop("_reps", None)
            if n not in live:
                continue
            if len(samples[n][0]) < 2:
                results[n] = {"status": "skipped", "reason": f"not timed: CUDA context lost ({self.broken})"}
                continue
            rec.update(_stats([x for r in samples[n][0] for x in r]))
            rec["round_medians_ms"] = [statistics.median(r) for r in samples[n][0]]
            rec["host_ms"] = statistics.median(samples[n][1])
        return results


def _skipped_case(runner, case, names, deadline):
    """Fill ``case`` as skipped and return True when the run cannot take it on."""
    if runner.broken:
        why = f"CUDA context lost ({runner.broken})"
    elif deadline - runner.budget.elapsed() < 5:
        why = "time budget"
    else:
        return False
    case.update(status="skipped", reason=why, variants=runner.skip_all(names, why))
    return True


def _copy_floor(runner, z0, flush):
    """A device-to-device copy of the logits, timed like a step: reading them once and writing a gradient once."""
    dst = torch.empty_like(z0)
    clock = Clock(runner.device, flush)
    clock.times(lambda: dst.copy_(z0), 3)
    copy_ms, _ = clock.times(lambda: dst.copy_(z0), 5 if runner.dry_run else 30)
    st = _stats(copy_ms)
    st["GBps"] = 2 * z0.numel() * z0.element_size() / (st["median_ms"] * 1e-3) / 1e9
    return st


def _ours_inplace():
    """DM with the gradient written over the logits (``inplace_backward=True``'s autograd function).

    The API refuses logits that are a leaf requiring grad (their ``.grad`` would
    alias them); this benchmark's logits are such a leaf, reused every step (as
    Liger's in-place CE gets them), so the step calls the autograd function the
    API runs for logits made in the graph, with the same backend and spec.
    """
    import robustloss_fast as rf
    from robustloss_fast import backends
    from robustloss_fast.functional import _InplaceBackward, kernel_spec

    spec = kernel_spec(rf.schemes.DM(lam=DM_LAM, beta=DM_BETA), "mean", None, -100, 0.0)

    def fn(z, y):
        return _InplaceBackward.apply(z, y, None, None, backends.resolve("auto", z.device), spec)

    return fn


def _logits_inputs(dev, n, c, dtype_name, seed):
    """The logits part's inputs: logits of spread LOGIT_SPREAD in ``dtype_name`` and uniform targets."""
    gen = torch.Generator(device=dev).manual_seed(seed)
    z0 = (LOGIT_SPREAD * torch.randn(n, c, device=dev, generator=gen)).to(getattr(torch, dtype_name))
    return z0, torch.randint(0, c, (n,), device=dev, generator=gen)


def _linear_inputs(dev, n, hdim, vocab, seed):
    """The linear part's bf16 inputs, the weights scaled so that the logits have the logits part's spread."""
    gen = torch.Generator(device=dev).manual_seed(seed)
    h0 = torch.randn(n, hdim, device=dev, generator=gen).to(torch.bfloat16)
    w0 = (LOGIT_SPREAD / math.sqrt(hdim) * torch.randn(vocab, hdim, device=dev, generator=gen)).to(torch.bfloat16)
    return h0, w0, torch.randint(0, vocab, (n,), device=dev, generator=gen)


def _logits_case(runner, case, names, deadline, seed, l2):
    """One logits shape: inputs, copy floor, reference, every variant (all freed on return)."""
    dev = runner.device
    n, c = case["shape"]
    dtype_name = case["dtype"]
    torch._dynamo.reset()
    z0, y = _logits_inputs(dev, n, c, dtype_name, seed)
    z = z0.clone().requires_grad_(True)
    nbytes = z0.numel() * z0.element_size()
    flush = 256 << 20 if nbytes < 4 * l2 else 0
    case.update(logits_bytes=nbytes, l2_flush=bool(flush))
    case["copy"] = _copy_floor(runner, z0, flush)
    ref = LogitsReference(z0, y)

    def step_of(fn):
        def step():
            z.grad = None
            fn(z, y).backward()

        return step

    def check(name, family):
        err, finite = _rel_l1(z.grad, ref.chunks(family))
        return {"grad_rel_l1": err, "grad_finite": finite,
                "grad_reference": "float64 " + ("mean CE" if family == "ce" else "normalised DM")}

    def restore():
        with torch.no_grad():
            z.copy_(z0)
        z.grad = None

    def changed():
        return not torch.equal(z.detach(), z0)

    def estimate(name, built):
        k_logits, k_fp32 = built[2]
        # + the reference's float64 row chunks (512 MiB each, a few alive)
        return k_logits * nbytes + k_fp32 * 4 * z0.numel() + (2 << 30)

    case["variants"] = runner.measure(names, lambda nm: logits_variant(nm, runner.dry_run), step_of, check,
                                      estimate, deadline, restore, changed, flush)
    for rec in case["variants"].values():
        if "median_ms" in rec:
            rec["x_copy"] = rec["median_ms"] / case["copy"]["median_ms"]
            rec["floor_fraction"] = case["copy"]["median_ms"] / rec["median_ms"]
    case["status"] = "done"


def run_logits(runner, shapes, names, out, deadline):
    dev = runner.device
    l2 = getattr(torch.cuda.get_device_properties(dev), "L2_cache_size", 0) if dev.type == "cuda" else 0
    cases = []
    for n, c, dtype_name in shapes:
        case = {"label": f"{n}x{c} {dtype_name}", "shape": [n, c], "dtype": dtype_name}
        cases.append(case)
        if not _skipped_case(runner, case, names, deadline):
            _logits_case(runner, case, names, deadline, 1000 + len(cases), l2)
            if dev.type == "cuda" and not runner.broken:
                torch.cuda.empty_cache()
        out(cases)
    return cases


def _graph_ms(clock, call, calls, reps):
    """Per-call device time (ms) of ``calls`` calls captured in one CUDA graph and replayed."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture, as torch.cuda.graphs asks
        for _ in range(3):
            call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            call()
    ms, _ = clock.times(graph.replay, reps)
    return statistics.median(ms) / calls


def run_cross_row(device, dry_run, deadline, budget):
    """The cross-row step alone, per backend and row count: eager and (on a GPU) CUDA-graph times."""
    from robustloss_fast import backends
    from robustloss_fast._common import ROW_COLS, Kernel, KernelSpec, Reduction, RowCol

    names = ["cpu", "triton"] if dry_run else ["cuda", "triton"]
    spec = KernelSpec(Kernel.DM, DM_LAM, DM_BETA, 1.0, Reduction.MEAN, True, -100)
    clock = Clock(device)
    reps = 2 if dry_run else 50
    cases = []
    for n in CROSS_ROW_ROWS_DRY if dry_run else CROSS_ROW_ROWS:
        gen = torch.Generator().manual_seed(3000 + n)
        rows = torch.randn(n, ROW_COLS, generator=gen)
        rows[:, RowCol.LS] = rows[:, RowCol.LS].abs()
        rows[:, RowCol.LOGW] *= 3
        rows = rows.to(device)
        target = torch.randint(0, 10, (n,), generator=gen).to(device)
        case = {"rows": n, "backends": {}}
        cases.append(case)
        for name in names:
            rec = case["backends"][name] = {}
            reason = backends.unavailable_reason(name)
            if reason is not None or budget.elapsed() > deadline:
                rec.update(status="skipped", reason=reason or "time budget")
                continue
            finalize = backends.get(name).finalize

            def call():
                return finalize(rows, target, spec, None, None)

            try:
                clock.wall(call)  # JIT compilation, first-call allocations
                dev, host = clock.times(call, reps)
                rec.update(status="ok", eager_ms=statistics.median(dev), host_ms=statistics.median(host))
            except Exception as exc:  # noqa: BLE001 - one backend's failure is a result, not the end of the run
                rec.update(_exc_record(exc))
                continue
            if device.type == "cuda":
                try:
                    rec["graph_ms"] = _graph_ms(clock, call, CROSS_ROW_GRAPH_CALLS, 10)
                except Exception as exc:  # noqa: BLE001
                    rec["graph_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    return {"spec": "DM normalised mean, float32 rows, no weights", "graph_calls": CROSS_ROW_GRAPH_CALLS,
            "cases": cases}


def matmul_rate(device, dry_run):
    """bf16 matrix product rate (FLOP/s) on random data, measured here: the linear part's ceiling."""
    m = 256 if dry_run else 8192
    gen = torch.Generator(device=device).manual_seed(7)
    a = torch.randn(m, m, device=device, generator=gen).to(torch.bfloat16)
    b = torch.randn(m, m, device=device, generator=gen).to(torch.bfloat16)
    clock = Clock(device)
    clock.times(lambda: a @ b, 3)
    ms, _ = clock.times(lambda: a @ b, 5 if dry_run else 20)
    st = _stats(ms)
    return {"shape": [m, m, m], "dtype": "bfloat16", **st, "TFLOPs": 2 * m**3 / (st["median_ms"] * 1e-3) / 1e12}


def _linear_case(runner, case, names, deadline):
    """One number of tokens: inputs, every variant, gradients against the eager ones (all freed on return)."""
    dev = runner.device
    n, hdim, vocab = case["N"], case["H"], case["V"]
    torch._dynamo.reset()
    h0, w0, y = _linear_inputs(dev, n, hdim, vocab, 2000 + n)
    h = h0.clone().requires_grad_(True)
    w = w0.clone().requires_grad_(True)
    refs = {}

    def step_of(fn):
        def step():
            h.grad = None
            w.grad = None
            fn(h, w, y).backward()

        return step

    def check(name, family):
        loss = "CE" if family == "ce" else "DM"
        if name.startswith("eager"):
            refs[family] = (h.grad.detach().clone(), w.grad.detach().clone())
            return {"grad_reference": "itself (the reference of the " + loss + " variants)"}
        if family not in refs:
            return {"grad_reference": None, "grad_note": f"no eager {loss} gradient in this case to compare with"}
        eh, fh = _rel_l1(h.grad, [(slice(None), refs[family][0].double())])
        ew, fw = _rel_l1(w.grad, [(slice(None), refs[family][1].double())])
        return {"grad_rel_l1_hidden": eh, "grad_rel_l1_weight": ew, "grad_finite": fh and fw,
                "grad_reference": "eager " + loss}

    def restore():
        with torch.no_grad():
            h.copy_(h0)
            w.copy_(w0)
        h.grad = None
        w.grad = None

    def changed():
        return not (torch.equal(h.detach(), h0) and torch.equal(w.detach(), w0))

    def estimate(name, built):
        return built[2](n, hdim, vocab, 2)

    case["variants"] = runner.measure(names, lambda nm: linear_variant(nm, runner.dry_run), step_of, check,
                                      estimate, deadline, restore, changed)
    for rec in case["variants"].values():
        if "median_ms" in rec and case["floor_ms"]:
            rec["x_floor"] = rec["median_ms"] / case["floor_ms"]
    case["status"] = "done"


def run_linear(runner, tokens, hdim, vocab, names, out, deadline):
    dev = runner.device
    result = {"H": hdim, "V": vocab, "dtype": "bfloat16", "cases": []}
    try:
        result["matmul"] = None if runner.broken else matmul_rate(dev, runner.dry_run)
    except Exception as exc:  # noqa: BLE001
        result["matmul"] = _exc_record(exc)
    rate = (result["matmul"] or {}).get("TFLOPs")
    for n in tokens:
        flops = 6 * n * hdim * vocab  # three products: the logits, grad of hidden, grad of weight
        case = {"label": f"N={n} H={hdim} V={vocab} bfloat16", "N": n, "H": hdim, "V": vocab, "dtype": "bfloat16",
                "flops": flops, "floor_ms": flops / (rate * 1e12) * 1e3 if rate else None}
        result["cases"].append(case)
        if not _skipped_case(runner, case, names, deadline):
            _linear_case(runner, case, names, deadline)
            if dev.type == "cuda" and not runner.broken:
                torch.cuda.empty_cache()
        out(result)
    return result


def run_profiles(runner, shapes, names_logits, names_linear, linear_case, deadline):
    """One profiled step of each PROFILED_* variant still in the run, on fresh inputs of the first
    logits shape and the first linear case; a list of records (failures recorded, never fatal)."""
    dev, out = runner.device, []
    jobs = []
    if shapes:
        n, c, dtype_name = shapes[0]
        jobs += [("logits", f"{n}x{c} {dtype_name}", name) for name in PROFILED_LOGITS if name in names_logits]
    if linear_case is not None:
        jobs += [("linear", linear_case, name) for name in PROFILED_LINEAR if name in names_linear]
    torch._dynamo.reset()
    for part, label, name in jobs:
        rec = {"part": part, "case": label if part == "logits" else "N={} H={} V={} bfloat16".format(*label),
               "variant": name}
        out.append(rec)
        if runner.broken or runner.budget.elapsed() > deadline:
            rec.update(status="skipped", reason="CUDA context lost" if runner.broken else "time budget")
            continue
        try:
            if part == "logits":
                z, y = _logits_inputs(dev, n, c, dtype_name, 7)
                z.requires_grad_(True)
                fn = logits_variant(name, runner.dry_run)[0]

                def step():
                    z.grad = None
                    fn(z, y).backward()
            else:
                h, w, y = _linear_inputs(dev, *label, 7)
                h.requires_grad_(True)
                w.requires_grad_(True)
                fn = linear_variant(name, runner.dry_run)[0]

                def step():
                    h.grad = None
                    w.grad = None
                    fn(h, w, y).backward()
            for _ in range(2):  # compilation and autotuning out of the profile
                step()
            rec.update(status="ok", **_kernel_profile(dev, step))
        except Exception as exc:  # noqa: BLE001 - a profile is extra information
            rec.update(_exc_record(exc))
            runner._lost(name, rec, exc)
        finally:
            step = fn = None
            if dev.type == "cuda" and not runner.broken:
                torch.cuda.empty_cache()
    return out


# --------------------------------------------------------------------------- output


def _fmt(x, unit=""):
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    if abs(x) >= 100:
        return f"{x:.0f}{unit}"
    if abs(x) >= 1:
        return f"{x:.2f}{unit}"
    return f"{x:.3g}{unit}"


def _mib(b):
    return "n/a" if b is None else f"{b / 2**20:.1f}"


def _why(rec):
    reason = str(rec.get("reason", "")).replace("|", "/")
    return f"{rec['status']}: {reason[:160]}{'...' if len(reason) > 160 else ''}"


def format_tables(result):
    m = result["machine"]
    gpu = (m.get("gpu") or {}).get("name") or m.get("cpu")
    lines = [
        f"Machine: {gpu}, driver {m.get('driver')}, torch {m['torch']} (CUDA {m.get('cuda')}), Triton {m.get('triton')}, "
        f"{m['date']}, commit {(m.get('git') or {}).get('commit')}, source digest {m['source_digest'][:12]}"
        + (" -- DRY RUN on the CPU: tiny shapes, times mean nothing" if m.get("dry_run") else ""),
        f"Peers: liger-kernel {m['peers'].get('liger_kernel')}, cut-cross-entropy {m['peers'].get('cut_cross_entropy')}; "
        f"backends: {', '.join(m.get('available_backends') or [])}",
        "",
    ]
    for case in (result.get("logits") or {}).get("cases", []):
        cp = case.get("copy")
        head = f"#### Logits {case['label']}"
        if cp:
            head += f": copy {_fmt(cp['median_ms'])} ms ({cp['GBps']:.0f} GB/s)"
        lines += [head, ""]
        if case.get("status") == "skipped":
            lines += [f"skipped: {case.get('reason')}", ""]
            continue
        lines += ["| variant | ms (median) | IQR ms | x copy | of copy floor | extra MiB | grad rel L1 | first call s |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, rec in case["variants"].items():
            if rec.get("status") != "ok":
                lines.append(f"| {name} | {_why(rec)} | | | | | | |")
                continue
            lines.append(
                f"| {name} | {_fmt(rec['median_ms'])} | {_fmt(rec['q1_ms'])}-{_fmt(rec['q3_ms'])} | {_fmt(rec['x_copy'])} "
                f"| {rec['floor_fraction']:.0%} | {_mib(rec.get('extra_bytes'))} | {_fmt(rec.get('grad_rel_l1'))} "
                f"| {_fmt(rec.get('first_call_s'))} |"
            )
        lines.append("")
    cross = result.get("cross_row") or {}
    if cross.get("cases"):
        names = list(cross["cases"][0]["backends"])
        lines += [f"#### Cross-row step alone ({cross['spec']}): ms per call, eager / CUDA graph", "",
                  "| rows | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        for case in cross["cases"]:
            cells = []
            for name in names:
                rec = case["backends"].get(name, {})
                if rec.get("status") != "ok":
                    cells.append(_why(rec))
                else:
                    cells.append(f"{rec['eager_ms']:.4f} / " + (f"{rec['graph_ms']:.4f}" if "graph_ms" in rec else "-"))
            lines.append(f"| {case['rows']} | " + " | ".join(cells) + " |")
        lines.append("")
    lin = result.get("linear") or {}
    mm = lin.get("matmul") or {}
    for case in lin.get("cases", []):
        head = f"#### Linear + loss {case['label']}"
        if case.get("floor_ms"):
            head += (f": matmul floor {_fmt(case['floor_ms'])} ms ({case['flops'] / 1e12:.1f} TFLOP at "
                     f"{mm.get('TFLOPs', float('nan')):.0f} TFLOP/s measured)")
        lines += [head, ""]
        if case.get("status") == "skipped":
            lines += [f"skipped: {case.get('reason')}", ""]
            continue
        lines += ["| variant | ms (median) | IQR ms | x floor | extra MiB | grad rel L1 hidden / weight (vs) | first call s |",
                  "|---|---|---|---|---|---|---|"]
        for name, rec in case["variants"].items():
            if rec.get("status") != "ok":
                lines.append(f"| {name} | {_why(rec)} | | | | | |")
                continue
            err = (f"{_fmt(rec.get('grad_rel_l1_hidden'))} / {_fmt(rec.get('grad_rel_l1_weight'))} ({rec.get('grad_reference')})"
                   if "grad_rel_l1_hidden" in rec else f"- ({rec.get('grad_reference')})")
            lines.append(
                f"| {name} | {_fmt(rec['median_ms'])} | {_fmt(rec['q1_ms'])}-{_fmt(rec['q3_ms'])} | {_fmt(rec.get('x_floor'))} "
                f"| {_mib(rec.get('extra_bytes'))} | {err} | {_fmt(rec.get('first_call_s'))} |"
            )
        lines.append("")
    lines += _kernel_tables(result)
    return "\n".join(lines)


def _short_kernel(name, width=90):
    """A kernel's name without its parameter list (template arguments stay: they say which functor or
    layout), shortened to ``width`` characters."""
    short = name.replace("(anonymous namespace)::", "").removeprefix("void ").strip()
    if short.endswith(")"):  # drop the trailing "(...)" parameter list
        depth = 0
        for k in range(len(short) - 1, -1, -1):
            depth += {")": 1, "(": -1}.get(short[k], 0)
            if depth == 0:
                short = short[:k].rstrip() or short
                break
    return short if len(short) <= width else short[: width - 3] + "..."


def _kernel_tables(result):
    """Where a profiled step goes: its largest kernels' device time (``run_profiles``)."""
    profiles = result.get("profiles") or []
    if not profiles:
        return []
    lines = ["#### Kernels of one step (torch.profiler, after all the timing, on fresh inputs)", ""]
    for prof in profiles:
        head = f"{'Logits' if prof['part'] == 'logits' else 'Linear + loss'} {prof['case']}, {prof['variant']}"
        if prof.get("status") != "ok":
            lines += [f"{head}: {_why(prof)}", ""]
            continue
        lines += [f"{head}: {_fmt(prof['total_ms'])} {prof['unit']} in {prof['launches']} launches", "",
                  "| kernel | ms | calls |", "|---|---|---|"]
        lines += [f"| `{_short_kernel(k['kernel'])}` | {_fmt(k['ms'])} | {k['calls']} |" for k in prof["top"]]
        rest = prof["rest"]
        if rest["kinds"]:
            lines.append(f"| {rest['kinds']} other kernels | {_fmt(rest['ms'])} | {rest['calls']} |")
        lines.append("")
    return lines


def write_png(result, path):
    from matplotlib.figure import Figure

    parts = [("logits", "x copy time", "x_copy"), ("linear", "x matmul floor", "x_floor")]
    fig = Figure(figsize=(15, 9), layout="constrained")
    axes = fig.subplots(2, 2)
    for row, (part, ylabel, key) in enumerate(parts):
        cases = [c for c in ((result.get(part) or {}).get("cases") or []) if c.get("variants")]
        ax_t, ax_m = axes[row]
        names = LOGITS_VARIANTS + [INPLACE_VARIANT] if part == "logits" else LINEAR_VARIANTS
        names = [n for n in names if any(n in c["variants"] for c in cases)]
        width = 0.8 / max(len(names), 1)
        drawn = {ax_t: False, ax_m: False}
        for k, name in enumerate(names):
            xs = [i + (k - (len(names) - 1) / 2) * width for i in range(len(cases))]
            recs = [c["variants"].get(name, {}) for c in cases]
            for ax, vals in ((ax_t, [r.get(key) for r in recs]),
                             (ax_m, [None if r.get("extra_bytes") is None else r["extra_bytes"] / 2**20 for r in recs])):
                vals = [v if v is not None and v > 0 else float("nan") for v in vals]
                ax.bar(xs, vals, width, label=name)
                drawn[ax] = drawn[ax] or any(v == v for v in vals)
        labels = [c["label"] for c in cases]
        for ax in (ax_t, ax_m):
            ax.set_xticks(range(len(cases)), labels, fontsize=8)
            if drawn[ax]:
                ax.set_yscale("log")
            else:
                ax.text(0.5, 0.5, "not measured", transform=ax.transAxes, ha="center")
        ax_t.axhline(1.0, color="k", lw=0.8)
        ax_t.set_ylabel(f"step time, {ylabel} (1 = floor)")
        ax_m.set_ylabel("extra memory of a step, MiB")
        ax_t.set_title(f"{part}: time over the floor (lower is better; missing bar = skipped)", fontsize=9)
        ax_m.set_title(f"{part}: peak memory above the inputs", fontsize=9)
        if names:
            ax_m.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    m = result["machine"]
    gpu = (m.get("gpu") or {}).get("name") or m.get("cpu")
    fig.suptitle(f"{gpu}, torch {m['torch']}, Triton {m.get('triton')}, {m['date']}"
                 + ("  [DRY RUN, CPU]" if m.get("dry_run") else ""), fontsize=10)
    fig.savefig(path, dpi=100)


def write_outputs(result, out_dir):
    """bench_gpu.md and bench_gpu.png from a result; returns the tables."""
    table = format_tables(result)
    with open(os.path.join(out_dir, "bench_gpu.md"), "w") as f:
        f.write(table + "\n")
    try:
        write_png(result, os.path.join(out_dir, "bench_gpu.png"))
    except Exception as exc:  # noqa: BLE001 - the numbers matter more than the picture
        print(f"bench_gpu: no PNG ({type(exc).__name__}: {exc})", file=sys.stderr)
    return table


def prewarm(device, dry_run, only):
    """Compile every torch.compile variant once, so that the timed run finds its graphs in the caches.

    gpu_suite.sh runs this while the extension builds (the CUDA file keeps one
    core busy for minutes, the rest idle). Inductor's FX graph cache and
    Triton's kernel cache live on disk and key on the graph, the shapes and
    the dtypes, so the same functions on the same shapes hit them in the next
    process. Nothing here imports robustloss_fast: its extension may be half
    written.
    """
    if only == "cross_row":  # no torch.compile variant there
        return 0
    work = []
    if only != "linear":
        for n, c, dtype_name in LOGITS_SHAPES_DRY if dry_run else LOGITS_SHAPES:
            work += [(name, f"{n}x{c} {dtype_name}", (n, c, dtype_name)) for name in LOGITS_VARIANTS if name.startswith("compile")]
    if only != "logits":
        hdim, vocab = (LINEAR_H_DRY, LINEAR_V_DRY) if dry_run else (LINEAR_H, LINEAR_V)
        for n in LINEAR_TOKENS_DRY if dry_run else LINEAR_TOKENS:
            work += [(name, f"linear N={n}", (n, hdim, vocab)) for name in LINEAR_VARIANTS if name.startswith("compile")]
    failed = 0
    for name, label, shape in work:
        torch._dynamo.reset()
        t0 = time.monotonic()
        try:
            if label.startswith("linear"):
                n, hdim, vocab = shape
                a = torch.randn(n, hdim, device=device).to(torch.bfloat16).requires_grad_(True)
                b = (torch.randn(vocab, hdim, device=device) / math.sqrt(hdim)).to(torch.bfloat16).requires_grad_(True)
                y = torch.randint(0, vocab, (n,), device=device)
                linear_variant(name, dry_run)[0](a, b, y).backward()
            else:
                n, c, dtype_name = shape
                a = torch.randn(n, c, device=device).to(getattr(torch, dtype_name)).requires_grad_(True)
                y = torch.randint(0, c, (n,), device=device)
                logits_variant(name, dry_run)[0](a, y).backward()
            Clock(device).sync()
            print(f"[prewarm] {name} {label}: compiled in {time.monotonic() - t0:.1f} s", flush=True)
        except Exception as exc:  # noqa: BLE001 - the timed run compiles it again, and reports
            failed += 1
            print(f"[prewarm] {name} {label}: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
        finally:
            a = b = y = None  # noqa: F841 - free the inputs before the next shape
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return 1 if failed else 0


def _write_json(result, path):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1, default=str)
        f.write("\n")
    os.replace(tmp, path)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, same JSON and PNG (well under a minute)")
    ap.add_argument("--only", choices=["cross_row", "logits", "linear"], help="run one part")
    ap.add_argument("--out", help="folder for bench_gpu.json/.md/.png (default benchmarks/results/gpu_<UTC time>)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="seconds for the whole run: work that would not fit is skipped and recorded as such")
    ap.add_argument("--logits-shapes", metavar="NxC:DTYPE,...",
                    help="the logits part at these shapes only (e.g. 16384x128256:bfloat16)")
    ap.add_argument("--variants", metavar="NAME,...", help="these variants only (names as in the tables)")
    ap.add_argument("--logits-share", type=float, default=0.55,
                    help="fraction of the budget the logits part may use before the linear part starts")
    ap.add_argument("--compile-reserve-s", type=float, default=None,
                    help="seconds a torch.compile variant needs to be started (default 60; less after --prewarm)")
    ap.add_argument("--prewarm", action="store_true",
                    help="only compile the torch.compile variants (fills the on-disk caches for a later run)")
    ap.add_argument("--table", metavar="JSON", help="print the markdown tables of an earlier run and exit")
    ap.add_argument("--replot", metavar="JSON", help="rewrite bench_gpu.md and .png beside an earlier run's JSON")
    ap.add_argument("--source-digest", action="store_true", help="print this checkout's source digest and exit")
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.source_digest:
        print(source_digest())
        return 0
    if args.table:
        with open(args.table) as f:
            print(format_tables(json.load(f)))
        return 0
    if args.replot:
        with open(args.replot) as f:
            result = json.load(f)
        write_outputs(result, os.path.dirname(os.path.abspath(args.replot)))
        return 0
    if not args.dry_run and not torch.cuda.is_available():
        print("bench_gpu: no CUDA device (use --dry-run on a machine without one)", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.dry_run else "cuda")
    if args.dry_run:
        # Tiny CPU steps: a second OpenMP thread only adds waits for it on a busy machine.
        torch.set_num_threads(1)
    # One compiled graph per case and variant: lift the recompile limits (names vary across torch versions).
    for key, value in (("cache_size_limit", 64), ("recompile_limit", 64), ("accumulated_cache_size_limit", 512),
                       ("accumulated_recompile_limit", 512)):
        if hasattr(torch._dynamo.config, key):
            setattr(torch._dynamo.config, key, value)
    if args.prewarm:
        return prewarm(device, args.dry_run, args.only)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M")
    out_dir = args.out or os.path.join(ROOT, "benchmarks", "results", f"gpu_{stamp}{'_dry' if args.dry_run else ''}")
    os.makedirs(out_dir, exist_ok=True)
    json_path = os.path.join(out_dir, "bench_gpu.json")
    budget = Budget(args.budget_s)
    runner = Runner(device, budget, args.dry_run, args.compile_reserve_s)

    logits_names = list(LOGITS_VARIANTS) + ([INPLACE_VARIANT] if _inplace_keyword() else [])
    linear_names = list(LINEAR_VARIANTS)
    if args.variants:
        wanted = [v.strip() for v in args.variants.split(",") if v.strip()]
        unknown = [v for v in wanted if v not in logits_names + linear_names]
        if unknown:
            print(f"bench_gpu: unknown variants {unknown}", file=sys.stderr)
            return 2
        logits_names = [v for v in logits_names if v in wanted]
        linear_names = [v for v in linear_names if v in wanted]
    shapes = LOGITS_SHAPES_DRY if args.dry_run else LOGITS_SHAPES
    if args.logits_shapes:
        try:
            shapes = [(int(nc.split("x")[0]), int(nc.split("x")[1]), dt)
                      for nc, dt in (item.strip().split(":") for item in args.logits_shapes.split(","))]
            if not all(isinstance(getattr(torch, dt, None), torch.dtype) for _, _, dt in shapes):
                raise ValueError("unknown dtype")
        except (ValueError, IndexError):
            print(f"bench_gpu: --logits-shapes wants NxC:DTYPE,... (got {args.logits_shapes!r})", file=sys.stderr)
            return 2
    result = {
        "schema": SCHEMA,
        "machine": machine_info(device, args.dry_run),
        "settings": runner.settings(),
        "variants": {"logits": logits_names, "linear": linear_names},
        "inplace_keyword": _inplace_keyword(),
        "cross_row": None,
        "logits": None,
        "linear": None,
        "profiles": None,
        "complete": False,
    }
    if args.dry_run:
        result["settings"]["note"] = "dry run: tiny shapes on the CPU; checks the code and the schema, not speed"

    def save(_=None):
        result["elapsed_s"] = budget.elapsed()
        _write_json(result, json_path)

    save()
    total = budget.seconds
    run_logits_part = args.only not in ("linear", "cross_row")
    run_linear_part = args.only not in ("logits", "cross_row")
    if args.only in (None, "cross_row"):
        # A few seconds; where the one-launch limits sit is for this to settle.
        result["cross_row"] = run_cross_row(device, args.dry_run, math.inf if total is None else 0.1 * total, budget)
        save()
    if run_logits_part:
        deadline = math.inf if total is None else (total if args.only == "logits" else args.logits_share * total)
        result["logits"] = {"cases": []}

        def out_logits(cases):
            result["logits"]["cases"] = cases
            save()
            c = cases[-1]
            print(f"[bench_gpu {budget.elapsed():5.0f}s] logits {c['label']}: "
                  + ", ".join(f"{k} {_fmt(v.get('median_ms'))}" if "median_ms" in v else f"{k} {v['status']}"
                              for k, v in c["variants"].items()), flush=True)

        run_logits(runner, shapes, logits_names, out_logits, deadline)
    if run_linear_part:
        tokens = LINEAR_TOKENS_DRY if args.dry_run else LINEAR_TOKENS
        hdim = LINEAR_H_DRY if args.dry_run else LINEAR_H
        vocab = LINEAR_V_DRY if args.dry_run else LINEAR_V
        deadline = math.inf if total is None else total

        def out_linear(res):
            result["linear"] = res
            save()
            c = res["cases"][-1]
            print(f"[bench_gpu {budget.elapsed():5.0f}s] linear {c['label']}: "
                  + ", ".join(f"{k} {_fmt(v.get('median_ms'))}" if "median_ms" in v else f"{k} {v['status']}"
                              for k, v in c["variants"].items()), flush=True)

        result["linear"] = {"cases": []}
        run_linear(runner, tokens, hdim, vocab, linear_names, out_linear, deadline)
    result["profiles"] = run_profiles(
        runner, shapes if run_logits_part else [], logits_names, linear_names,
        (tokens[0], hdim, vocab) if run_linear_part else None, math.inf if total is None else total)
    save()
    if device.type == "cuda" and not runner.broken:
        result["machine"]["nvidia_smi_end"] = _nvidia_smi()
    result["cuda_context_lost"] = runner.broken
    result["complete"] = True
    save()
    print(write_outputs(result, out_dir))
    print(f"bench_gpu: wrote {json_path} (+ .md, .png) in {budget.elapsed():.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
