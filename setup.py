"""Build the robustloss_fast._C extension.

The CPU kernel is compiled once per instruction set (DEFAULT, AVX2, AVX512),
each translation unit with its own flags, and the fastest one the running CPU
supports is chosen at load time (csrc/cpu/dispatch.cpp), as ATen does for its
own kernels. CUDA sources are added when torch has CUDA and nvcc is found
(see ``_cuda_setup``). The translation units compile in parallel (``MAX_JOBS``
processes, default: every CPU this process may use; see ``Build``), and the
linked library is checked for a private copy of the C++ runtime (see
``RUNTIME_LINK_ARGS``).
"""

import glob
import logging
import os
import platform
import re
import shutil
import struct
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor, as_completed

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


# The extension must use the C++ runtime (libstdc++: __cxa_throw, the
# personality routine, iostream locales) and the unwinder (libgcc_s) that
# torch's libraries use: one copy of each in the process. A toolchain that
# links them into shared libraries statically (-static-libstdc++ and
# -static-libgcc in its specs or a wrapper, or a GCC built without shared
# runtimes) gives the extension private copies, and an error then unwinds
# through frames of both. Made to do so, Debian's g++ 11 and 12 gave a build
# whose TORCH_CHECK in the autograd backward aborted in the private
# _Unwind_SetGR (that copy had never run an unwind), and whose messages lost
# their numbers ("target value " without the value: the private ostream
# lacks the locale facets). Naming the shared libraries before the compiler
# driver's own -lstdc++/-lgcc_s binds every runtime symbol to them, whatever
# the driver adds after (-shared-libgcc would not do: -static-libgcc
# overrides it); a toolchain without them is refused by _check_one_runtime.
RUNTIME_LINK_ARGS = ["-lstdc++", "-lgcc_s"] if sys.platform.startswith("linux") else []

# Defined only by libstdc++ (the first three) or by libgcc's unwinder.
RUNTIME_SYMBOLS = {b"__cxa_throw", b"__cxa_begin_catch", b"__gxx_personality_v0",
                   b"_Unwind_RaiseException", b"_Unwind_Resume", b"_Unwind_SetGR"}


def _defined_runtime_symbols(path):
    """The RUNTIME_SYMBOLS that an ELF64 file defines, local ones included.

    Read here rather than with nm, which a toolchain need not ship; None when
    the file is not ELF64."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:4] != b"\x7fELF" or data[4] != 2:
        return None
    end = "<" if data[5] == 1 else ">"
    (shoff,) = struct.unpack_from(end + "Q", data, 0x28)
    shentsize, shnum = struct.unpack_from(end + "HH", data, 0x3A)
    header = end + "IIQQQQIIQQ"  # name, type, flags, addr, offset, size, link, info, addralign, entsize
    if shnum == 0 and shoff:  # 0xff00 sections or more: the count is in section 0
        shnum = struct.unpack_from(header, data, shoff)[5]
    sections = [struct.unpack_from(header, data, shoff + i * shentsize) for i in range(shnum)]
    found = set()
    for _, kind, _, _, offset, size, link, _, _, entsize in sections:
        if kind not in (2, 11) or entsize == 0:  # SHT_SYMTAB, SHT_DYNSYM
            continue
        strtab = data[sections[link][4] : sections[link][4] + sections[link][5]]
        for name, _, _, shndx, _, _ in struct.iter_unpack(end + "IBBHQQ", data[offset : offset + size]):
            if shndx != 0:  # SHN_UNDEF: a reference, not a definition
                symbol = strtab[name : strtab.index(b"\0", name)]
                if symbol in RUNTIME_SYMBOLS:
                    found.add(symbol.decode())
    return found


def _check_one_runtime(path):
    """Refuse (and remove) a linked extension that carries its own C++ runtime."""
    own = _defined_runtime_symbols(path)
    if not own:
        return
    from setuptools.errors import LinkError

    os.remove(path)
    raise LinkError(
        f"{path} was linked with its own copy of the C++ runtime or unwinder (it defines "
        f"{', '.join(sorted(own))}), so a C++ error raised in it would crash Python instead of "
        "raising an exception. The compiler links libstdc++/libgcc statically into shared "
        "libraries; build with one that links them as shared libraries (libstdc++.so.6, "
        "libgcc_s.so.1), e.g. the distribution's g++ (CXX=/usr/bin/g++)."
    )


def _jobs():
    """Compiler processes to run at once: MAX_JOBS (as torch's own builds read it),
    else one per CPU this process may use."""
    if os.environ.get("MAX_JOBS"):
        return max(1, int(os.environ["MAX_JOBS"]))
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _run_all(commands, jobs):
    """Run compiler command lines, up to `jobs` at once; after a failure start no more."""
    from setuptools.errors import CompileError

    def run(command):
        # Where setuptools logs the commands it runs (shown unless -q).
        logging.getLogger().info(subprocess.list2cmdline(command))
        done = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        # Printed whole, so that the diagnostics of two compilers do not interleave.
        sys.stderr.write(done.stdout.decode(errors="replace"))
        return done.returncode

    pool = ThreadPoolExecutor(max_workers=max(1, min(jobs, len(commands))))
    try:
        started = {pool.submit(run, command): command for command in commands}
        for future in as_completed(started):
            status = future.result()
            if status != 0:
                command = started[future]
                target = command[command.index("-o") + 1] if "-o" in command else command[-1]
                raise CompileError(f"{command[0]} exited with status {status} building {target}")
    finally:
        pool.shutdown(cancel_futures=True)


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


# The compiler methods that run a command line (see Build.build_extension).
RUNNERS = ("call", "spawn")


class Build(BuildExtension):
    """BuildExtension with per-source flags for the CPU capability variants,
    compiling the sources in parallel.

    torch's ninja builds would apply one set of flags to every file, and its
    other path compiles one file after another through a hook
    (``compiler._compile``) that swaps the compiler's executable in place (nvcc
    for .cu), so it cannot run in threads. It runs here once per source, in
    order, with the compiler's command runner recording the command line
    instead of running it; the recorded commands then run ``_jobs()`` at a
    time."""

    def __init__(self, *args, **kwargs):
        kwargs["use_ninja"] = False  # ninja would apply one set of flags to every file
        super().__init__(*args, **kwargs)

    def build_extension(self, ext):
        compiler = self.compiler
        compile_one, compile_all = compiler._compile, compiler.compile
        commands = []

        def with_capability_flags(obj, src, ext_, cc_args, extra_postargs, pp_opts):
            for suffix, flags in CAPABILITY_FLAGS.items():
                if src.endswith(suffix):
                    if isinstance(extra_postargs, dict):
                        extra_postargs = dict(extra_postargs, cxx=list(extra_postargs["cxx"]) + flags)
                    else:
                        extra_postargs = list(extra_postargs) + flags
            return compile_one(obj, src, ext_, cc_args, extra_postargs, pp_opts)

        def compile_parallel(*args, **kwargs):
            commands.clear()
            # setuptools' compilers run commands through `call` (`spawn` in
            # older ones); both record here, and are the class's again after.
            for runner in RUNNERS:
                setattr(compiler, runner, lambda command, **_: commands.append(list(command)))
            try:
                objects = compile_all(*args, **kwargs)
            finally:
                for runner in RUNNERS:
                    delattr(compiler, runner)
            # The CUDA translation units take longest: started first, they
            # overlap with the C++ ones instead of running alone at the end.
            commands.sort(key=lambda command: not any(arg.endswith(".cu") for arg in command))
            _run_all(commands, _jobs())
            return objects

        compiler._compile, compiler.compile = with_capability_flags, compile_parallel
        try:
            super().build_extension(ext)
        finally:
            compiler._compile, compiler.compile = compile_one, compile_all
        _check_one_runtime(self.get_ext_fullpath(ext.name))


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
        fast_math = os.environ.get("ROBUSTLOSS_FAST_MATH") == "1"
        nvcc = ["-O3", "-DNDEBUG", "--use_fast_math" if fast_math else "-Xptxas=-O3"]
        if os.environ.get("ROBUSTLOSS_ACCURATE_EXP") == "1":  # csrc/cuda/common.cuh: exp_elem
            nvcc.append("-DRL_ACCURATE_EXP")
        if "TORCH_CUDA_ARCH_LIST" not in os.environ:
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
        ext = CUDAExtension(
            "robustloss_fast._C",
            sources,
            include_dirs=include_dirs,
            depends=depends,
            define_macros=macros + [("ROBUSTLOSS_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=["-fopenmp"] + RUNTIME_LINK_ARGS,
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
            extra_link_args=["-fopenmp"] + RUNTIME_LINK_ARGS,
        )
    ]


# Guarded so that tests/test_build.py can load _defined_runtime_symbols
# (pip and `python setup.py` run this file as __main__).
if __name__ == "__main__":
    setup(
        packages=find_packages(include=["robustloss_fast", "robustloss_fast.*"]),
        ext_modules=extensions(),
        cmdclass={"build_ext": Build},
    )
