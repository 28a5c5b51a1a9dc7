"""Build the robustloss_fast._C extension.

The CPU kernel is compiled once per instruction set (DEFAULT, AVX2, AVX512),
each translation unit with its own flags, and the fastest one the running CPU
supports is chosen at load time (csrc/cpu/dispatch.cpp), as ATen does for its
own kernels. CUDA sources are added when torch has CUDA and nvcc is found
(see ``_cuda_setup``).
"""

import glob
import os
import platform
import re
import shutil

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))

# Per-file flags for the CPU capability variants (file name suffix -> flags).
CAPABILITY_FLAGS = {
    "_avx2.cpp": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
    "_avx512.cpp": [
        "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
        "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512",
    ],
    "_default.cpp": ["-DCPU_CAPABILITY=DEFAULT"],
}


def _cuda_home_from_nvcc():
    """The toolkit folder behind the nvcc on PATH.

    torch guesses CUDA_HOME as dirname(dirname(which nvcc)); when nvcc is a
    wrapper script (as on our CI machines) that guess is wrong, so read the
    real binary's path out of the wrapper."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    real = os.path.realpath(nvcc)
    try:
        with open(real, "rb") as f:
            head = f.read(4096)
    except OSError:
        return None
    if not head.startswith(b"#!"):
        return os.path.dirname(os.path.dirname(real))
    match = re.search(rb"(/[^\s'\"]+)/bin/nvcc\b", head)
    return match.group(1).decode() if match else None


def _cuda_setup():
    """Whether to build CUDA sources (decided before torch's cpp_extension is imported)."""
    if os.environ.get("ROBUSTLOSS_NO_CUDA") == "1":
        return False
    import torch

    if torch.version.cuda is None:
        return False
    if "CUDA_HOME" not in os.environ and "CUDA_PATH" not in os.environ:
        home = _cuda_home_from_nvcc()
        if home is None:
            return False
        os.environ["CUDA_HOME"] = home
    return bool(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))


def _nvidia_wheel_includes():
    """Header folders of the nvidia-* wheels that pip's CUDA torch depends on.

    cuSPARSE, cuBLAS, ... headers (included by ATen's CUDA headers) live there,
    not in a bare toolkit (our CI's nvcc has none). They are searched after the
    toolkit's own include folder, so they only fill gaps."""
    import torch

    base = os.path.join(os.path.dirname(os.path.dirname(torch.__file__)), "nvidia")
    found = sorted(glob.glob(os.path.join(base, "cu*", "include"))) + sorted(glob.glob(os.path.join(base, "*", "include")))
    return list(dict.fromkeys(found))


WITH_CUDA = _cuda_setup()

from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


class Build(BuildExtension):
    """BuildExtension with per-source flags for the CPU capability variants."""

    def __init__(self, *args, **kwargs):
        kwargs["use_ninja"] = False  # ninja would apply one set of flags to every file
        super().__init__(*args, **kwargs)

    def build_extension(self, ext):
        compile_one = self.compiler._compile

        def with_capability_flags(obj, src, ext_, cc_args, extra_postargs, pp_opts):
            for suffix, flags in CAPABILITY_FLAGS.items():
                if src.endswith(suffix):
                    if isinstance(extra_postargs, dict):
                        extra_postargs = dict(extra_postargs, cxx=list(extra_postargs["cxx"]) + flags)
                    else:
                        extra_postargs = list(extra_postargs) + flags
            return compile_one(obj, src, ext_, cc_args, extra_postargs, pp_opts)

        self.compiler._compile = with_capability_flags
        try:
            super().build_extension(ext)
        finally:
            self.compiler._compile = compile_one


def extensions():
    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    macros = []
    if platform.machine().lower() in ("x86_64", "amd64"):
        macros.append(("ROBUSTLOSS_X86_VARIANTS", "1"))
    else:  # the AVX variants only build for x86
        sources = [s for s in sources if not s.endswith(("_avx2.cpp", "_avx512.cpp"))]
    # Every object built without ISA flags links before the AVX2/AVX512 ones:
    # where an inline function of a shared header is emitted in several objects
    # the linker keeps the first copy, which must be the portable one.
    sources.sort(key=lambda s: (s.endswith(("_avx2.cpp", "_avx512.cpp")), s))
    cxx = ["-O3", "-fopenmp", "-DNDEBUG"]
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    # Headers are listed so that editing one rebuilds the sources (setuptools
    # otherwise compares only the .cpp/.cu timestamps).
    depends = sorted(glob.glob("csrc/**/*.h", recursive=True)) + sorted(glob.glob("csrc/**/*.cuh", recursive=True))
    if WITH_CUDA:
        sources += sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
        nvcc = ["-O3", "-DNDEBUG", "--use_fast_math" if os.environ.get("ROBUSTLOSS_FAST_MATH") else "-Xptxas=-O3"]
        if "TORCH_CUDA_ARCH_LIST" not in os.environ:
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
        ext = CUDAExtension(
            "robustloss_fast._C",
            sources,
            include_dirs=include_dirs,
            depends=depends,
            define_macros=macros + [("ROBUSTLOSS_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=["-fopenmp"],
        )
        # Appended after the toolkit's include folder (CUDAExtension put it in).
        ext.include_dirs += [d for d in _nvidia_wheel_includes() if d not in ext.include_dirs]
        return [ext]
    return [
        CppExtension(
            "robustloss_fast._C",
            sources,
            include_dirs=include_dirs,
            depends=depends,
            define_macros=macros,
            extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"],
        )
    ]


setup(
    packages=find_packages(include=["robustloss_fast", "robustloss_fast.*"]),
    ext_modules=extensions(),
    cmdclass={"build_ext": Build},
)
