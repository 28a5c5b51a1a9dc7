"""Benchmark harness: fused robust losses against what users run today.

One *step* is a forward and a backward pass on leaf logits ``z`` ``(N, C)``::

    z.grad = None; loss = variant(z, y); loss.backward()

so it includes allocating the gradient, as a training step with
``zero_grad(set_to_none=True)`` does. Variants:

``F.cross_entropy``
    PyTorch's own loss: the speed a robust loss should not fall behind.
``eager DM``
    DM (lam = 1, beta = 8, derivative-normalised mean) written in plain
    PyTorch the way users write it, with the original Caffe layer's gradient:
    ``p = softmax(z).gather(y)``, per-example constants
    ``c_i = w_i / (2 (1 - p_i) + 1e-6) / sum_k w_k`` (detached) times the
    per-example cross-entropy, whose gradient ``softmax - onehot`` times
    ``c_i`` is SPEC §3's ``(w_i / 2D) (r - e_y)`` up to the 1e-6 -- the same
    gradient as the fused op, so the comparison is like for like (the run
    checks it and reports the difference).
``eager DM (lean)`` (on request)
    the same with ``p = exp(-ce)`` read off the cross-entropy: one softmax
    instead of two, the strongest plain-PyTorch version we know.
``compiled DM``
    the same function under ``torch.compile`` (static shapes, compiled before
    timing; compile time is reported separately).
``robustloss[<backend>]``
    ``robust_cross_entropy(z, y, DM(), backend=<backend>)``.

Timing: variants are interleaved round-robin (the starting variant rotates
each round), each sample runs enough steps to last ``min_sample_s``, and the
median and quartiles of the per-step time are reported. Speedups are ratios
of medians from the same run.

Noise: the result records how many cores other processes used during the run
(from ``/proc/stat``). ``clock="thread"`` runs one thread timed by its own CPU
time: a diagnostic that stays stable on a busy machine, not the headline.

The *bandwidth floor* of a case is the time to read the logits once and write
a gradient of the same size once: measured as a copy of an ``(N, C)`` tensor of
the case's dtype into a preallocated one (so it sits in whichever cache level
the case's data does). No loss can go below it.

Peak memory: on CPU, ``torch.profiler`` with ``profile_memory=True`` records
every allocation and free of the c10 CPU allocator during one step; the peak of
their running sum is the step's extra memory beyond the inputs (the gradient,
which outlives the step, is part of it). On CUDA,
``torch.cuda.max_memory_allocated`` after a reset. The method is named in the
result.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

__all__ = [
    "Case",
    "default_cases",
    "available_variants",
    "run",
    "format_table",
    "write_json",
    "write_png",
    "eager_dm",
    "eager_dm_lean",
]

_SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "float64": "fp64"}

# DM parameters of every DM variant (the library's defaults).
DM_LAM, DM_BETA = 1.0, 8.0

BASELINES = ("F.cross_entropy", "eager DM", "compiled DM")
# Named variants that run on request only (not in available_variants()).
EXTRA_BASELINES = ("eager DM (lean)",)


@dataclass(frozen=True)
class Case:
    """One problem size: ``n`` rows of ``c`` classes in dtype ``dtype`` (a torch dtype name)."""

    n: int
    c: int
    dtype: str = "float32"

    @property
    def label(self) -> str:
        return f"{self.n}x{self.c} {_SHORT.get(self.dtype, self.dtype)}"

    @property
    def torch_dtype(self) -> torch.dtype:
        dt = getattr(torch, self.dtype, None)
        if not isinstance(dt, torch.dtype):
            raise ValueError(f"unknown dtype name {self.dtype!r}")
        return dt

    @property
    def grad_bytes(self) -> int:
        """Bytes of one gradient (= one copy of the logits)."""
        return self.n * self.c * torch.empty((), dtype=self.torch_dtype).element_size()


def default_cases(device: str = "cpu", quick: bool = False) -> List[Case]:
    """The issue's shapes; ``quick`` keeps the small ones (a run of well under a minute)."""
    if quick:
        return [Case(4096, 10), Case(4096, 100), Case(1024, 1000)]
    return [
        Case(4096, 10),
        Case(4096, 100),
        Case(2048, 1000),
        Case(512, 32000),
        Case(256, 128256, "bfloat16"),
    ]


def available_variants(device: str = "cpu", include_reference: bool = False) -> List[str]:
    """Variant names that run on ``device``: the baselines, then one per working backend.

    The pure-PyTorch reference backend (``robustloss[torch]``) is slow by
    design (it is the test oracle), so it is listed only on request; Triton
    counts on CUDA devices only (on CPU it would run under its interpreter).
    """
    from . import backends

    dev = torch.device(device)
    names = list(BASELINES)
    for backend in _working_backends():
        if backend == "torch" and not include_reference:
            continue
        devices = backends.devices(backend)
        if devices is not None and dev.type not in devices:
            continue
        if backend == "triton" and dev.type != "cuda":
            continue  # the Triton interpreter on CPU is a test tool, not a contender
        names.append(f"robustloss[{backend}]")
    return names


def _working_backends() -> List[str]:
    """available_backends(), except that a backend whose probe itself fails is left out, not fatal."""
    from . import backends

    names = []
    for name in backends.NAMES:
        try:
            if backends.unavailable_reason(name) is None:
                names.append(name)
        except Exception:  # noqa: BLE001 - a broken optional backend must not stop the benchmark
            continue
    return names


def eager_dm(z: torch.Tensor, y: torch.Tensor, lam: float = DM_LAM, beta: float = DM_BETA) -> torch.Tensor:
    """DM in plain PyTorch, as a user writes it today (see the module docstring).

    Gradient: ``w_i / (2 (1 - p_i) + 1e-6) / sum_k w_k * (softmax_i - onehot_i)``
    with ``w = exp(beta p^lam (1 - p))`` detached: the Caffe layer's form.
    ``p`` comes from its own softmax, as in the usual recipe.
    """
    p = torch.softmax(z, dim=1).gather(1, y[:, None]).squeeze(1).detach().float()
    q = 1 - p
    w = torch.exp(beta * p.pow(lam) * q)
    coef = w / (2 * q + 1e-6) / w.sum()
    return (coef * F.cross_entropy(z, y, reduction="none").float()).sum()


def eager_dm_lean(z: torch.Tensor, y: torch.Tensor, lam: float = DM_LAM, beta: float = DM_BETA) -> torch.Tensor:
    """``eager_dm`` with ``p = exp(-ce)`` read off the cross-entropy: one softmax, not two.

    The strongest plain-PyTorch DM we know of; same gradient as ``eager_dm``.
    """
    ce = F.cross_entropy(z, y, reduction="none")
    p = torch.exp(-ce.detach().float())
    q = 1 - p
    w = torch.exp(beta * p.pow(lam) * q)
    coef = w / (2 * q + 1e-6) / w.sum()
    return (coef * ce.float()).sum()


def _robust(backend: str) -> Callable:
    from .functional import robust_cross_entropy
    from .schemes import DM

    scheme = DM(lam=DM_LAM, beta=DM_BETA)

    def fn(z, y):
        return robust_cross_entropy(z, y, scheme, backend=backend)

    return fn


def _variant_fn(name: str) -> Callable:
    if name == "F.cross_entropy":
        return F.cross_entropy
    if name == "eager DM":
        return eager_dm
    if name == "eager DM (lean)":
        return eager_dm_lean
    if name == "compiled DM":
        # A fresh wrapper per case; static shapes give Inductor its best shot.
        return torch.compile(eager_dm, dynamic=False)
    if name.startswith("robustloss[") and name.endswith("]"):
        return _robust(name[len("robustloss[") : -1])
    raise ValueError(f"unknown variant {name!r}; known: {BASELINES + EXTRA_BASELINES} and robustloss[<backend>]")


# --------------------------------------------------------------------------- machine


def status_kib(key: str) -> int:
    """A ``/proc/self/status`` field in KiB (``VmRSS``, ``VmHWM``): the benchmarks' RSS readings."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def reset_rss_peak() -> bool:
    """Reset this process's RSS high-water mark (``VmHWM``); False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
    except OSError:
        return platform.processor() or "unknown"
    fields = {}
    for line in info.splitlines():
        if ":" in line:
            k, v = line.split(":", 1)
            fields.setdefault(k.strip(), v.strip())
    name = fields.get("model name", platform.processor() or "unknown")
    # Virtual machines often hide the product name; family/model still identify it.
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']}, model {fields['model']})"
    return name


def _source_state() -> Optional[Dict]:
    """Which code was measured: git commit (+ whether the tree had edits) and the extension's build time."""
    import subprocess

    from .backends.compiled import EXT

    here = os.path.dirname(os.path.abspath(__file__))
    state: Dict = {}
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        if out.returncode == 0:
            state["commit"] = out.stdout.strip()
            dirty = subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"], cwd=here, capture_output=True, text=True, timeout=10
            )
            state["modified_files"] = len(dirty.stdout.splitlines()) if dirty.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        pass
    if EXT is not None and getattr(EXT, "__file__", None):
        built = os.path.getmtime(EXT.__file__)
        state["extension_built"] = _dt.datetime.fromtimestamp(built, _dt.timezone.utc).isoformat(timespec="seconds")
    return state


def _loadavg():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover - platforms without it
        return None


def _cpu_clock():
    """(busy seconds of the whole machine, busy seconds of this process, wall seconds), or None."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    hz = os.sysconf("SC_CLK_TCK")
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    t = os.times()
    return (sum(fields[:8]) - idle) / hz, t.user + t.system, time.monotonic()


def other_cpu_load(start, end) -> Optional[float]:
    """Cores' worth of CPU that *other* processes used between two _cpu_clock() readings."""
    if start is None or end is None or end[2] <= start[2]:
        return None
    other = (end[0] - start[0]) - (end[1] - start[1])
    return max(other, 0.0) / (end[2] - start[2])


def wait_until_quiet(max_other: float = 0.1, timeout_s: float = 600.0, window_s: float = 5.0) -> Optional[float]:
    """Block until other processes use at most ``max_other`` cores over a window; returns the last reading."""
    deadline = time.monotonic() + timeout_s
    load = None
    while True:
        a = _cpu_clock()
        time.sleep(window_s)
        load = other_cpu_load(a, _cpu_clock())
        if load is None or load <= max_other or time.monotonic() > deadline:
            return load


def _copy_bandwidth(nbytes: int, device: torch.device, repeats: int = 7) -> float:
    """Bytes per second of a large copy (read + write counted)."""
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(repeats + 1):
        _sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * src.numel() * 4 / statistics.median(times[1:])


def machine_info(device: str = "cpu") -> Dict:
    from .backends.compiled import EXT

    dev = torch.device(device)
    info = {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu_capability": EXT.cpu_capability() if EXT is not None else None,
        "device": str(dev),
        "thp_mem_alloc": os.environ.get("THP_MEM_ALLOC_ENABLE"),
        # Other processes on the cores distort CPU timings (OpenMP threads wait
        # on each other): the load average says whether the machine was quiet.
        "loadavg_before": _loadavg(),
    }
    try:
        from . import __version__

        info["robustloss_fast"] = __version__
    except ImportError:  # pragma: no cover
        pass
    info["source"] = _source_state()
    if dev.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(dev)
    info["copy_bandwidth_GBps"] = round(_copy_bandwidth(256 << 20, dev) / 1e9, 2)
    return info


# --------------------------------------------------------------------------- measuring


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _inputs(case: Case, device: torch.device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    # Logits of a half-trained classifier: spread 3, targets uniformly random.
    z = (3 * torch.randn(case.n, case.c, generator=g)).to(device=device, dtype=case.torch_dtype)
    y = torch.randint(0, case.c, (case.n,), generator=g).to(device)
    return z.requires_grad_(True), y


def _step(fn: Callable, z: torch.Tensor, y: torch.Tensor) -> None:
    z.grad = None
    fn(z, y).backward()


# The timer of _sample and _floor: wall time, or (clock="thread") the CPU time
# of this thread alone, which a busy machine inflates far less.
_CLOCK = time.perf_counter


def _sample(fn, z, y, inner: int, device) -> float:
    """Seconds per step over ``inner`` consecutive steps."""
    _sync(device)
    t0 = _CLOCK()
    for _ in range(inner):
        _step(fn, z, y)
    _sync(device)
    return (_CLOCK() - t0) / inner


@contextlib.contextmanager
def _quiet_fd2():
    """Send file descriptor 2 to /dev/null for the duration (Python's own sys.stderr is flushed first)."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def peak_cpu_bytes(fn: Callable):
    """``(peak, fn())``: the peak of the running sum of CPU allocations while ``fn`` runs (peak None if unmeasurable)."""
    from torch.profiler import ProfilerActivity, profile

    try:
        # Kineto prints "USDT: ... profiler_start/stop" on the process's stderr
        # (file descriptor 2, below Python) at every session: hide it there.
        with _quiet_fd2(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            result = fn()
        roots = prof.profiler.kineto_results.experimental_event_tree()
    except (AttributeError, RuntimeError):  # a torch without the (private) event tree
        return None, None
    allocs, stack = [], list(roots)
    while stack:
        e = stack.pop()
        stack.extend(e.children)
        if str(e.tag).endswith("Allocation") and e.extra_fields.device.type == "cpu":
            allocs.append((e.start_time_ns, e.extra_fields.alloc_size))
    allocs.sort()
    cur = peak = 0
    for _, size in allocs:
        cur += size
        peak = max(peak, cur)
    return peak, result


def _peak_extra_cpu(fn, z, y) -> Optional[int]:
    """Peak of the running sum of CPU allocations during one step (None if unmeasurable)."""
    z.grad = None
    return peak_cpu_bytes(lambda: _step(fn, z, y))[0]


def _peak_extra_cuda(fn, z, y, device) -> int:
    z.grad = None
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    _step(fn, z, y)
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def _floor(case: Case, device, repeats: int) -> float:
    """Seconds to read the logits once and write a same-sized gradient once."""
    src = torch.randn(case.n, case.c, device=device).to(case.torch_dtype)
    dst = torch.empty_like(src)
    dst.copy_(src)
    nbytes = case.grad_bytes
    inner = max(1, min(1000, int(2e-3 * 5e9 / max(nbytes, 1))))
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = _CLOCK()
        for _ in range(inner):
            dst.copy_(src)
        _sync(device)
        times.append((_CLOCK() - t0) / inner)
    return statistics.median(times)


def _grad_check(fns: Dict[str, Callable], case: Case, device) -> Dict:
    """Max |grad - grad of robustloss| / max |grad of robustloss|, per DM variant: like-for-like proof.

    Also records which variant was the reference, under the key "reference".
    """
    # Compare against a fused backend when there is one, else the reference.
    fused = [v for v in fns if v.startswith("robustloss[")]
    fused.sort(key=lambda v: v == "robustloss[torch]")
    if not fused:
        return {}
    ref_name = fused[0]
    z, y = _inputs(case, device, seed=1)
    grads = {}
    for name, fn in fns.items():
        if name == "F.cross_entropy":
            continue
        _step(fn, z, y)
        grads[name] = z.grad.float()
    ref = grads[ref_name]
    scale = ref.abs().max().clamp_min(1e-30)
    out: Dict = {k: float((g - ref).abs().max() / scale) for k, g in grads.items() if k != ref_name}
    out["reference"] = ref_name
    return out


def _quartiles(xs: List[float]):
    qs = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) > 1 else [xs[0]] * 3
    return qs[0], qs[1], qs[2]


def run(
    cases: Optional[List[Case]] = None,
    variants: Optional[List[str]] = None,
    device: str = "cpu",
    repeats: int = 15,
    warmup: int = 3,
    progress: Optional[Callable[[int, int, str], None]] = None,
    min_sample_s: float = 0.02,
    extra: Optional[Dict[str, Callable]] = None,
    measure_memory: bool = True,
    clock: str = "wall",
) -> Dict:
    """Time (and measure the memory of) each case x variant; returns a JSON-able dict.

    ``extra`` adds named variants ``fn(z, y) -> scalar loss`` (e.g. design
    experiments) to the named ones. ``progress(done, total, label)`` is called
    after each unit of work. ``clock="thread"`` (CPU only) runs on one thread
    and times it by its own CPU time: a diagnostic for machines busy with other
    work, where wall times of two OpenMP threads are meaningless; the headline
    numbers are ``clock="wall"``.
    """
    global _CLOCK
    if clock not in ("wall", "thread"):
        raise ValueError(f"clock must be 'wall' or 'thread', got {clock!r}")
    dev = torch.device(device)
    if clock == "thread" and dev.type != "cpu":
        raise ValueError("clock='thread' measures CPU work; use clock='wall' on accelerators")
    threads = torch.get_num_threads()
    if clock == "thread":
        torch.set_num_threads(1)
    _CLOCK = time.thread_time if clock == "thread" else time.perf_counter
    try:
        return _run(cases, variants, dev, repeats, warmup, progress, min_sample_s, extra, measure_memory, clock)
    finally:
        _CLOCK = time.perf_counter
        torch.set_num_threads(threads)


def _run(cases, variants, dev, repeats, warmup, progress, min_sample_s, extra, measure_memory, clock):
    device = str(dev)
    cases = list(default_cases(device) if cases is None else cases)
    names = list(available_variants(device) if variants is None else variants)
    extra = dict(extra or {})
    names += [k for k in extra if k not in names]
    total = len(cases) * (len(names) + 1)
    done = 0

    def tick(label):
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total, label)

    result = {
        "machine": machine_info(device),
        "settings": {
            "repeats": repeats,
            "warmup": warmup,
            "min_sample_s": min_sample_s,
            "clock": "wall time (time.perf_counter)" if clock == "wall" else "CPU time of the one thread (time.thread_time)",
            "step": "z.grad = None; loss = variant(z, y); loss.backward()",
            "dm": {"lam": DM_LAM, "beta": DM_BETA, "reduction": "mean", "normalize": True},
            "time_stat": "median of per-step seconds over interleaved samples; q1/q3 are quartiles",
            "threads": torch.get_num_threads(),
            "memory_method": (
                "torch.profiler(profile_memory=True): peak running sum of c10 CPU allocations during one step"
                if dev.type == "cpu"
                else "torch.cuda.max_memory_allocated - memory_allocated before one step"
            ),
            "floor_method": "median time of dst.copy_(src) for an (N, C) tensor of the case's dtype",
        },
        "variants": names,
        "cases": [],
    }

    clock0 = _cpu_clock()
    # One compile per case: lift the recompile limits (their names vary across torch versions).
    limits = {
        k: v
        for k, v in dict(cache_size_limit=64, recompile_limit=64, accumulated_cache_size_limit=512,
                         accumulated_recompile_limit=512).items()
        if hasattr(torch._dynamo.config, k)
    }
    with torch._dynamo.config.patch(**limits):
        for case in cases:
            z, y = _inputs(case, dev)
            fns, compile_s = {}, {}
            for name in names:
                fns[name] = extra[name] if name in extra else _variant_fn(name)
            # Warm up (compiles, first-touch, caches); calibrate steps per sample.
            inner = {}
            for name, fn in fns.items():
                t0 = time.perf_counter()
                _step(fn, z, y)
                _sync(dev)
                if name == "compiled DM":
                    compile_s[name] = time.perf_counter() - t0
                for _ in range(max(warmup - 1, 0)):
                    _step(fn, z, y)
                t = _sample(fn, z, y, 1, dev)
                inner[name] = max(1, math.ceil(min_sample_s / max(t, 1e-7)))
            samples: Dict[str, List[float]] = {name: [] for name in names}
            for r in range(repeats):
                k = r % len(names)
                for name in names[k:] + names[:k]:
                    samples[name].append(_sample(fns[name], z, y, inner[name], dev))
            floor_s = _floor(case, dev, max(repeats, 5))
            tick(f"{case.label} floor")

            entry = {
                "case": asdict(case),
                "label": case.label,
                "grad_bytes": case.grad_bytes,
                "floor_s": floor_s,
                "floor_GBps": 2 * case.grad_bytes / floor_s / 1e9,
                "results": {},
            }
            for name in names:
                lo, med, hi = _quartiles(samples[name])
                peak = None
                if measure_memory:
                    peak = _peak_extra_cpu(fns[name], z, y) if dev.type == "cpu" else _peak_extra_cuda(fns[name], z, y, dev)
                entry["results"][name] = {
                    "median_s": med,
                    "q1_s": lo,
                    "q3_s": hi,
                    "min_s": min(samples[name]),
                    "steps_per_sample": inner[name],
                    "samples": len(samples[name]),
                    "samples_s": samples[name],  # in the order taken (interleaved rounds)
                    "peak_extra_bytes": peak,
                    "peak_extra_over_grad": None if peak is None else peak / case.grad_bytes,
                    "floor_fraction": floor_s / med,
                }
                if name in compile_s:
                    entry["results"][name]["first_call_s"] = compile_s[name]
                tick(f"{case.label} {name}")
            for name, rec in entry["results"].items():
                rec["speedup_vs"] = {
                    base: entry["results"][base]["median_s"] / rec["median_s"]
                    for base in BASELINES + EXTRA_BASELINES
                    if base in entry["results"] and base != name
                }
            entry["grad_rel_diff_vs_robustloss"] = _grad_check(fns, case, dev)
            result["cases"].append(entry)
            del z, y, fns
    result["machine"]["loadavg_after"] = _loadavg()
    # The honest noise figure: CPU (in cores) that other processes took during the run.
    result["machine"]["other_processes_cores"] = other_cpu_load(clock0, _cpu_clock())
    return result


# --------------------------------------------------------------------------- output


def _ms(s: float) -> str:
    ms = s * 1e3
    return f"{ms:.3f}" if ms < 1 else f"{ms:.2f}" if ms < 100 else f"{ms:.1f}"


def _fmt_opt(x) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def format_table(result: Dict) -> str:
    """A markdown table: one row per case x variant, plus the bandwidth floor."""
    m = result["machine"]
    head = (
        f"Machine: {m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch threads), "
        f"torch {m['torch']}, kernel {m.get('cpu_capability')}, {m['device']}, {m['date']}, "
        f"other processes used {_fmt_opt(m.get('other_processes_cores'))} cores during the run; "
        f"clock: {result['settings'].get('clock', 'wall')}\n\n"
    )
    # A speedup column for every baseline in the run (columns read "baseline time / this time").
    bases = [b for b in BASELINES + EXTRA_BASELINES if b in result["variants"]]
    cols = ["case", "variant", "fwd+bwd ms (median)", "IQR ms", "min ms", *(f"vs {b}" for b in bases),
            "peak extra MiB (x grad)"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for entry in result["cases"]:
        for name, rec in entry["results"].items():
            sp = rec.get("speedup_vs", {})
            peak = rec.get("peak_extra_bytes")
            mem = "n/a" if peak is None else f"{peak / 2**20:.2f} ({rec['peak_extra_over_grad']:.2f}x)"
            cells = [
                entry["label"],
                name,
                _ms(rec["median_s"]),
                f"{_ms(rec['q1_s'])}-{_ms(rec['q3_s'])}",
                _ms(rec["min_s"]),
                *(f"{sp[b]:.2f}x" if b in sp else "-" for b in bases),
                mem,
            ]
            lines.append("| " + " | ".join(cells) + " |")
        gb = entry["grad_bytes"] / 2**20
        lines.append(
            f"| {entry['label']} | *bandwidth floor* (read + write once, {entry['floor_GBps']:.1f} GB/s) | "
            f"{_ms(entry['floor_s'])} | | |" + " |" * len(bases) + f" {gb:.2f} (1.00x) |"
        )
    return head + "\n".join(lines) + "\n"


def write_json(result: Dict, path) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")


def write_png(result: Dict, path) -> None:
    """Two panels: speedup over F.cross_entropy per case (the floor as a ceiling), and peak extra memory."""
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise RuntimeError(
            "write_png needs matplotlib: pip install matplotlib (or robustloss_fast[plot])"
        ) from exc

    cases = result["cases"]
    names = result["variants"]
    labels = [e["label"] for e in cases]
    fig = Figure(figsize=(max(8, 1.8 * len(cases) + 3), 8), layout="constrained")
    ax_t, ax_m = fig.subplots(2, 1)
    width = 0.8 / max(len(names), 1)
    for k, name in enumerate(names):
        xs = [i + (k - (len(names) - 1) / 2) * width for i in range(len(cases))]
        sp, mem = [], []
        for e in cases:
            rec = e["results"].get(name)
            base = e["results"].get("F.cross_entropy")
            sp.append(base["median_s"] / rec["median_s"] if rec and base else float("nan"))
            mem.append(rec["peak_extra_over_grad"] if rec and rec["peak_extra_over_grad"] is not None else float("nan"))
        bars = ax_t.bar(xs, sp, width, label=name)
        ax_t.bar_label(bars, fmt="%.2f", fontsize=7)
        ax_m.bar(xs, mem, width, label=name)
    if all("F.cross_entropy" in e["results"] for e in cases):
        ceil = [e["results"]["F.cross_entropy"]["median_s"] / e["floor_s"] for e in cases]
        ax_t.scatter(range(len(cases)), ceil, marker="_", s=2000, color="k", label="bandwidth floor", zorder=3)
    ax_t.axhline(1.0, color="grey", lw=0.8)
    ax_t.set_yscale("log")
    ax_t.set_ylabel("speedup over F.cross_entropy (fwd+bwd)")
    ax_t.set_xticks(range(len(cases)), labels)
    ax_t.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    m = result["machine"]
    ax_t.set_title(
        f"{m['cpu']}, {m['torch_threads']} threads, torch {m['torch']}; "
        f"other processes: {_fmt_opt(m.get('other_processes_cores'))} cores",
        fontsize=9,
    )
    ax_m.axhline(1.0, color="grey", lw=0.8)
    ax_m.set_ylabel("peak extra memory / gradient size")
    ax_m.set_xticks(range(len(cases)), labels)
    fig.savefig(path, dpi=110)
