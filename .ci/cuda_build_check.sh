#!/usr/bin/env bash
# Proof that the CUDA backend builds and is wired up, on a machine without a GPU.
#
#   bash .ci/cuda_build_check.sh
#
# 1. A second virtualenv with pip's CUDA torch (torch==2.14.1+cu130, from the
#    local wheel cache): $CUDA_VENV, default ${TMPDIR:-/tmp}/robustloss-cuda-venv,
#    reused when it already holds that torch (about 75 s to create on 2 cores).
# 2. Builds the extension WITH CUDA in a copy of this checkout, so the working
#    tree's CPU build (robustloss_fast/_C*.so) is left alone. One GPU arch only:
#    TORCH_CUDA_ARCH_LIST defaults to "9.0" here (setup.py's default for real
#    installs is "8.0;9.0"); each extra arch adds about as much nvcc time again.
# 3. Imports that build: built_with_cuda() is True and the three ops have CUDA
#    kernels registered (plus CPU ones), the kernels are in the binary, each
#    compiled in its own pass's object (csrc/cuda/<pass>.cu) only, and
#    tests/test_cuda.py collects and skips cleanly (no device here); the
#    library links torch's C++ runtime and its errors reach Python
#    (tests/test_build.py).
# 4. Runs the CUDA kernels' own code on the CPU emulator
#    (csrc/cuda/emu/check_emu.py) against the pure-PyTorch reference.
#
# Needs: nvcc (13.x) on PATH, python3.11, g++ >= 11. Exit status 0 only if all passes.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${CUDA_VENV:-${TMPDIR:-/tmp}/robustloss-cuda-venv}
PYTHON=${PYTHON:-python3}
TORCH_VERSION=2.14.1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-2}

t0=$(date +%s)
step() { echo "[cuda_build_check +$(($(date +%s) - t0))s] $*"; }

if ! command -v nvcc >/dev/null 2>&1; then
  echo "cuda_build_check: nvcc is not on PATH; the CUDA build cannot be checked" >&2
  exit 1
fi
step "nvcc: $(nvcc --version | tail -n 1)"

# pip's index here lists locations that do not exist; those warnings are noise.
quiet_pip() { "$VENV/bin/pip" "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }; }

if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(not torch.__version__.startswith('$TORCH_VERSION') or torch.version.cuda is None)" 2>/dev/null; then
  step "creating $VENV with torch==$TORCH_VERSION (CUDA)"
  rm -rf "$VENV"
  "$PYTHON" -m venv "$VENV"
  quiet_pip install -q "torch==$TORCH_VERSION" numpy setuptools wheel ninja pytest
else
  step "reusing $VENV"
fi
PY="$VENV/bin/python"
step "$("$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)')"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/robustloss-cuda-build.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/src"
# The checkout without VCS data or earlier build products.
tar -C "$ROOT" --exclude=./.git --exclude=./build --exclude='*.so' --exclude='__pycache__' \
  --exclude='*.egg-info' --exclude=./.pytest_cache -cf - . | tar -C "$WORK/src" -xf -

step "building with CUDA (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST) in $WORK/src"
(cd "$WORK/src" && "$PY" setup.py -q build_ext --inplace >"$WORK/build.log" 2>&1) || {
  tail -n 60 "$WORK/build.log"
  echo "cuda_build_check: the CUDA build failed" >&2
  exit 1
}
# Compiler warnings about our own sources are shown (torch's headers have their own).
grep -i "warning" "$WORK/build.log" | grep -E "(^|/)csrc/" || true
step "build done"

(cd "$WORK/src" && "$PY" - <<'EOF'
import glob
import os
import torch
import robustloss_fast
from robustloss_fast import backends
from robustloss_fast.backends import compiled

assert torch.version.cuda is not None, "the venv's torch has no CUDA"
assert compiled.EXT is not None, f"robustloss_fast._C failed to import: {compiled.LOAD_ERROR}"
assert compiled.EXT.built_with_cuda() is True, "built_with_cuda() is False: setup.py skipped the CUDA sources"
assert compiled.BUILT_WITH_CUDA
for op in ("robust_ce_forward", "robust_ce_backward", "robust_ce_rows"):
    for key in ("CUDA", "CPU"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"robustloss::{op}", key), f"{op} has no {key} kernel"
so = glob.glob("robustloss_fast/_C*.so")
assert len(so) == 1, so
blob = open(so[0], "rb").read()
# Each kernel is in the binary, and compiled in the object of its own pass only: a kernel
# template instantiated in two translation units would be compiled (and shipped) twice.
home = {b"rows_kernel": "rows.o", b"one_block_kernel": "finalize.o", b"partials_kernel": "finalize.o",
        b"apply_kernel": "finalize.o", b"backward_kernel": "backward.o"}
objects = {os.path.basename(o): open(o, "rb").read() for o in glob.glob("build/temp*/csrc/cuda/*.o")}
for kernel, obj in home.items():
    assert kernel in blob, f"{kernel!r} is not in {so[0]}"
    where = sorted(name for name, data in objects.items() if kernel in data)
    assert where == [obj], f"{kernel!r} is compiled in {where}, expected in {obj} alone"
print(f"{so[0]}: {len(blob)} bytes; CUDA objects:", ", ".join(f"{n} {len(d)}" for n, d in sorted(objects.items())))
reason = backends.unavailable_reason("cuda")
print("cuda backend here:", reason or "available")
# The CPU kernels of the same build still work.
x = torch.randn(8, 5, requires_grad=True)
y = torch.randint(0, 5, (8,))
v = robustloss_fast.robust_cross_entropy(x, y, robustloss_fast.schemes.CCE(), normalize=False, backend="cpu")
ref = torch.nn.functional.cross_entropy(x, y)
assert torch.allclose(v, ref, rtol=1e-5, atol=1e-6), (v, ref)
print("CUDA build OK:", so[0])
EOF
)
step "registration checks passed"

(cd "$WORK/src" && "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py -rs 2>&1 | tail -n 5)
step "tests/test_cuda.py collected (skips without a device)"

(cd "$WORK/src" && "$PY" -m pytest -q -p no:cacheprovider tests/test_build.py 2>&1 | tail -n 5)
step "tests/test_build.py passed: one C++ runtime, errors reach Python"

(cd "$WORK/src" && "$PY" csrc/cuda/emu/check_emu.py --build-dir "$WORK/emu")
step "emulated kernels match the reference"
echo "cuda_build_check: OK in $(($(date +%s) - t0)) s"
