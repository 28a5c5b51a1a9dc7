#!/usr/bin/env bash
# Everything that needs an NVIDIA GPU, in one call of at most 9 minutes:
#
#   OUT=/some/dir bash benchmarks/gpu_suite.sh [--dry-run] [STAGE ...]
#
# Stages (all of them, in this order, when none is named):
#   setup     machine facts; peers' wheels from .whl/ (when there) into $PEER_SITE
#   build     the extension in place with CUDA for this GPU (setup.py build_ext --inplace:
#             MAX_JOBS sources at a time; CXX: the environment's, or a g++ that links the
#             shared C++ runtime when that one does not);
#             meanwhile bench_gpu.py --prewarm compiles the torch.compile variants into the
#             on-disk caches, so the benchmark does not spend its time compiling
#   test      the tests that run on the GPU: -k "cuda or triton" (GPU_TESTS_K), tests/test_cuda.py first
#             (pytest-xdist: PYTEST_WORKERS, default 12; pytest-timeout per test) -> junit.xml
#   sanitize  compute-sanitizer memcheck and racecheck (float32, bfloat16) on
#             benchmarks/sanitize_case.py parity, every launch layout, both GPU backends
#             (0 errors required), memcheck on its bad-target case per GPU backend (no
#             out-of-bounds access, and the bad target reported clearly)
#   bench     benchmarks/bench_gpu.py with the time that is left -> bench_gpu.json/.md/.png
#   fastexp   an A/B of the fast exp in the kernels' per-element loops (csrc/cuda/common.cuh:
#             exp_elem): the extension rebuilt with ROBUSTLOSS_ACCURATE_EXP=1 (left in place),
#             the parity case on it (no sanitizer), and the benchmark's 16384 x 128256 bf16
#             logits for ours and Liger -> logs/fastexp/, compared in summary.md; skipped when
#             under FASTEXP_MIN_S (100) seconds are left
#   summary   summary.md
# test and sanitize run side by side (correctness checks, not timings); the
# benchmark runs alone after them.
#
# $OUT receives at most 6 files (a remote GPU run returns at most 8): summary.md,
# bench_gpu.json, bench_gpu.md, bench_gpu.png, junit.xml and logs.tar.gz (every
# log: this script's output, build, pytest, each sanitizer run, the benchmark,
# nvidia-smi, toolchain facts), rewritten after every stage so that a run cut
# short still returns what it did.
#
# Time: SUITE_BUDGET_S (default 540) for everything; each stage runs under
# `timeout` (BUILD_TIMEOUT 240, CHECKS_TIMEOUT 300 for test and sanitize) and
# the benchmark gets what is left less SUMMARY_RESERVE_S (20) and the fastexp
# stage's FASTEXP_MIN_S (100, when that stage is wanted), so one stuck
# stage cannot take the others' time. The checkout is importable
# (PYTHONPATH=$PWD); the benchmark records GIT_COMMIT when .git is absent.
#
# --dry-run (or DRY_RUN=1), for a machine without a GPU: the same stages end
# to end, with a CPU-only build, a small test subset (DRY_TESTS), the sanitizer
# cases run directly on the CPU backend (no sanitizer), and the benchmark's
# --dry-run. Exit status: 0 only when every stage that ran passed.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
DRY_RUN=${DRY_RUN:-0}
stages=()
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    -h|--help) sed -n '2,/^set -uo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    setup|build|test|sanitize|bench|fastexp|summary) stages+=("$arg") ;;
    *) echo "gpu_suite: unknown argument $arg (stages: setup build test sanitize bench fastexp summary; --dry-run)" >&2; exit 2 ;;
  esac
done
[ ${#stages[@]} -eq 0 ] && stages=(setup build test sanitize bench fastexp summary)
want() { local s; for s in "${stages[@]}"; do [ "$s" = "$1" ] && return 0; done; return 1; }

PY=${PYTHON:-python3}
OUT=${OUT:-$ROOT/gpu_suite_out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/gpu_suite.XXXXXX")
LOGS=$SCRATCH/logs
mkdir -p "$LOGS"
STATUS=$LOGS/stages.tsv
: >"$STATUS"
PEER_SITE=${PEER_SITE:-$([ "$DRY_RUN" = 1 ] && echo "$SCRATCH/site" || echo /tmp/site)}
SUITE_BUDGET_S=${SUITE_BUDGET_S:-540}
BUILD_TIMEOUT=${BUILD_TIMEOUT:-240}
CHECKS_TIMEOUT=${CHECKS_TIMEOUT:-300}
SUMMARY_RESERVE_S=${SUMMARY_RESERVE_S:-20}
DRY_TESTS=${DRY_TESTS:-tests/test_golden.py}
export PYTHONUNBUFFERED=1
export PYTHONPATH=$ROOT${PEER_SITE:+:$PEER_SITE}${PYTHONPATH:+:$PYTHONPATH}
SECONDS=0
exec > >(tee -a "$LOGS/suite.log") 2>&1

note() { echo "[gpu_suite $(printf '%3d' "$SECONDS")s] $*"; }
left() { echo $((SUITE_BUDGET_S - SECONDS)); }
# Seconds a stage may take: its own cap, or what the budget leaves after the reserve.
cap() { local c=$1 l; l=$(($(left) - $2)); [ "$l" -lt "$c" ] && c=$l; [ "$c" -lt 10 ] && c=10; echo "$c"; }
record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$STATUS"; }  # stage, status, seconds, note
pack() { tar -czf "$OUT/logs.tar.gz.tmp" -C "$SCRATCH" logs 2>/dev/null && mv -f "$OUT/logs.tar.gz.tmp" "$OUT/logs.tar.gz"; }
trap 'pack; rm -rf "$SCRATCH"' EXIT

note "root $ROOT, OUT $OUT, stages: ${stages[*]}$([ "$DRY_RUN" = 1 ] && echo ' (DRY RUN: no GPU)'), budget ${SUITE_BUDGET_S}s"

stage_setup() {
  local t0=$SECONDS
  {
    echo "date: $(date -u +%FT%TZ)"
    echo "host: $(uname -srm), $(nproc) cores"
    "$PY" - <<'EOF'
import importlib, sys
print("python:", sys.executable, sys.version.split()[0])
for name in ("torch", "triton", "xdist", "pytest_timeout", "matplotlib"):
    try:
        print(f"{name}:", getattr(importlib.import_module(name), "__version__", "present"))
    except Exception as exc:  # noqa: BLE001
        print(f"{name}: absent ({type(exc).__name__})")
import sysconfig
print("python's C++ compiler (setuptools' default):", sysconfig.get_config_var("CXX"))
import torch
print("torch cuda:", torch.version.cuda, "device:", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
EOF
    echo "nvcc: $(nvcc --version 2>/dev/null | tail -n 1)"
    echo "c++: $(${CXX:-c++} --version 2>/dev/null | head -n 1) ($(command -v "${CXX:-c++}"); CXX=${CXX:-unset})"
    echo "g++: $(g++ --version 2>/dev/null | head -n 1) ($(command -v g++))"
    echo "compute-sanitizer: $(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null)"
    echo "git commit: $(git rev-parse HEAD 2>/dev/null || echo "${GIT_COMMIT:-unknown (no .git here; set GIT_COMMIT)}")"
  } >"$LOGS/env.txt" 2>&1
  nvidia-smi >"$LOGS/nvidia-smi.txt" 2>&1 || echo "no nvidia-smi" >"$LOGS/nvidia-smi.txt"
  cat "$LOGS/env.txt"
  local wheels=(.whl/*.whl) msg
  if [ -e "${wheels[0]}" ]; then
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$PEER_SITE" \
        "${wheels[@]}" >"$LOGS/pip.log" 2>&1; then
      msg="peers from .whl: $(cd .whl && ls -- *.whl | tr '\n' ' ')"
    else
      msg="pip could not install .whl/*.whl (see pip.log): peers absent"
    fi
  else
    msg="no .whl/ here: the peers (Liger-Kernel, cut-cross-entropy) will be skipped unless installed"
  fi
  note "$msg"
  record setup ok $((SECONDS - t0)) "$msg"
}

# The CUDA file keeps one core busy for most of the build and leaves the rest idle: meanwhile,
# and on through the checks (which time nothing), the benchmark's torch.compile variants fill
# Inductor's and Triton's on-disk caches. Whatever is not compiled by the time the benchmark
# starts is compiled there, cold.
PREWARMED=0
pw=""
start_prewarm() {
  local dry=()
  [ "$DRY_RUN" = 1 ] && dry=(--dry-run)
  TORCHINDUCTOR_COMPILE_THREADS=${PREWARM_THREADS:-8} timeout -k 5 $((BUILD_TIMEOUT + CHECKS_TIMEOUT)) \
    "$PY" benchmarks/bench_gpu.py --prewarm ${dry[@]+"${dry[@]}"} >"$LOGS/prewarm.log" 2>&1 &
  pw=$!
}
finish_prewarm() {
  [ -n "$pw" ] || return 0
  if kill -0 "$pw" 2>/dev/null; then
    note "prewarm still running: stopped (the benchmark compiles the rest itself)"
    kill "$pw" 2>/dev/null
  fi
  if wait "$pw"; then PREWARMED=1; fi
  pw=""
  note "prewarm of the compiled variants: $([ $PREWARMED = 1 ] && echo ok || echo 'incomplete (prewarm.log)')"
  grep "^\[prewarm\]" "$LOGS/prewarm.log" | sed 's/^/    /'
}

# The GPU's compute capability ("9.0"): the one architecture a build here compiles for.
cuda_arch() { "$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())' 2>/dev/null; }

# 0 when compiler $1 links a shared library against the shared C++ runtime (libstdc++.so, libgcc_s),
# as setup.py requires: it refuses an extension that carries its own copy, in which a C++ error
# would crash Python. On the H200 machine (2026-11-30) CXX named a g++ that links them statically.
shared_runtime_cxx() {
  local d rc=1
  d=$(mktemp -d)
  printf 'int f(int x) { if (x) throw x; return 0; }\n' >"$d/t.cpp"
  if "$1" -shared -fPIC "$d/t.cpp" -o "$d/t.so" >/dev/null 2>&1; then
    nm -D --defined-only "$d/t.so" 2>/dev/null | grep -qE " (__cxa_throw|_Unwind_RaiseException|__gxx_personality_v0)$" || rc=0
  fi
  rm -rf "$d"
  return $rc
}

# CXX (and CC beside it) for the build: the environment's, else the first g++ that links the shared runtime.
pick_cxx() {
  local cxx=${CXX:-} alt
  # Unset, setuptools takes Python's own compiler (sysconfig's CXX), not c++.
  [ -n "$cxx" ] || cxx=$("$PY" -c 'import sysconfig; print((sysconfig.get_config_var("CXX") or "c++").split()[0])')
  shared_runtime_cxx "$cxx" && return 0
  for alt in /usr/bin/g++ g++ c++; do
    alt=$(command -v "$alt") || continue
    [ "$alt" = "$cxx" ] && continue
    if shared_runtime_cxx "$alt"; then
      note "build: $cxx links its own C++ runtime into shared libraries; building with CXX=$alt"
      export CXX=$alt
      [ -x "${alt%g++}gcc" ] && export CC=${alt%g++}gcc
      return 0
    fi
  done
  note "build: no g++ here links the shared C++ runtime (setup.py will refuse the extension)"
}

# The CUDA build for arch $1 within $2 seconds -> build.log.
cuda_build() {
  TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$1} MAX_JOBS=${MAX_JOBS:-16} timeout -k 10 "$2" \
    "$PY" setup.py build_ext --inplace >"$LOGS/build.log" 2>&1
}

stage_build() {
  local t0=$SECONDS limit rc arch
  limit=$(cap "$BUILD_TIMEOUT" 200)
  if [ "$DRY_RUN" = 1 ]; then
    note "build: dry run, CPU-only (ROBUSTLOSS_NO_CUDA=1), limit ${limit}s"
    MAX_JOBS=${MAX_JOBS:-2} ROBUSTLOSS_NO_CUDA=1 timeout -k 10 "$limit" "$PY" setup.py build_ext --inplace \
      >"$LOGS/build.log" 2>&1
    rc=$?
  else
    pick_cxx
    arch=$(cuda_arch)
    note "build: TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$arch} MAX_JOBS=${MAX_JOBS:-16} CXX=${CXX:-unset}, limit ${limit}s"
    cuda_build "$arch" "$limit"
    rc=$?
    # The probe can pass a compiler whose real link still carries the runtime (the H200
    # machine's CXX, 2026-12-01: a g++ wrapper): setup.py's refusal then names it, and the
    # build runs once more with the distribution's g++.
    if [ $rc -ne 0 ] && grep -q "linked with its own copy of the C++ runtime" "$LOGS/build.log" \
        && [ -x /usr/bin/g++ ] && [ "${CXX:-}" != /usr/bin/g++ ]; then
      note "build: ${CXX:-the default compiler} linked its own C++ runtime after all; again with CXX=/usr/bin/g++"
      mv "$LOGS/build.log" "$LOGS/build_first.log"
      export CXX=/usr/bin/g++
      [ -x /usr/bin/gcc ] && export CC=/usr/bin/gcc
      cuda_build "$arch" "$(cap "$BUILD_TIMEOUT" 200)"
      rc=$?
    fi
  fi
  {
    # A C++ exception thrown from the extension crashed the process on the first GPU machine:
    # which runtime the extension links and whether it carries its own unwinder say why.
    echo "--- toolchain of the built extension"
    for so in robustloss_fast/_C*.so; do
      [ -e "$so" ] || continue
      echo "$so"; ldd "$so" 2>&1 | grep -E "libstdc|libgcc|libc10|libtorch" || true
      nm -D --defined-only "$so" 2>/dev/null | grep -E " (__cxa_throw|_Unwind_RaiseException)$" || echo "(no unwinder symbols defined in it)"
    done
    ${CXX:-c++} -v 2>&1 | tail -n 3
  } >>"$LOGS/build.log" 2>&1
  local backends
  backends=$("$PY" -c 'import robustloss_fast as rf; print(" ".join(rf.available_backends()))' 2>&1 | tail -n 1)
  if [ $rc -ne 0 ]; then
    tail -n 30 "$LOGS/build.log"
    note "build FAILED (rc $rc$([ $rc -eq 124 ] && echo ', time limit')); backends now: $backends"
    record build FAILED $((SECONDS - t0)) "rc $rc; backends: $backends"
    return 1
  fi
  if [ "$DRY_RUN" != 1 ] && [[ " $backends " != *" cuda "* ]]; then
    note "build FAILED: the extension has no CUDA kernels (backends: $backends)"
    record build FAILED $((SECONDS - t0)) "built without CUDA; backends: $backends"
    return 1
  fi
  note "build ok in $((SECONDS - t0))s; backends: $backends"
  record build ok $((SECONDS - t0)) "backends: $backends"
}


stage_test() {
  local t0=$SECONDS limit=$1 args=() rc
  if [ "$DRY_RUN" = 1 ]; then
    # shellcheck disable=SC2206
    args=(${DRY_TESTS})
  else
    if "$PY" -c "import xdist" 2>/dev/null; then args+=(-n "${PYTEST_WORKERS:-12}"); fi
    if "$PY" -c "import pytest_timeout" 2>/dev/null; then args+=(--timeout "${PYTEST_TEST_TIMEOUT:-150}"); fi
    # The tests that run on the GPU (CI runs the rest on every commit): whatever names cuda or
    # triton -- the backend fixture's *_on_cuda cases, tests/test_cuda.py, the Triton kernels'
    # own tests (on the GPU there: no interpreter) -- with tests/test_cuda.py first. The whole
    # suite took 15 minutes there (20% in 180 s: the CPU variants' tests are the slowest).
    local f
    args+=(tests/test_cuda.py)
    for f in tests/test_*.py; do [ "$f" = tests/test_cuda.py ] || args+=("$f"); done
    args+=(-k "${GPU_TESTS_K:-cuda or triton}")
  fi
  # shellcheck disable=SC2206
  args+=(${PYTEST_ARGS:-})
  note "test: pytest ${args[*]}, limit ${limit}s"
  # SIGINT first: pytest then stops like on ^C and still writes its summary and junit.xml.
  timeout -s INT -k 20 "$limit" "$PY" -m pytest -q -rfE --durations=15 -p no:cacheprovider \
    --junitxml="$OUT/junit.xml" "${args[@]}" >"$LOGS/pytest.log" 2>&1
  rc=$?
  local counts
  counts=$(tail -n 1 "$LOGS/pytest.log")
  note "test: rc $rc: $counts"
  # pytest: 0 all passed, 1 some failed, 5 none collected; 124/130 = cut by the time limit
  if [ $rc -eq 0 ]; then record test ok $((SECONDS - t0)) "$counts"; else record test FAILED $((SECONDS - t0)) "rc $rc: $counts"; fi
  return $rc
}

# One sanitizer run: tool ("none": the program alone), case name, time limit, then the command.
# Its log is sanitizer_<tool>_<case>.log, closed by the exit status; suite_summary.py judges it.
sanitize_one() {
  local tool=$1 name=$2 limit=$3 rc log
  shift 3
  log="$LOGS/sanitizer_${tool}_$name.log"
  # Parity runs without torch's caching allocator, so that an access past a tensor's end is past its
  # allocation. Not the bad-target runs: after the device-side assertion, a free without the cache
  # calls cudaFree, which fails, and torch throws from a destructor -- std::terminate before Python
  # can print the report (seen on the H200, 2026-11-30).
  local nocache=()
  [[ "$name" == parity* ]] && nocache=(env PYTORCH_NO_CUDA_MEMORY_CACHING=1)
  if [ "$tool" = none ]; then
    timeout -k 10 "$limit" "$@" >"$log" 2>&1
  else
    # Only the Python process: a child that never calls CUDA (a compiler Triton runs) would end
    # "before first instrumented API call", which the tool reports as an error.
    ${nocache[@]+"${nocache[@]}"} timeout -k 10 "$limit" "$SANITIZER" --tool "$tool" --error-exitcode 86 \
      --print-limit 100 --target-processes application-only "$@" >"$log" 2>&1
  fi
  rc=$?
  echo "exit status: $rc" >>"$log"
}

stage_sanitize() {
  local t0=$SECONDS limit=$1 pids=() dev=cuda mem=memcheck race=racecheck backends verdicts rc
  SANITIZER=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
  backends=$("$PY" -c 'import robustloss_fast as rf; print(",".join(b for b in ("cuda", "triton") if b in rf.available_backends()))' 2>/dev/null)
  if [ "$DRY_RUN" = 1 ]; then
    note "sanitize: dry run, no GPU and no sanitizer: the cases run directly on the CPU backend (--quick)"
    dev=cpu mem=none race="" backends=cpu
  elif [ ! -x "$SANITIZER" ]; then
    note "sanitize FAILED: compute-sanitizer not found"
    record sanitize FAILED $((SECONDS - t0)) "compute-sanitizer not found"
    return 1
  elif [ -z "$backends" ]; then
    note "sanitize FAILED: neither GPU backend is available"
    record sanitize FAILED $((SECONDS - t0)) "no GPU backend"
    return 1
  fi
  note "sanitize: $mem${race:+ + $race} on parity ($backends); $mem on bad targets per backend; limit ${limit}s"
  # Side by side: each is one process on the GPU, mostly waiting on the instrumented kernels.
  # --quick (float32 and bfloat16: every launch layout still) under both tools: memcheck over all four
  # dtypes did not finish in 180 s on the H200 (2026-11-30).
  sanitize_one "$mem" parity "$limit" "$PY" benchmarks/sanitize_case.py parity --device $dev --backends "$backends" --quick &
  pids+=($!)
  if [ -n "$race" ]; then
    # racecheck costs more per launch; two dtypes still cover every launch layout
    sanitize_one "$race" parity "$limit" "$PY" benchmarks/sanitize_case.py parity --device $dev --backends "$backends" --quick &
    pids+=($!)
  fi
  for b in ${backends//,/ }; do
    sanitize_one "$mem" "bad_target_$b" "$limit" "$PY" benchmarks/sanitize_case.py bad-target --device $dev --backend "$b" &
    pids+=($!)
  done
  wait "${pids[@]}"
  verdicts=$("$PY" benchmarks/suite_summary.py sanitizers --logs "$LOGS")
  rc=$?
  echo "$verdicts" | sed 's/^/    /'
  note "sanitize $([ $rc -eq 0 ] && echo ok || echo FAILED) in $((SECONDS - t0))s"
  record sanitize "$([ $rc -eq 0 ] && echo ok || echo FAILED)" $((SECONDS - t0)) "$(echo "$verdicts" | tr '\n' ';')"
  return $rc
}

stage_bench() {
  local t0=$SECONDS budget rc args=()
  budget=$(($(left) - SUMMARY_RESERVE_S - FASTEXP_RESERVE_S))
  if [ "$budget" -lt 30 ]; then
    note "bench skipped: ${budget}s left in the budget"
    record bench skipped 0 "only ${budget}s left"
    return 0
  fi
  [ "$DRY_RUN" = 1 ] && args+=(--dry-run)
  [ "$PREWARMED" = 1 ] && args+=(--compile-reserve-s 20)
  note "bench: bench_gpu.py ${args[*]+${args[*]}} --budget-s $budget (hard limit $((budget + 30))s)"
  # The budget stops new work; the hard limit catches one step that never ends.
  timeout -k 10 $((budget + 30)) "$PY" benchmarks/bench_gpu.py ${args[@]+"${args[@]}"} --out "$OUT" --budget-s "$budget" \
    >"$LOGS/bench.log" 2>&1
  rc=$?
  grep -E "^\[bench_gpu|^bench_gpu:" "$LOGS/bench.log"
  if [ $rc -eq 0 ]; then record bench ok $((SECONDS - t0)) "see bench_gpu.md"; else
    tail -n 20 "$LOGS/bench.log"
    # The JSON is rewritten after every case: tables and plot from what was measured.
    [ -f "$OUT/bench_gpu.json" ] && "$PY" benchmarks/bench_gpu.py --replot "$OUT/bench_gpu.json" >>"$LOGS/bench.log" 2>&1
    record bench FAILED $((SECONDS - t0)) "rc $rc$([ $rc -eq 124 ] && echo ', time limit')"
  fi
  return $rc
}

# Seconds kept for the fastexp stage by the stages before it (when it is wanted): its minimum and
# 40 more, as the benchmark before it may run past its own budget by its start and teardown.
FASTEXP_RESERVE_S=0
want fastexp && FASTEXP_RESERVE_S=$((${FASTEXP_MIN_S:-100} + 40))
FASTEXP_SHAPE=16384x128256:bfloat16
FASTEXP_VARIANTS="ours DM auto,ours CCE auto,Liger CE"
stage_fastexp() {
  local t0=$SECONDS budget rc=0 dir=$LOGS/fastexp dev=cuda backends=cuda arch shape=$FASTEXP_SHAPE dry=()
  budget=$(($(left) - SUMMARY_RESERVE_S))
  if [ "$budget" -lt "${FASTEXP_MIN_S:-100}" ]; then
    note "fastexp skipped: ${budget}s left in the budget"
    record fastexp skipped 0 "only ${budget}s left"
    return 0
  fi
  mkdir -p "$dir"
  if [ "$DRY_RUN" = 1 ]; then
    # No CUDA here: nothing to rebuild; the parity case and the benchmark run as on a GPU.
    note "fastexp: dry run, no rebuild (RL_ACCURATE_EXP only changes the CUDA kernels)"
    dev=cpu backends=cpu shape=16x1000:bfloat16 dry=(--dry-run)
  else
    arch=$(cuda_arch)
    pick_cxx
    note "fastexp: rebuild with ROBUSTLOSS_ACCURATE_EXP=1 (limit $((budget / 2))s)"
    ROBUSTLOSS_ACCURATE_EXP=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$arch} MAX_JOBS=${MAX_JOBS:-16} \
      timeout -k 10 $((budget / 2)) "$PY" setup.py build_ext --inplace --force >"$dir/build.log" 2>&1 || rc=$?
    if [ $rc -ne 0 ]; then
      tail -n 20 "$dir/build.log"
      note "fastexp FAILED: the rebuild (rc $rc)"
      record fastexp FAILED $((SECONDS - t0)) "rebuild rc $rc"
      return 1
    fi
  fi
  timeout -k 10 "$(cap 120 $((SUMMARY_RESERVE_S + 30)))" "$PY" benchmarks/sanitize_case.py parity --device $dev \
    --backends $backends --quick >"$dir/parity.log" 2>&1 || rc=$?
  note "fastexp: parity $(tail -n 1 "$dir/parity.log")"
  budget=$(($(left) - SUMMARY_RESERVE_S))
  if [ "$budget" -lt 30 ]; then
    note "fastexp: no benchmark, ${budget}s left"
    record fastexp FAILED $((SECONDS - t0)) "parity rc $rc; no time left for the benchmark"
    return 1
  fi
  # Its budget stops new work 10 s early; the hard limit, half the summary's reserve late, catches a hang.
  timeout -k 10 $((budget + SUMMARY_RESERVE_S / 2)) "$PY" benchmarks/bench_gpu.py ${dry[@]+"${dry[@]}"} --only logits \
    --logits-shapes "$shape" --variants "$FASTEXP_VARIANTS" --out "$dir" --budget-s "$((budget - 10))" \
    >"$dir/bench.log" 2>&1 || rc=$?
  grep -E "^\[bench_gpu|^bench_gpu:" "$dir/bench.log"
  if [ $rc -eq 0 ]; then record fastexp ok $((SECONDS - t0)) "logs/fastexp"; else
    record fastexp FAILED $((SECONDS - t0)) "rc $rc (logs/fastexp)"
  fi
  return $rc
}

status=0
if want setup; then stage_setup || status=1; pack; fi
if want build; then
  want bench && start_prewarm
  stage_build || status=1
  pack
fi
if want test || want sanitize; then
  limit=$(cap "$CHECKS_TIMEOUT" $((120 + FASTEXP_RESERVE_S)))
  pt="" ps=""
  if want test; then stage_test "$limit" & pt=$!; fi
  if want sanitize; then stage_sanitize "$limit" & ps=$!; fi
  if [ -n "$pt" ]; then wait "$pt" || status=1; fi
  if [ -n "$ps" ]; then wait "$ps" || status=1; fi
  pack
fi
if want bench; then finish_prewarm; stage_bench || status=1; pack; fi
if want fastexp; then stage_fastexp || status=1; pack; fi
if want summary; then
  "$PY" benchmarks/suite_summary.py summary --logs "$LOGS" --out "$OUT" $([ "$DRY_RUN" = 1 ] && echo --dry-run) \
    || { status=1; note "summary FAILED"; }
  pack
  cat "$OUT/summary.md" 2>/dev/null
fi
note "done in ${SECONDS}s, status $status; files in $OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
exit $status
