"""Instructions per logit in the GPU kernels' hot loops, read from their SASS (no GPU needed).

At 16384 x 128256 bf16 a pass over the logits moves 4.2 GB in about 1 ms on
an H200, while the card issues about 1e12 warp instructions per second: a
loop that spends more than ~16 instructions per logit (half of that for the
read-only row pass) is bound by instructions, not bytes. This script compiles
the kernels for sm_90 and counts what their loops hold:

* CUDA: ``nvcc -cubin`` of csrc/cuda/rows.cu and backward.cu, then
  ``cuobjdump -sass``; for each kernel (bf16, 512 threads per row, the
  one-term instantiation) the loop that holds four 16-byte loads, i.e. 32
  logits per thread per iteration.
* Triton: ``triton.compile`` of rows_kernel and backward_kernel at the tiles
  ops.py takes for 16384 x 128256 bf16 (pointers and n_cols marked divisible
  by 16, as the JIT marks them at run time), and Liger-Kernel's CE kernel when
  ``--liger`` names its unpacked wheel (or it is importable).

The counts are static: every instruction of the loop body, including those
of a branch most iterations skip (our target's patch), so they bound what
each logit costs from above. The cuobjdump that ships with Triton reads the
cubins.

    python benchmarks/sass_counts.py [--liger DIR] [--out benchmarks/results/sass_counts.json]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?);")
BRANCH = re.compile(r"BRA (?:`\(.*?\) )?0x([0-9a-f]+)")


def opcode(ins: str) -> str:
    parts = ins.split()
    return (parts[1] if parts[0].startswith("@") else parts[0]).split(".")[0]


def functions(sass: str) -> dict:
    """{function name: [(address, instruction)]} of a cuobjdump listing."""
    out = {}
    for chunk in re.split(r"\n\s*Function : ", sass)[1:]:
        name = chunk.split("\n", 1)[0].strip()
        out[name] = [(int(m.group(1), 16), m.group(2).strip()) for m in LINE.finditer(chunk)]
    return out


def opcode_counts(body: list) -> dict:
    return dict(collections.Counter(opcode(t) for t in body).most_common())


def wide_loads(body: list) -> int:
    """The 16-byte global loads among `body`'s instructions."""
    return sum(1 for t in body if opcode(t) == "LDG" and ".128" in t)


def loops(ins: list) -> list:
    """Every backward branch's body, innermost first: [(start, end, instructions)]."""
    found = []
    for addr, text in ins:
        m = BRANCH.search(text)
        if m and int(m.group(1), 16) < addr:
            lo = int(m.group(1), 16)
            found.append((lo, addr, [t for a, t in ins if lo <= a <= addr]))
    return sorted(found, key=lambda f: len(f[2]))


def hot_loop(ins: list, loads: int, wide: bool) -> dict:
    """The smallest loop holding at least `loads` global loads (16-byte ones when `wide`), with its opcode counts.

    (At least: a loop may hold two predicated copies of its loads, both issued.)"""
    for lo, hi, body in loops(ins):
        n = wide_loads(body) if wide else sum(1 for t in body if opcode(t) == "LDG" and ".128" not in t)
        if n >= loads:
            return {"start": hex(lo), "end": hex(hi), "instructions": len(body), "opcodes": opcode_counts(body)}
    return {}


def cuobjdump() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def sass_of_cubin(path: str) -> str:
    return subprocess.run([cuobjdump(), "-sass", path], check=True, capture_output=True, text=True).stdout


def torch_cuda_include() -> str:
    """A torch include folder with the CUDA headers: this torch's, or the CUDA torch of .ci/cuda_build_check.sh."""
    import glob

    from torch.utils.cpp_extension import include_paths

    here = include_paths()[0]
    if os.path.exists(os.path.join(here, "c10", "cuda", "impl", "cuda_cmake_macros.h")):
        return here
    venv = os.environ.get("CUDA_VENV", os.path.join(os.environ.get("TMPDIR", "/tmp"), "robustloss-cuda-venv"))
    found = glob.glob(os.path.join(venv, "lib", "python3*", "site-packages", "torch", "include"))
    if not found:
        raise SystemExit("sass_counts: this torch has no CUDA headers; run .ci/cuda_build_check.sh once "
                         "(it makes the CUDA torch venv) or set CUDA_VENV")
    return found[0]


def cuda_counts(tmp: str) -> dict:
    """The CUDA row pass and backward, bf16, 512 threads per row, one-term schemes."""
    import sysconfig

    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS  # what torch's CUDAExtension adds to setup.py's build

    flags = ["-cubin", "-arch=sm_90", "-O3", "-std=c++17", "-DNDEBUG", *COMMON_NVCC_FLAGS,
             "-I", os.path.join(ROOT, "csrc", "include"), "-I", sysconfig.get_paths()["include"]]
    inc = torch_cuda_include()
    flags += ["-I", inc, "-I", os.path.join(inc, "torch", "csrc", "api", "include")]
    wanted = {"rows.cu": ("rows_kernelIN3c108BFloat16ELi512ELi512ELi0E", 4),
              "backward.cu": ("backward_kernelIN3c108BFloat16ELi512ELi512ELb0E", 4)}
    out = {}
    for name, (mangled, loads) in wanted.items():
        cubin = os.path.join(tmp, name + ".cubin")
        subprocess.run(["nvcc", *flags, "-o", cubin, os.path.join(ROOT, "csrc", "cuda", name)], check=True)
        fn = next(v for k, v in functions(sass_of_cubin(cubin)).items() if mangled in k)
        loop = hot_loop(fn, loads, wide=True)
        loop["logits_per_iteration"] = loads * 8  # bf16: 8 per 16-byte pack
        out[name] = loop
    return out


def triton_sass(fn, signature: dict, constexprs: dict, num_warps: int, divisible: list, tmp: str, name: str) -> list:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = list(signature)
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in divisible}
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    path = os.path.join(tmp, name + ".cubin")
    with open(path, "wb") as f:
        f.write(compiled.asm["cubin"])
    return next(iter(functions(sass_of_cubin(path)).values()))


def triton_counts(tmp: str, liger_dir: str | None) -> dict:
    sys.path.insert(0, ROOT)
    from robustloss_fast._common import Kernel
    from robustloss_fast.backends.triton import kernels, ops

    _, block_c, warps = ops._rows_tile(16384, 128256)  # the row pass's widest tile, one row per program
    rows_sig = {"logits_ptr": "*bf16", "target_ptr": "*i64", "u_ptr": "*fp32", "rows_ptr": "*fp32", "n_rows": "i32",
                "n_cols": "i32", "stride_row": "i32", "ignore_index": "i32", "a_hi": "fp32", "a_lo": "fp32",
                "b_hi": "fp32", "b_lo": "fp32", "SCHEME": "constexpr", "SPREAD": "constexpr", "P_FORM": "constexpr",
                "NORMALISED": "constexpr", "HAS_U": "constexpr", "BLOCK_N": "constexpr", "BLOCK_C": "constexpr"}
    rows_const = {"SCHEME": int(Kernel.DM), "SPREAD": False, "P_FORM": False, "NORMALISED": True, "HAS_U": False,
                  "BLOCK_N": 1, "BLOCK_C": block_c}
    per_thread = block_c // (32 * warps)
    fn = triton_sass(kernels.rows_kernel, rows_sig, rows_const, warps,
                     ["logits_ptr", "target_ptr", "u_ptr", "rows_ptr", "n_cols", "stride_row"], tmp, "t_rows")
    out = {"rows_kernel": dict(hot_loop(fn, per_thread * 2 // 16, wide=True), logits_per_iteration=per_thread)}

    _, bw_c, bw_warps = ops._backward_tile(16384, 128256)
    bw_sig = {"grad_ptr": "*fp32", "grad_stride": "i32", "logits_ptr": "*bf16", "target_ptr": "*i64",
              "stats_ptr": "*fp32", "u_ptr": "*fp32", "out_ptr": "*bf16", "n_rows": "i32", "n_cols": "i32",
              "stride_row": "i32", "ignore_index": "i32", "a_hi": "fp32", "a_lo": "fp32", "P_FORM": "constexpr",
              "HAS_U": "constexpr", "BLOCK_N": "constexpr", "BLOCK_C": "constexpr"}
    fn = triton_sass(kernels.backward_kernel, bw_sig, {"P_FORM": False, "HAS_U": False, "BLOCK_N": 1, "BLOCK_C": bw_c},
                     bw_warps, ["grad_ptr", "logits_ptr", "target_ptr", "stats_ptr", "u_ptr", "out_ptr", "n_cols",
                                "stride_row"], tmp, "t_backward")
    # One tile per program, no loop: the whole kernel, prologue included.
    out["backward_kernel"] = {"instructions": len(fn), "logits_per_iteration": bw_c // (32 * bw_warps),
                              "opcodes": opcode_counts([t for _, t in fn])}

    if liger_dir:
        sys.path.insert(0, liger_dir)
    try:
        from liger_kernel.ops.cross_entropy import liger_cross_entropy_kernel
    except ImportError:
        return out
    sig = {"X_ptr": "*bf16", "X_stride": "i64", "Y_ptr": "*i64", "Y_stride": "i64", "weight_ptr": "*fp32",
           "loss_ptr": "*fp32", "z_loss_ptr": "*fp32", "loss_stride": "i64", "token_accuracy_ptr": "*fp32",
           "token_accuracy_stride": "i64", "predicted_tokens_ptr": "*i64", "predicted_tokens_stride": "i64",
           "n_cols": "i32", "n_non_ignore": "fp32", "sum_non_ignore_weight": "fp32", "weight_sum": "fp32",
           "ignore_index": "i32", "lse_square_scale": "constexpr", "label_smoothing": "constexpr",
           "reduction": "constexpr", "softcap": "fp32", "RETURN_Z_LOSS": "constexpr",
           "RETURN_TOKEN_ACCURACY": "constexpr", "RETURN_PREDICTED_TOKENS": "constexpr", "BLOCK_SIZE": "constexpr",
           "HAS_WEIGHT": "constexpr", "HAS_SOFTCAPPING": "constexpr", "HAS_GRADIENTS": "constexpr"}
    const = {"lse_square_scale": 0.0, "label_smoothing": 0.0, "reduction": "mean", "RETURN_Z_LOSS": False,
             "RETURN_TOKEN_ACCURACY": False, "RETURN_PREDICTED_TOKENS": False, "BLOCK_SIZE": 32768,
             "HAS_WEIGHT": False, "HAS_SOFTCAPPING": False, "HAS_GRADIENTS": True}
    fn = triton_sass(liger_cross_entropy_kernel, sig, const, 32, ["X_ptr", "X_stride", "Y_ptr", "loss_ptr", "n_cols"],
                     tmp, "liger")
    # Its two passes over the row are two loops of 32 logits per thread (4 x 16-byte loads each).
    passes = [body for _, _, body in loops(fn) if wide_loads(body) == 4]
    for label, body in zip(("liger forward pass", "liger gradient pass"), passes[:2]):
        out[label] = {"instructions": len(body), "logits_per_iteration": 32, "opcodes": opcode_counts(body)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--liger", help="folder holding liger_kernel (an unpacked wheel)")
    ap.add_argument("--out", help="write the counts as JSON here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result = {"arch": "sm_90", "cuda": cuda_counts(tmp), "triton": triton_counts(tmp, args.liger)}
    print("| kernel | loop instructions | logits per thread | per logit | MUFU | global loads |")
    print("|---|---|---|---|---|---|")
    for backend in ("cuda", "triton"):
        for name, rec in result[backend].items():
            if not rec:
                print(f"| {backend} {name} | loop not found | | | | |")
                continue
            per = rec["instructions"] / rec["logits_per_iteration"]
            rec["per_logit"] = round(per, 2)
            ops_ = rec["opcodes"]
            print(f"| {backend} {name} | {rec['instructions']} | {rec['logits_per_iteration']} | {per:.1f} "
                  f"| {ops_.get('MUFU', 0)} | {ops_.get('LDG', 0)} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
