#!/usr/bin/env bash
# Everything that needs a GPU, for a session lent an NVIDIA machine (H100/H200).
#
#   OUT=/some/dir bash benchmarks/gpu_suite.sh [build] [test] [sanitize] [bench]
#
# With no stage named, all four run in order. The stages, each writing to $OUT:
#   build     builds the extension in place WITH CUDA for this GPU's arch
#             (python3 setup.py build_ext --inplace) -> build.log
#   test      the whole test suite on this machine (CUDA tests included)
#             -> pytest.log, junit.xml; PYTEST_ARGS adds options (default: -n 4
#             when pytest-xdist is installed)
#   sanitize  compute-sanitizer memcheck (and racecheck) on a small parity case
#             that also feeds bad targets -> sanitizer_memcheck.log, sanitizer_racecheck.log
#   bench     "cuda" (and "triton" where it works) against F.cross_entropy, eager DM
#             and compiled DM at (16384, 32000) bf16, (16384, 128256) bf16 and
#             (65536, 10) fp32: CUDA-event medians of a forward+backward step,
#             the fused ops alone, and achieved bandwidth against a measured
#             device-to-device copy -> gpu_bench.json
# One device call may run 10 minutes: name the stages in separate calls if the
# whole suite does not fit (build products stay while the machine is warm).
# The script exits non-zero if a stage fails, after running the stages asked for.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${OUT:-$ROOT/gpu_suite_out}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
cd "$ROOT"
export PYTHONUNBUFFERED=1

stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(build test sanitize bench)
status=0
note() { echo "[gpu_suite $(date +%H:%M:%S)] $*"; }

run_build() {
  nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1 || true
  local arch
  arch=$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')
  note "building for TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$arch} with $("$PY" -c 'import torch; print(torch.__version__)')"
  TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$arch} MAX_JOBS=${MAX_JOBS:-16} \
    "$PY" setup.py build_ext --inplace >"$OUT/build.log" 2>&1 || { tail -n 40 "$OUT/build.log"; return 1; }
  "$PY" -c 'from robustloss_fast import _ops; assert _ops.has_cuda_kernels(), "built without CUDA"; print("built with CUDA")'
}

run_test() {
  local args=${PYTEST_ARGS-}
  if [ -z "${PYTEST_ARGS+x}" ] && "$PY" -c "import xdist" 2>/dev/null; then args="-n 4"; fi
  note "pytest $args"
  # shellcheck disable=SC2086
  "$PY" -m pytest -q -rs --durations=25 --junitxml="$OUT/junit.xml" $args tests 2>&1 | tee "$OUT/pytest.log" | tail -n 40
}

run_sanitize() {
  local case_py="$OUT/sanitize_case.py"
  cat >"$case_py" <<'EOF'
# A small parity case over every launch layout, then bad targets: memcheck must
# see no out-of-bounds access or uninitialised read either way.
import torch
import robustloss_fast as rf
from robustloss_fast.schemes import DM, CCE

for dtype in (torch.float32, torch.bfloat16, torch.float64, torch.float16):
    for n, c in ((37, 3), (9, 100), (5, 1001), (3, 20001)):
        x = (torch.randn(n, c + 1, device="cuda") * 3).to(dtype)[:, 1:]  # misaligned, strided rows
        y = torch.randint(0, c, (n,), device="cuda")
        y[1] = -100
        for scheme, red in ((DM(), "mean"), (CCE(), "none")):
            for backend in ("cuda", "torch"):
                z = x.detach().clone().requires_grad_(True)
                v = rf.robust_cross_entropy(z, y, scheme, reduction=red, backend=backend)
                v.sum().backward()
                if backend == "cuda":
                    got = (v, z.grad)
                else:
                    torch.testing.assert_close(got[0], v.to(got[0].dtype), rtol=2e-2, atol=1e-4)
                    torch.testing.assert_close(got[1].float(), z.grad.float(), rtol=2e-2, atol=1e-4)
        bad = y.clone()
        bad[2] = c + 3
        try:
            rf.robust_cross_entropy(x, bad, DM(), backend="cuda")
            raise SystemExit("bad target not reported")
        except IndexError:
            pass
        torch.ops.robustloss.robust_ce_backward(torch.ones((), device="cuda"), x, bad, torch.zeros(n, 2, device="cuda"), -100)
torch.cuda.synchronize()
print("sanitize case done")
EOF
  local rc=0
  for tool in memcheck racecheck; do
    note "compute-sanitizer --tool $tool"
    compute-sanitizer --tool "$tool" --error-exitcode 1 --target-processes all "$PY" "$case_py" \
      >"$OUT/sanitizer_$tool.log" 2>&1 || rc=1
    tail -n 5 "$OUT/sanitizer_$tool.log"
  done
  return $rc
}

run_bench() {
  note "benchmark"
  "$PY" - "$OUT/gpu_bench.json" <<'EOF'
import json, statistics, sys
import torch
import torch.nn.functional as F
import robustloss_fast as rf
from robustloss_fast.schemes import DM
from robustloss_fast._bench import eager_dm  # the same plain-PyTorch DM the CPU benchmarks use

dev = torch.device("cuda")
REPS, WARM = 25, 5


def cuda_median(fn, reps=REPS, warm=WARM):
    """Median and quartiles (ms) of fn() timed with CUDA events, one event pair per call."""
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    q = statistics.quantiles(times, n=4)
    return {"median_ms": statistics.median(times), "q1_ms": q[0], "q3_ms": q[2]}


def robust(backend):
    scheme = DM()
    return lambda z, y: rf.robust_cross_entropy(z, y, scheme, backend=backend)


variants = {"F.cross_entropy": F.cross_entropy, "eager DM": eager_dm}
avail = rf.available_backends()
for b in ("cuda", "triton"):
    if b in avail:
        variants[f"robustloss[{b}]"] = robust(b)

result = {
    "device": torch.cuda.get_device_name(),
    "torch": torch.__version__,
    "available_backends": avail,
    "method": "CUDA-event median of %d steps after %d warm-ups; a step = zero grad + forward + backward" % (REPS, WARM),
    "cases": [],
}
for n, c, dtype in ((16384, 32000, torch.bfloat16), (16384, 128256, torch.bfloat16), (65536, 10, torch.float32)):
    torch.manual_seed(0)
    z0 = (torch.randn(n, c, device=dev) * 3).to(dtype)
    y = torch.randint(0, c, (n,), device=dev)
    nbytes = z0.numel() * z0.element_size()
    dst = torch.empty_like(z0)
    copy = cuda_median(lambda: dst.copy_(z0))
    del dst
    copy_bw = 2 * nbytes / (copy["median_ms"] * 1e-3)  # read + write
    case = {"shape": [n, c], "dtype": str(dtype), "logits_bytes": nbytes, "copy": copy, "copy_GBps": copy_bw / 1e9,
            "variants": {}}
    fns = dict(variants)
    fns["compiled DM"] = torch.compile(eager_dm, dynamic=False)
    z = z0.detach().clone().requires_grad_(True)
    ref_grad = None  # eager DM's gradient (it runs before the fused variants), to check theirs against
    for name, fn in fns.items():
        def step():
            z.grad = None
            fn(z, y).backward()
        try:
            timing = cuda_median(step)
        except Exception as exc:  # a variant that cannot run here is reported, not fatal
            case["variants"][name] = {"error": repr(exc)[:300]}
            continue
        timing["floor_fraction"] = copy["median_ms"] / timing["median_ms"]  # 1 read + 1 write floor
        case["variants"][name] = timing
        if name == "eager DM":
            ref_grad = z.grad.float()
        elif name.startswith("robustloss") and ref_grad is not None:
            timing["grad_rel_l1_vs_eager_DM"] = float((z.grad.float() - ref_grad).abs().sum() / ref_grad.abs().sum())
        torch.cuda.empty_cache()
    base = case["variants"].get("F.cross_entropy", {}).get("median_ms")
    for name, t in case["variants"].items():
        if base and "median_ms" in t:
            t["time_vs_cross_entropy"] = t["median_ms"] / base
    del ref_grad
    # The fused ops alone: forward reads the logits once; backward reads them and writes the gradient.
    if "cuda" in avail:
        ops = torch.ops.robustloss
        kid, (a, b) = DM().kernel_id, DM().kernel_params
        fwd = cuda_median(lambda: ops.robust_ce_forward(z0, y, kid, a, b, None, None, -100, 1, True))
        _, stats = ops.robust_ce_forward(z0, y, kid, a, b, None, None, -100, 1, True)
        g = torch.ones((), device=dev)
        bwd = cuda_median(lambda: ops.robust_ce_backward(g, z0, y, stats, -100))
        case["cuda_ops"] = {
            "forward": fwd, "forward_GBps": nbytes / (fwd["median_ms"] * 1e-3) / 1e9,
            "backward": bwd, "backward_GBps": 2 * nbytes / (bwd["median_ms"] * 1e-3) / 1e9,
            "note": "GBps = logits bytes read (+ gradient bytes written) / median time; compare copy_GBps",
        }
    result["cases"].append(case)
    print(json.dumps({k: case[k] for k in ("shape", "dtype", "copy_GBps")}),
          {k: round(v.get("median_ms", float("nan")), 3) for k, v in case["variants"].items()}, flush=True)
    del z, z0
    torch.cuda.empty_cache()

with open(sys.argv[1], "w") as f:
    json.dump(result, f, indent=1)
print("wrote", sys.argv[1])
EOF
}

for stage in "${stages[@]}"; do
  case "$stage" in
    build) run_build || { status=1; note "build FAILED"; break; } ;;
    test) run_test || { status=1; note "tests FAILED"; } ;;
    sanitize) run_sanitize || { status=1; note "sanitizer FAILED"; } ;;
    bench) run_bench || { status=1; note "benchmark FAILED"; } ;;
    *) echo "unknown stage $stage (build, test, sanitize, bench)" >&2; exit 2 ;;
  esac
done
note "done, status $status"
exit $status
