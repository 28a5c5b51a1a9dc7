"""Run the CUDA kernels of csrc/cuda on a CPU emulator and check them against the reference.

Without a GPU, nvcc proves the kernels compile; this proves they compute the
right thing. The kernel files themselves (common.cuh and the .cu file of each
pass: rows.cu, finalize.cu, backward.cu) and the op layer
(robust_ce_cuda_ops.cpp) are turned into host C++ by three mechanical edits
(includes swapped for shim.h / cuda_stubs.h, ``k<<<grid, block, 0, stream>>>(p)``
turned into ``emu::launch(k, grid, block, p)``, the CUDA dispatch key into a
CPU library ``robustloss_emu``) and built with the host compiler, one
translation unit per .cu file as in the real build; see shim.h for what the
emulator models. Every op runs end to end on CPU tensors and is
compared with robustloss_fast.reference, across all four row layouts of each
dtype, misaligned and strided rows, grid-stride loops (EMU_MAX_GRID=2), every
scheme and reduction (the two-term schemes too: label smoothing with and
without class weights, NCE/APL, and NFL, whose rows and stats are in P-form),
and the edge cases of SPEC §5-§6.

What it cannot see: timing, memory coalescing, bank conflicts, races between
blocks that run concurrently on a GPU (blocks run one after another here),
and nvcc-specific code generation (the real build checks that it compiles).

Usage (from a checkout; needs torch, ninja, g++ >= 11 and cuda_runtime_api.h):
    python csrc/cuda/emu/check_emu.py [--build-dir DIR]
Exits 1 when any check fails.
"""

from __future__ import annotations

import argparse
import glob
import logging
import math
import os
import re
import shutil
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
CUDA_DIR = os.path.dirname(HERE)
ROOT = os.path.dirname(os.path.dirname(CUDA_DIR))

LAUNCH = re.compile(r"(\w+<[^;<>]*>)<<<(.+), (\w+), 0, stream>>>\((\w+)\);")
# The kernel files, each with the number of launches it holds: a launch the regex missed would
# stay CUDA syntax, and a .cu file missing here would go unchecked, so both stop the run.
KERNEL_FILES = {"rows.cu": 1, "finalize.cu": 3, "backward.cu": 1}
SHARED_HEADER = "common.cuh"
with open(os.path.join(CUDA_DIR, "finalize.cu")) as _f:
    # The cross-row step's one-launch limit, from the source: the launch counts expected below follow it.
    ONE_BLOCK_MAX_ROWS = int(re.search(r"kOneBlockMaxRows = (\d+);", _f.read()).group(1))


def host_cuda(text: str) -> str:
    """The CUDA runtime headers swapped for the emulator's."""
    text = text.replace("#include <c10/cuda/CUDAException.h>\n", "")
    return text.replace("#include <cuda_runtime.h>\n", '#include "shim.h"\n')


def generate(out_dir: str) -> list:
    """Host C++ versions of the kernel and op files; fails loudly if the CUDA files changed shape.

    Each .cu file stays its own translation unit, as in the nvcc build, and includes the edited
    copy of common.cuh written next to it (a quoted include looks in the includer's folder
    first)."""
    on_disk = sorted(os.path.basename(p) for p in glob.glob(os.path.join(CUDA_DIR, "*.cu")))
    if on_disk != sorted(KERNEL_FILES):
        raise SystemExit(f"check_emu: csrc/cuda holds {on_disk}, the emulator knows {sorted(KERNEL_FILES)}")

    with open(os.path.join(CUDA_DIR, SHARED_HEADER)) as f:
        common = host_cuda(f.read())
    # Its one 16-byte store goes through __stcs, which the shim checks for alignment.
    if '#include "shim.h"' not in common or common.count("__stcs(") != 1 or "<<<" in common:
        raise SystemExit(f"check_emu: {SHARED_HEADER} no longer has the expected shape")
    texts = {SHARED_HEADER: common}

    def launch(m):
        exact = "true" if m.group(1).startswith(("partials_kernel", "one_block_kernel")) else "false"  # no grid-stride loop
        return f"emu::launch({m.group(1)}, {m.group(2)}, {m.group(3)}, {m.group(4)}, {exact});"

    for name, expected in KERNEL_FILES.items():
        with open(os.path.join(CUDA_DIR, name)) as f:
            cu = host_cuda(f.read())
        cu, launches = LAUNCH.subn(launch, cu)
        if launches != expected or "<<<" in cu or f'#include "{SHARED_HEADER}"' not in cu:
            raise SystemExit(f"check_emu: {name} no longer has the expected shape ({launches} launches)")
        texts["emu_" + name.replace(".cu", ".cpp")] = cu

    with open(os.path.join(CUDA_DIR, "robust_ce_cuda_ops.cpp")) as f:
        ops = f.read()
    cuda_includes = "#include <c10/cuda/CUDAGuard.h>\n#include <c10/cuda/CUDAStream.h>\n"
    if cuda_includes not in ops or "TORCH_LIBRARY_IMPL(robustloss, CUDA, m)" not in ops:
        raise SystemExit("check_emu: robust_ce_cuda_ops.cpp no longer has the expected shape")
    ops = ops.replace(cuda_includes, '#include "cuda_stubs.h"\n').replace(".is_cuda()", ".is_cpu()")
    # Own library with schemas inferred from the C++ signatures.
    ops = ops.replace("TORCH_LIBRARY_IMPL(robustloss, CUDA, m)", "TORCH_LIBRARY(robustloss_emu, m)").replace("m.impl(", "m.def(")
    # and one op of the emulator's own: the kernels launched so far.
    ops += (
        '\n#include "shim.h"\n\n'
        "int64_t emu_launches() { return emu::launches.load(); }\n"
        'TORCH_LIBRARY_FRAGMENT(robustloss_emu, m) { m.def("emu_launches", &emu_launches); }\n'
    )
    texts["emu_ops.cpp"] = ops

    for name, text in texts.items():
        with open(os.path.join(out_dir, name), "w") as f:
            f.write(text)
    return [os.path.join(out_dir, name) for name in texts if name.endswith(".cpp")]


def cuda_runtime_include() -> str:
    """A folder holding cuda_runtime_api.h (host-only use: types and declarations)."""
    import torch

    candidates = []
    for env in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(env):
            candidates.append(os.path.join(os.environ[env], "include"))
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        candidates.append(os.path.join(os.path.dirname(os.path.dirname(real)), "include"))
        with open(real, "rb") as f:  # a wrapper script naming the real nvcc
            m = re.search(rb"(/[^\s'\"]+)/bin/nvcc\b", f.read(4096))
        if m:
            candidates.append(os.path.join(m.group(1).decode(), "include"))
    candidates += ["/usr/local/cuda/include"] + sorted(glob.glob("/usr/local/cuda-*/include"))
    site = os.path.dirname(os.path.dirname(torch.__file__))  # pip's nvidia-* wheels, last
    candidates += sorted(glob.glob(os.path.join(site, "nvidia", "*", "include")))
    for c in candidates:
        # cuda_runtime_api.h includes crt/host_defines.h, which some wheels leave out.
        if all(os.path.isfile(os.path.join(c, h)) for h in ("cuda_runtime_api.h", "crt/host_defines.h")):
            return c
    raise SystemExit("check_emu: cuda_runtime_api.h not found (install CUDA torch or set CUDA_HOME)")


def build(build_dir: str):
    include = cuda_runtime_include()
    import torch

    # Importing cpp_extension warns that no CUDA runtime (GPU driver) confirms the toolkit it found:
    # true on this machine, and nothing the emulator, which builds host C++ only, needs. Only that
    # import is quieted; the build's own warnings still show.
    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        from torch.utils.cpp_extension import load
    finally:
        log.setLevel(level)

    src_dir = os.path.join(build_dir, "src")
    os.makedirs(src_dir, exist_ok=True)
    sources = generate(src_dir)
    load(
        name="robustloss_emu",
        sources=sources,
        extra_include_paths=[os.path.join(ROOT, "csrc", "include"), CUDA_DIR, HERE, include],
        extra_cflags=["-O1", "-std=c++20"],
        build_directory=build_dir,
        is_python_module=False,
        verbose=False,
    )
    return torch.ops.robustloss_emu


class Checker:
    def __init__(self):
        self.count = 0
        self.failures = []

    def check(self, ok: bool, what: str):
        self.count += 1
        if not ok:
            self.failures.append(what)
            print("FAIL", what, flush=True)


def run_checks(E) -> Checker:
    import torch

    sys.path.insert(0, ROOT)
    from robustloss_fast import reference
    from robustloss_fast._common import Kernel as K
    from robustloss_fast._common import KernelSpec, Reduction
    from robustloss_fast._common import RowCol as RC
    from robustloss_fast._common import StatCol as SC
    from robustloss_fast._finalize import finalize

    # The reference's ops take a KernelSpec; these take the op's positional arguments.
    def spec(kid, a, b, ignore_index=-100, reduction=0, normalize=False):
        return KernelSpec(K(kid), a, b, 1.0, Reduction(reduction), normalize, ignore_index)

    def ref_forward(x, t, kid, a, b, w, sw, ignore_index, reduction, normalize):
        return reference.forward(x, t, spec(kid, a, b, ignore_index, reduction, normalize), w, sw)

    def ref_backward(g, x, t, st, ignore_index, u=None, kernel_id=K.CCE, a=0.0):
        return reference.backward(g, x, t, st, spec(kernel_id, a, 0.0, ignore_index), u)

    def ref_rows(x, t, kid, a, b, ignore_index, normalised, u):
        return reference.rows(x, t, spec(kid, a, b, ignore_index, 1, normalised), u)

    ck = Checker()
    tol = {
        torch.float32: (2e-5, 1e-6),
        torch.float64: (1e-12, 1e-14),
        torch.float16: (2e-3, 1e-5),
        torch.bfloat16: (1.6e-2, 1e-5),
    }

    def close(a, b, dt, what):
        rtol, atol = tol[dt]
        ok = a.shape == b.shape and torch.allclose(a.double(), b.double(), rtol=rtol, atol=atol, equal_nan=True)
        if not ok and a.shape == b.shape:
            what += f" (max abs diff {(a.double() - b.double()).abs().nan_to_num(0, 0, 0).max().item():.3g})"
        ck.check(ok, what)

    def laid_out_case(dt, n, c, offset, pad, with_w, with_sw):
        """(logits, target, weight, sample_weight): rows starting `offset` elements in, `pad` apart beyond C."""
        acc = torch.float64 if dt == torch.float64 else torch.float32
        base = (torch.randn(n, c + offset + pad, generator=gen, dtype=torch.float64) * 3).to(dt)
        logits = base[:, offset:offset + c]
        target = torch.randint(0, c, (n,), generator=gen)
        target[torch.rand(n, generator=gen) < 0.2] = -100
        w = torch.rand(c, generator=gen, dtype=acc) + 0.5 if with_w else None
        sw = torch.randn(n, generator=gen, dtype=acc) if with_sw else None
        return logits, target, w, sw

    def compare_ops(logits, target, kid, a, b, w, sw, reduction, normalize, what):
        """forward, backward and rows + finalize against the reference."""
        acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
        n = logits.shape[0]
        smooth = w if K(kid).weight_in_rows else None  # label smoothing: the class weights are the smoothing weights u
        v, st = E.robust_ce_forward(logits, target, kid, a, b, w, sw, -100, reduction, normalize)
        v_ref, st_ref = ref_forward(logits, target, kid, a, b, w, sw, -100, reduction, normalize)
        valid = target != -100  # lse_nt of ignored rows is unused (-inf here, arbitrary in the reference)
        close(v, v_ref, acc, "value " + what)
        close(st[valid], st_ref[valid], acc, "stats " + what)
        close(st[:, SC.ALPHA :], st_ref[:, SC.ALPHA :], acc, "coefs " + what)
        g = torch.randn(n, generator=gen, dtype=acc) if reduction == 0 else torch.tensor(1.7, dtype=acc)
        gl = E.robust_ce_backward(g, logits, target, st, smooth, -100, kid, a)
        ck.check(gl.dtype == logits.dtype and gl.is_contiguous(), "grad layout " + what)
        g_ref = ref_backward(g, logits, target, st_ref, -100, smooth, kernel_id=kid, a=a)
        close(gl, g_ref, logits.dtype, "grad " + what)
        # The in-place op: the same kernel with out = logits (each thread reads a logit, then writes
        # its gradient there), bit for bit the out-of-place result.
        over = logits.contiguous().clone()
        E.robust_ce_backward_(over, g, target, st, smooth, -100, kid, a)
        ck.check(torch.equal(over.nan_to_num(0.5), gl.nan_to_num(0.5)), "in-place grad " + what)
        normalised = reduction == 1 and normalize
        rows = E.robust_ce_rows(logits, target, kid, a, b, smooth, -100, normalised)
        rows_ref = ref_rows(logits, target, kid, a, b, -100, normalised, smooth)
        if K(kid).two_term:
            # log w = log(2 |gamma|) of a two-term row is informational (no normalisation) and its
            # gamma can cancel to 1e-5 of its terms in float32 (C = 2): compare 2 |gamma| itself.
            rows, rows_ref = rows.clone(), rows_ref.clone()
            rows[:, RC.LOGW], rows_ref[:, RC.LOGW] = rows[:, RC.LOGW].exp(), rows_ref[:, RC.LOGW].exp()
        close(rows[valid], rows_ref[valid], acc, "rows " + what)
        v2, st2 = finalize(rows, target, spec(kid, a, b, -100, reduction, normalize), w, sw)
        close(v2, v_ref, acc, "rows+finalize " + what)
        close(st2[:, SC.ALPHA :], st[:, SC.ALPHA :], acc, "rows+finalize coefs " + what)
        # The cross-row step as its own op (the fused linear's chunks), with log D when normalised.
        v3, st3, log_den = E.robust_ce_finalize(rows, target, w, sw, -100, reduction, normalize, K(kid).weight_in_rows)
        close(v3, v_ref, acc, "finalize op " + what)
        close(st3[:, SC.ALPHA :], st[:, SC.ALPHA :], acc, "finalize op coefs " + what)
        if normalised:
            _, _, log_ref = finalize(rows, target, spec(kid, a, b, -100, reduction, normalize), w, sw,
                                     log_denominator=True)  # fmt: skip
            close(log_den, log_ref, acc, "finalize op log D " + what)
        else:  # written by the kernel (the host no longer zero-fills it): 0 where nothing is normalised
            close(log_den, torch.zeros_like(log_den), acc, "finalize op log D (not normalised) " + what)

    # (kernel id, a, b): every kernel formula, DM's special cases, DMBeta's (1, 1) corner.
    schemes = [(K.CCE, 0.0, 0.0), (K.MAE, 0.0, 0.0), (K.MSE, 0.0, 0.0), (K.GCE, 0.7, 0.0), (K.DM, 1.0, 8.0),
               (K.DM, 0.0, -3.0), (K.DM_NORMAL, 0.5, 4.0), (K.DM_BETA, 2.0, 3.0), (K.DM_BETA, 1.0, 1.0),
               (K.DM, 2.0, 1000.0)]
    modes = [(0, False), (1, True), (1, False), (2, False)]  # (reduction, normalize)
    # Two-term schemes: label smoothing eps = 0.1 (and eps = 0, plain CCE through the two-term
    # path), NCE (1, 0) and APL NCE+RCE (alpha = 1, beta A = 4).
    two_term = [(K.CCE_LS, 0.1, 0.0), (K.CCE_LS, 0.0, 0.0), (K.NCE, 1.0, 0.0), (K.NCE, 1.0, 4.0)]
    # NFL (gamma, b): its own row pass (the focal sums) and backward (P-form stats, h_j per class);
    # gamma = 0 is NCE through the NFL kernels, b = 0.4 adds the passive q term.
    nfl = [(K.NFL, g, b) for g in (0.5, 2.0, 0.0) for b in (0.0, 0.4)]
    # Row lengths that land in each layout (4 lanes, a warp, 128- and 512-thread blocks) per dtype.
    shapes = {
        torch.float32: [(23, 1), (23, 2), (23, 3), (19, 10), (9, 100), (5, 511), (3, 2001), (2, 9001)],
        torch.bfloat16: [(19, 5), (9, 65), (5, 1000), (3, 5000), (2, 17001)],
        torch.float16: [(19, 7), (9, 300), (3, 3001), (2, 16500)],
        torch.float64: [(19, 2), (9, 17), (5, 200), (3, 1025), (2, 4500)],
    }
    gen = torch.Generator().manual_seed(int(os.environ.get("EMU_SEED", "0")))
    k = 0
    for dt, dt_shapes in shapes.items():
        for n, c in dt_shapes:
            for rep in range(2):
                kid, a, b = schemes[k % len(schemes)]
                reduction, normalize = modes[k % len(modes)]
                if abs(b) > 100:  # raw weights overflow by design (SPEC §5): only the normalised mean is comparable
                    reduction, normalize = 1, True
                offset, pad = (k % 3 == 1) * (1 + k % 5), (k % 4 == 2) * 3  # misaligned starts, strided rows
                with_w, with_sw = k % 2 == 0, k % 3 == 0
                k += 1
                what = f"dtype={dt} n={n} c={c} scheme={kid, a, b} reduction={reduction} normalize={normalize} " \
                       f"weight={with_w} sample_weight={with_sw} offset={offset} pad={pad}"
                logits, target, w, sw = laid_out_case(dt, n, c, offset, pad, with_w, with_sw)
                compare_ops(logits, target, kid, a, b, w, sw, reduction, normalize, what)
        print(f"check_emu: {dt} parity done ({ck.count} checks)", flush=True)

    # Two-term schemes (label smoothing, NCE/APL, NFL) in every layout of every dtype: the spread
    # pass and its reduction, class weights inside the rows (label smoothing) or in s_i (NCE,
    # NFL); NFL's lse broadcast to the row's threads and its focal-sum pass.
    k = 0
    for dt, dt_shapes in shapes.items():
        for n, c in dt_shapes:
            for kid, a, b in two_term + nfl:
                reduction = k % 3
                offset, pad = (k % 3 == 1) * (1 + k % 5), (k % 4 == 2) * 3
                with_w, with_sw = k % 2 == 0, k % 5 == 0
                k += 1
                what = f"two-term dtype={dt} n={n} c={c} scheme={kid, a, b} reduction={reduction} " \
                       f"weight={with_w} sample_weight={with_sw} offset={offset} pad={pad}"
                logits, target, w, sw = laid_out_case(dt, n, c, offset, pad, with_w, with_sw)
                compare_ops(logits, target, kid, a, b, w, sw, reduction, False, what)
        print(f"check_emu: {dt} two-term parity done ({ck.count} checks)", flush=True)

    # Every two-term scheme x reduction x weight: a warp layout (fp32) and a block layout (bf16).
    for dt, c in ((torch.float32, 37), (torch.bfloat16, 1500)):
        acc = torch.float32
        logits = (torch.randn(11, c, generator=gen, dtype=torch.float64) * 3).to(dt)
        target = torch.randint(0, c, (11,), generator=gen)
        target[3] = -100
        w = torch.rand(c, generator=gen, dtype=acc) + 0.5
        w[5] = 0.0  # a zero class weight: u_k = 0 in the smoothing sum
        sw = torch.rand(11, generator=gen, dtype=acc) + 0.1
        for kid, a, b in two_term + nfl:
            for reduction in (0, 1, 2):
                for ww, ss in ((None, None), (w, None), (w, sw)):
                    what = f"two-term grid dtype={dt} c={c} scheme={kid, a, b} reduction={reduction} " \
                           f"weight={ww is not None} sample_weight={ss is not None}"
                    compare_ops(logits, target, kid, a, b, ww, ss, reduction, False, what)

    # Label smoothing is F.cross_entropy(label_smoothing=eps), class weights included.
    x = torch.randn(40, 13, generator=gen, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 13, (40,), generator=gen)
    t[::7] = -100
    w = torch.rand(13, generator=gen, dtype=torch.float64) + 0.5
    for ww in (None, w):
        for reduction, name in ((0, "none"), (1, "mean"), (2, "sum")):
            v, st = E.robust_ce_forward(x.detach(), t, K.CCE_LS, 0.1, 0.0, ww, None, -100, reduction, False)
            ref = torch.nn.functional.cross_entropy(x, t, weight=ww, reduction=name, label_smoothing=0.1)
            g = torch.linspace(0.5, 1.5, 40, dtype=torch.float64) if reduction == 0 else torch.tensor(1.0, dtype=torch.float64)
            (g_ref,) = torch.autograd.grad(ref, x, g if reduction == 0 else None)
            gl = E.robust_ce_backward(g, x.detach(), t, st, ww, -100, K.CCE_LS, 0.1)
            what = f"label smoothing vs F.cross_entropy weight={ww is not None} reduction={name}"
            close(v, ref.detach(), torch.float64, "value " + what)
            close(gl, g_ref, torch.float64, "grad " + what)

    # NFL is its definition, L = FL(p) / sum_k FL(P_k) + b q with FL(P) = -(1 - P)^gamma log P:
    # value and gradient against autograd of that formula, in float64.
    x = torch.randn(40, 9, generator=gen, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 9, (40,), generator=gen)
    t[::6] = -100
    sw = torch.rand(40, generator=gen, dtype=torch.float64) + 0.2
    for gamma, b in ((0.5, 0.4), (2.0, 0.0), (0.0, 0.4)):
        P = torch.softmax(x, 1)
        fl = -(1 - P).pow(gamma) * P.log()
        valid = t != -100
        ty = torch.where(valid, t, 0)
        per_row = fl.gather(1, ty[:, None]).squeeze(1) / fl.sum(1) + b * (1 - P.gather(1, ty[:, None]).squeeze(1))
        per_row = torch.where(valid, per_row * sw, 0.0)
        for reduction, ref in ((0, per_row), (1, per_row.sum() / valid.sum()), (2, per_row.sum())):
            v, st = E.robust_ce_forward(x.detach(), t, K.NFL, gamma, b, None, sw, -100, reduction, False)
            g = torch.linspace(0.5, 1.5, 40, dtype=torch.float64) if reduction == 0 else torch.tensor(1.0, dtype=torch.float64)
            (g_ref,) = torch.autograd.grad(ref, x, g if reduction == 0 else None, retain_graph=True)
            gl = E.robust_ce_backward(g, x.detach(), t, st, None, -100, K.NFL, gamma)
            what = f"NFL vs its definition gamma={gamma} b={b} reduction={reduction}"
            close(v, ref.detach(), torch.float64, "value " + what)
            close(gl, g_ref, torch.float64, "grad " + what)

    # Two-term schemes refuse derivative normalisation, in both ops.
    x = torch.randn(4, 5, generator=gen)
    t = torch.randint(0, 5, (4,), generator=gen)
    for kid, a, b in two_term + nfl:
        for op in ("forward", "rows"):
            try:
                if op == "forward":
                    E.robust_ce_forward(x, t, kid, a, b, None, None, -100, 1, True)
                else:
                    E.robust_ce_rows(x, t, kid, a, b, None, -100, True)
                ck.check(False, f"normalize=True accepted for scheme {kid} in {op}")
            except ValueError as e:
                ck.check("normalize" in str(e), f"normalize refusal message: {e}")

    # Batches around the cross-row step's one-launch limit (1024 rows): 1024 in one block of 1024
    # threads, one row each; 1025 in two launches (5 chunks of 205 rows); 9000 in two
    # launches (36 chunks of 250); 70000 at the 256-partial cap (chunks of 274 rows, more rows than
    # threads per chunk).
    for n in (1024, 1025, 9000, 70000):
        x = (torch.randn(n, 3, generator=gen) * 4).to(torch.float32)
        t = torch.randint(0, 3, (n,), generator=gen)
        t[torch.rand(n, generator=gen) < 0.1] = -100
        w = torch.rand(3, generator=gen) + 0.5
        sw = torch.randn(n, generator=gen)
        cases = list(zip([(K.DM, 1.0, 30.0), (K.CCE, 0.0, 0.0), (K.MSE, 0.0, 0.0)], modes[1:]))
        cases += [((K.CCE_LS, 0.1, 0.0), (1, False)), ((K.NCE, 1.0, 4.0), (2, False))]  # weight in the rows / in s_i
        cases += [((K.NFL, 0.5, 0.4), (1, False)), ((K.NFL, 2.0, 0.0), (0, False))]
        for (kid, a, b), (reduction, normalize) in cases:
            before = E.emu_launches()
            v, st = E.robust_ce_forward(x, t, kid, a, b, w, sw, -100, reduction, normalize)
            launches = E.emu_launches() - before
            v_ref, st_ref = ref_forward(x, t, kid, a, b, w, sw, -100, reduction, normalize)
            what = f"n={n} scheme={kid, a, b} reduction={reduction} normalize={normalize}"
            # The row pass, then the cross-row step: one launch up to 1024 rows, else two ("none": one).
            ck.check(launches == (2 if n <= ONE_BLOCK_MAX_ROWS or reduction == 0 else 3),
                     f"{launches} launches: forward {what}")
            close(v, v_ref, torch.float32, "value " + what)
            close(st[:, SC.ALPHA :], st_ref[:, SC.ALPHA :], torch.float32, "coefs " + what)

    # The cross-row op on edge rows (tests/_cases.py cross_row_rows: w = 0, m = -inf, an exp that
    # underflows, an infinity rescaled by 0, a NaN row), ignored rows and a row that does not count,
    # NaN weights ("nan_sw": a NaN sample weight where every row that counts has w = 0; "nan_cw": a
    # NaN class weight) and infinite ones ("inf_sw", "inf_cw"), on both paths of finalize.cu: one
    # launch, and partials + apply (EMU_ONE_BLOCK_MAX_ROWS=0; 700 rows make 3 chunks), against
    # _finalize.finalize in float64 on the same rows.
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from _cases import cross_row_rows

    finalize_cases = [(K.DM, 1, True), (K.DM, 1, False), (K.DM, 2, False), (K.DM, 0, False), (K.CCE_LS, 1, False)]
    edge_batches = [(1, None), (29, "edges"), (700, "edges"), (700, "inf"), (1024, "inf"), (2100, "inf"), (300, "nan"),
                    (29, "nan_sw"), (700, "nan_sw"), (29, "nan_cw"), (700, "nan_cw"), (29, "inf_sw"), (700, "inf_sw"),
                    (700, "inf_cw")]  # fmt: skip
    for limit in (None, "0"):
        if limit is not None:
            os.environ["EMU_ONE_BLOCK_MAX_ROWS"] = limit
        for n, special in edge_batches:
            for dt in (torch.float32, torch.float64):
                rows, target = cross_row_rows(n, dt, "cpu", special if special in ("edges", "inf", "nan") else None, gen)
                w = torch.rand(7, generator=gen, dtype=dt) + 0.5
                sw = torch.rand(n, generator=gen, dtype=dt) + 0.5
                if n > 6:
                    sw[6] = 0.0  # counts nowhere
                if special == "nan_sw":
                    rows[:, RC.LOGW] = -math.inf
                    target[-1] = 1
                    sw[-1] = math.nan
                if special == "nan_cw":
                    target[-1] = 1
                    w[1] = math.nan
                if special in ("inf_sw", "inf_cw"):  # D = inf: the other rows' coefficients 0, its own NaN
                    rows[:, RC.LOGW] /= 30  # within a few nats, as DM's: no inf x (an exp that underflows)
                    target[n // 2] = 1
                    if special == "inf_sw":
                        sw[n // 2] = math.inf
                    else:
                        w[1] = math.inf
                f64 = [rows.double(), w.double(), sw.double()]
                for kid, reduction, normalize in finalize_cases:
                    normalised = reduction == 1 and normalize
                    what = f"finalize edges n={n} {special} {dt} one-launch limit={limit or 'default'} " \
                           f"scheme={kid} reduction={reduction} normalize={normalize}"
                    before = E.emu_launches()
                    got = E.robust_ce_finalize(rows, target, w, sw, -100, reduction, normalize, K(kid).weight_in_rows)
                    launches = E.emu_launches() - before
                    two = (limit == "0" or n > ONE_BLOCK_MAX_ROWS) and reduction != 0
                    ck.check(launches == (2 if two else 1), f"{launches} launches: {what}")
                    want = finalize(f64[0], target, spec(kid, 1.0, 8.0, -100, reduction, normalize), f64[1], f64[2],
                                    log_denominator=normalised)  # fmt: skip
                    for name, g, w_ in zip(("value", "stats", "log D"), got, want):
                        close(g, w_, dt, f"{name} {what}")
        os.environ.pop("EMU_ONE_BLOCK_MAX_ROWS", None)

    # Bad targets: a device-side assertion in every layout (the emulator raises it after the
    # launch; the kernels read nothing out of bounds meanwhile); backward leaves NaN rows.
    def asserts_bad_target(call, what):
        try:
            call()
            ck.check(False, f"bad target raised nothing: {what}")
        except RuntimeError as e:
            ck.check("device-side assertion" in str(e) and "target out of bounds" in str(e), f"{what}: {e}")

    for c in (3, 100, 3000, 20000):
        for bad in (c, -1, 10**12):
            x = torch.randn(6, c, generator=gen)
            t = torch.randint(0, c, (6,), generator=gen)
            t[4], t[5] = bad, c + 7
            asserts_bad_target(lambda: E.robust_ce_forward(x, t, K.CCE, 0.0, 0.0, None, None, -100, 1, False),
                               f"forward, bad target {bad}, c={c}")  # fmt: skip
            asserts_bad_target(lambda: E.robust_ce_rows(x, t, K.CCE, 0.0, 0.0, None, -100, False),
                               f"rows, bad target {bad}, c={c}")  # fmt: skip
            st = torch.zeros(6, len(SC))
            st[:, SC.M] = torch.logsumexp(x, 1)  # NFL's P_j = exp((z_j - m) - ls) of a good row are at most 1
            for u, kid, a in ((None, K.CCE, 0.0), (torch.ones(c), K.CCE_LS, 0.1), (None, K.NFL, 0.5)):
                gl = E.robust_ce_backward(torch.ones(()), x, t, st, u, -100, kid, a)
                ck.check(bool(torch.isnan(gl[4:]).all() and torch.isfinite(gl[:4]).all()),
                         f"backward bad rows c={c} scheme={kid}")  # fmt: skip
        for kid, a, b, w in ((K.CCE_LS, 0.1, 0.0, torch.rand(c, generator=gen)), (K.NFL, 0.5, 0.4, None)):
            # The two-term passes assert too.
            asserts_bad_target(lambda: E.robust_ce_forward(x, t, kid, a, b, w, None, -100, 1, False),
                               f"forward of scheme {kid}, c={c}")  # fmt: skip

    for dt in (torch.float32, torch.bfloat16, torch.float64):
        acc = torch.float64 if dt == torch.float64 else torch.float32
        # C = 1: no non-target class, G = 0 (label smoothing and NCE too: p = 1, Lambda = 0).
        x = torch.randn(5, 1, generator=gen).to(dt)
        t = torch.zeros(5, dtype=torch.long)
        for reduction, normalize in modes:
            v, st = E.robust_ce_forward(x, t, K.DM, 1.0, 8.0, None, None, -100, reduction, normalize)
            v_ref, _ = ref_forward(x, t, K.DM, 1.0, 8.0, None, None, -100, reduction, normalize)
            close(v, v_ref, acc, f"C=1 value {dt} {reduction} {normalize}")
            gl = E.robust_ce_backward(torch.ones(()).to(acc), x, t, st, None, -100, K.DM, 1.0)
            ck.check(bool((gl == 0).all()), f"C=1 grad {dt}")
        for kid, a, b in two_term + nfl:
            for reduction in (0, 1, 2):
                w1 = torch.full((1,), 0.7, dtype=acc)
                compare_ops(x, t, kid, a, b, w1, None, reduction, False, f"C=1 two-term {dt} {kid, a, b} {reduction}")
        # Every row ignored, and the empty batch: value 0, gradient 0.
        x = torch.randn(4, 7, generator=gen).to(dt)
        t = torch.full((4,), -100)
        cases = [(K.DM, 1.0, 8.0)] * 4 + two_term[:3] + [(K.NFL, 0.5, 0.4), (K.NFL, 2.0, 0.0), (K.NFL, 0.0, 0.4)]
        for (kid, a, b), (reduction, normalize) in zip(cases, modes + [(0, False), (1, False), (2, False)] * 2):
            w = torch.rand(7, generator=gen, dtype=acc) + 0.5
            v, st = E.robust_ce_forward(x, t, kid, a, b, w, None, -100, reduction, normalize)
            u = w if K(kid).weight_in_rows else None
            gl = E.robust_ce_backward(torch.ones(()).to(acc), x, t, st, u, -100, kid, a)
            ck.check(bool((v == 0).all() and (gl == 0).all() and (st[:, SC.ALPHA :] == 0).all()), f"all ignored {dt} {kid}")
        x = torch.randn(0, 7).to(dt)
        t = torch.zeros(0, dtype=torch.long)
        for reduction, normalize in modes:
            v, st = E.robust_ce_forward(x, t, K.DM, 1.0, 8.0, None, None, -100, reduction, normalize)
            ok = v.shape == ((0,) if reduction == 0 else ()) and (reduction == 0 or v.item() == 0) and st.shape == (0, len(SC))
            ck.check(ok and E.robust_ce_backward(torch.ones(()).to(acc), x, t, st, None, -100, K.DM, 1.0).shape == (0, 7),
                     "empty")  # fmt: skip
            ck.check(E.robust_ce_backward(torch.ones(()).to(acc), x, t, st, None, -100, K.NFL, 0.5).shape == (0, 7),
                     "empty (NFL)")  # fmt: skip
        ck.check(E.robust_ce_rows(x, t, K.DM, 1.0, 8.0, None, -100, False).shape == (0, len(RC)), "empty rows")
        ck.check(E.robust_ce_rows(x, t, K.CCE_LS, 0.1, 0.0, torch.ones(7, dtype=acc), -100, False).shape == (0, len(RC)),
                 "empty rows (two-term)")
        ck.check(E.robust_ce_rows(x, t, K.NFL, 0.5, 0.4, None, -100, False).shape == (0, len(RC)), "empty rows (NFL)")
        # ignore_index inside [0, C).
        x = torch.randn(9, 6, generator=gen).to(dt)
        t = torch.randint(0, 6, (9,), generator=gen)
        t[:3] = 2
        v, st = E.robust_ce_forward(x, t, K.CCE, 0.0, 0.0, None, None, 2, 1, False)
        v_ref, st_ref = ref_forward(x, t, K.CCE, 0.0, 0.0, None, None, 2, 1, False)
        close(v, v_ref, acc, f"ignore_index in range {dt}")
        close(E.robust_ce_backward(torch.ones(()).to(acc), x, t, st, None, 2, K.CCE, 0.0),
              ref_backward(torch.ones(()).to(acc), x, t, st_ref, 2), dt, f"ignore_index in range grad {dt}")
        v, st = E.robust_ce_forward(x, t, K.NFL, 0.5, 0.4, None, None, 2, 1, False)
        v_ref, st_ref = ref_forward(x, t, K.NFL, 0.5, 0.4, None, None, 2, 1, False)
        close(v, v_ref, acc, f"NFL ignore_index in range {dt}")
        close(E.robust_ce_backward(torch.ones(()).to(acc), x, t, st, None, 2, K.NFL, 0.5),
              ref_backward(torch.ones(()).to(acc), x, t, st_ref, 2, kernel_id=K.NFL, a=0.5), dt,
              f"NFL ignore_index in range grad {dt}")  # fmt: skip

    # -inf masks (legal), a row masked but for its target (G = 0), NaN / +inf rows (NaN, that row only).
    for dt in (torch.float32, torch.bfloat16):
        for c in (6, 300, 3000, 20000):
            x = torch.randn(6, c, generator=gen).to(dt)
            t = torch.randint(0, c, (6,), generator=gen)
            x[0, : c // 2] = -math.inf
            x[0, t[0]] = 1.0
            x[1] = -math.inf
            x[1, t[1]] = 0.5
            x[2, (t[2] + 1) % c] = math.nan
            x[3, (t[3] + 1) % c] = math.inf
            x[4, t[4]] = math.inf
            v, st = E.robust_ce_forward(x, t, K.CCE, 0.0, 0.0, None, None, -100, 0, False)
            v_ref, st_ref = ref_forward(x, t, K.CCE, 0.0, 0.0, None, None, -100, 0, False)
            close(v, v_ref, torch.float32, f"masked/NaN rows value c={c} {dt}")
            ck.check(bool(torch.isnan(v[2:5]).all() and torch.isfinite(v[[0, 1, 5]]).all()), f"NaN rows only c={c}")
            gl = E.robust_ce_backward(torch.ones(6), x, t, st, None, -100, K.CCE, 0.0)
            close(gl, ref_backward(torch.ones(6), x, t, st_ref, -100), dt, f"masked/NaN rows grad c={c} {dt}")
            ck.check(bool((gl[1] == 0).all()), "fully masked row has zero gradient")
            # Two-term: a masked class makes Lambda infinite (NCE 0) unless its smoothing weight is 0;
            # a row masked but for its target (lse_nt = -inf) keeps its beta u term.
            w = torch.rand(c, generator=gen) + 0.5
            w[: c // 2] = 0.0  # row 0's masked classes: Lambda stays finite for label smoothing
            w[t[2:5]] = 1.0  # NaN rows keep s != 0 (with s = 0 the reference leaves 0 at the target)
            # NFL: a masked class has F = inf, so S = inf (NFL 0, its gradient the b q term alone).
            for kid, a, b in two_term + nfl:
                for ww in (None, w):
                    compare_ops(x, t, kid, a, b, ww, None, 0, False, f"masked/NaN rows c={c} {dt} {kid, a, b} "
                                f"weight={ww is not None}")

    # |beta| = 1000 with derivative normalisation: finite in every dtype, sum of |coef| is 1/2.
    for dt in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        x = (torch.randn(64, 50, generator=gen) * 5).to(dt)
        t = torch.randint(0, 50, (64,), generator=gen)
        for beta in (1000.0, -1000.0):
            v, st = E.robust_ce_forward(x, t, K.DM, 1.0, beta, None, None, -100, 1, True)
            v_ref, _ = ref_forward(x, t, K.DM, 1.0, beta, None, None, -100, 1, True)
            gl = E.robust_ce_backward(torch.ones(()).to(st.dtype), x, t, st, None, -100, K.DM, 1.0)
            ck.check(bool(torch.isfinite(v) and torch.isfinite(gl.float()).all()), f"beta={beta} finite {dt}")
            ck.check(abs(v.item() - v_ref.item()) <= 1e-3 * abs(v_ref.item()) + 1e-6, f"beta={beta} value {dt}")
            ck.check(abs(2 * st[:, SC.ALPHA].abs().sum().item() - 1) < 1e-3, f"beta={beta} sum |coef| = 1/2 {dt}")

    # Bitwise determinism of repeated calls.
    x = torch.randn(50, 3001, generator=gen)
    t = torch.randint(0, 3001, (50,), generator=gen)
    r1 = E.robust_ce_forward(x, t, K.DM, 1.0, 8.0, None, None, -100, 1, True)
    r2 = E.robust_ce_forward(x, t, K.DM, 1.0, 8.0, None, None, -100, 1, True)
    ck.check(torch.equal(r1[0], r2[0]) and torch.equal(r1[1], r2[1]), "bitwise repeat")
    w = torch.rand(3001, generator=gen) + 0.5
    r1 = E.robust_ce_forward(x, t, K.CCE_LS, 0.1, 0.0, w, None, -100, 1, False)
    r2 = E.robust_ce_forward(x, t, K.CCE_LS, 0.1, 0.0, w, None, -100, 1, False)
    g1 = E.robust_ce_backward(torch.ones(()), x, t, r1[1], w, -100, K.CCE_LS, 0.1)
    g2 = E.robust_ce_backward(torch.ones(()), x, t, r2[1], w, -100, K.CCE_LS, 0.1)
    ck.check(torch.equal(r1[0], r2[0]) and torch.equal(r1[1], r2[1]) and torch.equal(g1, g2), "bitwise repeat (two-term)")
    r1 = E.robust_ce_forward(x, t, K.NFL, 0.5, 0.4, w, None, -100, 1, False)
    r2 = E.robust_ce_forward(x, t, K.NFL, 0.5, 0.4, w, None, -100, 1, False)
    g1 = E.robust_ce_backward(torch.ones(()), x, t, r1[1], None, -100, K.NFL, 0.5)
    g2 = E.robust_ce_backward(torch.ones(()), x, t, r2[1], None, -100, K.NFL, 0.5)
    ck.check(torch.equal(r1[0], r2[0]) and torch.equal(r1[1], r2[1]) and torch.equal(g1, g2), "bitwise repeat (NFL)")
    return ck


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--build-dir", default=None, help="where to build the emulator (default: a temp dir)")
    args = parser.parse_args()
    os.environ.setdefault("EMU_MAX_GRID", "2")
    build_dir = args.build_dir or tempfile.mkdtemp(prefix="robustloss_emu_")
    E = build(build_dir)
    ck = run_checks(E)
    print(f"check_emu: {ck.count} checks, {len(ck.failures)} failures")
    return 1 if ck.failures else 0


if __name__ == "__main__":
    sys.exit(main())
