"""The built extension shares the process's C++ runtime, so its errors reach Python.

Linked by a toolchain that puts libstdc++ and libgcc's unwinder statically into
shared libraries, the extension carries private copies of both, and a C++
error then unwinds through two runtimes: with Debian's g++ made to do so, the
interpreter aborted (a TORCH_CHECK in the autograd backward) or the message
lost its numbers ("target value " for "target value 7 ..."). A build made with
a GPU machine's own g++ segfaulted on every such error (its link was not
inspected there). setup.py links the shared runtime and refuses a library that
defines its own (RUNTIME_LINK_ARGS, _check_one_runtime); these tests hold it to
that.
"""

import json
import os
import re
import runpy
import shlex
import shutil
import subprocess
import sys

import pytest
from setuptools.errors import LinkError

import robustloss_fast
from _linkage import RUNTIME, imported_runtime, missing_tools, needed, own_runtime
from robustloss_fast.backends import compiled as _ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

needs_extension = pytest.mark.skipif(
    _ops.EXT is None, reason=f"the compiled extension is not importable: {_ops.LOAD_ERROR}"
)
needs_binutils = pytest.mark.skipif(bool(missing_tools()), reason=f"binutils' {missing_tools()} not on PATH")


@needs_extension
@needs_binutils
def test_extension_links_the_shared_cxx_runtime():
    so = _ops.EXT.__file__
    assert own_runtime(so) == [], f"{so} defines its own C++ runtime / unwinder"
    used = imported_runtime(so)
    # The ops throw (TORCH_CHECK_INDEX) and run destructors while unwinding,
    # so both halves of the runtime are in use and must come from outside.
    assert "__cxa_throw" in used and "_Unwind_Resume" in used, used
    deps = needed(so)
    for symbol in used:
        assert RUNTIME[symbol] in deps, f"{so} uses {symbol} but does not list {RUNTIME[symbol]}: {deps}"


# Run in a fresh interpreter per case: a broken build crashes it rather than
# the test run, and whether it crashes depends on which runtime copy unwound
# first in the process, so one case must not warm up the next.
CHILD = r"""
import json, sys
import torch
import robustloss_fast as rf

ops = torch.ops.robustloss
x = torch.randn(3, 5)
good, bad = torch.tensor([0, 4, 1]), torch.tensor([0, 7, 1])
from robustloss_fast._common import STAT_COLS, Kernel
DM, NCE = int(Kernel.DM), int(Kernel.NCE)


def double_backward():
    xg = x.clone().requires_grad_()
    loss = rf.robust_cross_entropy(xg, good, rf.schemes.DM(), backend="cpu")
    torch.autograd.grad(loss, xg, create_graph=True)


CASES = {
    "forward_bad_target": lambda: ops.robust_ce_forward(x, bad, DM, 1.0, 8.0, None, None, -100, 1, True),
    "rows_bad_target": lambda: ops.robust_ce_rows(x, bad, DM, 1.0, 8.0, None, -100, True),
    "backward_bad_target": lambda: ops.robust_ce_backward(torch.tensor(1.0), x, bad, torch.zeros(3, STAT_COLS), None, -100, DM, 1.0),
    "autograd_bad_target": lambda: rf.robust_cross_entropy(x.clone().requires_grad_(), bad, rf.schemes.DM(), backend="cpu"),
    "forward_normalize_refused": lambda: ops.robust_ce_forward(x, good, NCE, 1.0, 0.0, None, None, -100, 1, True),
    "rows_normalize_refused": lambda: ops.robust_ce_rows(x, good, NCE, 1.0, 0.0, None, -100, True),
    "unknown_scheme": lambda: ops.robust_ce_forward(x, good, 99, 1.0, 0.0, None, None, -100, 1, False),
    "double_backward": double_backward,
}
try:
    CASES[sys.argv[1]]()
    raised = None
except Exception as exc:
    raised = exc
print(json.dumps({
    "module": rf.__file__,
    "type": None if raised is None else type(raised).__name__,
    "message": "" if raised is None else str(raised).splitlines()[0],
}))
"""

BAD_TARGET = r"target value 7 \(at flat position 1\) is out of bounds for 5 classes; expected 0\.\.4"
NOT_NORMALISABLE = r"normalize=True\) is not defined for scheme id \d+ \("

# case -> (exception type, pattern its first line must contain). The
# TORCH_CHECK_INDEX/_VALUE cases throw from our library, TORCH_CHECK ones
# from libc10 through our frames.
ERRORS = {
    "forward_bad_target": ("IndexError", BAD_TARGET),
    "rows_bad_target": ("IndexError", BAD_TARGET),
    "backward_bad_target": ("IndexError", BAD_TARGET),
    "autograd_bad_target": ("IndexError", BAD_TARGET),
    "forward_normalize_refused": ("ValueError", NOT_NORMALISABLE),
    "rows_normalize_refused": ("ValueError", NOT_NORMALISABLE),
    "unknown_scheme": ("RuntimeError", r"robustloss: unknown scheme id 99$"),
    "double_backward": ("RuntimeError", r"double backward \(create_graph=True\) is not supported"),
}


@needs_extension
@pytest.mark.parametrize("case", sorted(ERRORS))
def test_cxx_error_reaches_python(case):
    env = dict(os.environ)
    package_parent = os.path.dirname(os.path.dirname(robustloss_fast.__file__))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_parent, env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-X", "faulthandler", "-c", CHILD, case], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, (
        f"the interpreter died (exit status {proc.returncode}) on a C++ error in case {case}:\n{proc.stderr[-3000:]}"
    )
    out = json.loads(proc.stdout.splitlines()[-1])
    assert out["module"] == robustloss_fast.__file__, "the child imported another copy of the package"
    kind, pattern = ERRORS[case]
    assert out["type"] == kind, out
    assert re.search(pattern, out["message"]), f"{out['message']!r} does not match {pattern!r}"


THROWER = r"""
#include <stdexcept>
extern "C" void robustloss_probe_throw(int k) {
  if (k) throw std::runtime_error("probe");
}
"""


@pytest.fixture(scope="module")
def setup_py():
    """setup.py's module namespace, loaded without building anything."""
    path = os.path.join(ROOT, "setup.py")
    if not os.path.exists(path):
        pytest.skip("no setup.py beside tests/: not a source checkout")
    saved = os.environ.get("ROBUSTLOSS_NO_CUDA")
    os.environ["ROBUSTLOSS_NO_CUDA"] = "1"  # its CUDA detection would set CUDA_HOME in this process
    try:
        return runpy.run_path(path, run_name="robustloss_fast_setup")
    finally:
        if saved is None:
            del os.environ["ROBUSTLOSS_NO_CUDA"]
        else:
            os.environ["ROBUSTLOSS_NO_CUDA"] = saved


@needs_binutils
def test_a_private_runtime_is_refused_and_the_link_args_avoid_it(setup_py, tmp_path):
    """A toolchain that links the runtime statically, as a compiler flag: setup.py's
    check must see it, and its link arguments must keep the runtime shared."""
    cxx = shlex.split(os.environ.get("CXX", "")) or [shutil.which("g++") or shutil.which("c++") or "c++"]
    src = tmp_path / "thrower.cpp"
    src.write_text(THROWER)

    def link(name, *args):
        out = tmp_path / name
        proc = subprocess.run([*cxx, "-shared", "-fPIC", "-O1", str(src), "-o", str(out), *args], capture_output=True)
        if proc.returncode != 0:
            pytest.skip(f"{cxx} cannot link {name} {args}: {proc.stderr.decode(errors='replace')[-300:]}")
        return str(out)

    static = ["-static-libstdc++", "-static-libgcc"]
    private = link("private.so", *static)
    # setup.py's arguments come before whatever the driver adds, as in its link line.
    fixed = link("fixed.so", *setup_py["RUNTIME_LINK_ARGS"], *static)

    check = setup_py["_defined_runtime_symbols"]
    assert {"__cxa_throw", "_Unwind_RaiseException"} <= set(own_runtime(private)), own_runtime(private)
    assert check(private) == set(own_runtime(private)), "setup.py's ELF reader and nm disagree"
    assert own_runtime(fixed) == [] and check(fixed) == set()
    assert {"libstdc++.so.6", "libgcc_s.so.1"} <= set(needed(fixed)), needed(fixed)

    setup_py["_check_one_runtime"](fixed)
    with pytest.raises(LinkError, match="__cxa_throw"):
        setup_py["_check_one_runtime"](private)
    assert not os.path.exists(private), "a refused library must not be left to import"


def test_sources_compile_in_parallel_with_their_own_flags(setup_py, tmp_path, monkeypatch):
    """setup.py's Build compiles through its parallel runner (not one source
    after another inside setuptools), each ISA variant with its own flags."""
    from setuptools import Distribution
    from torch.utils.cpp_extension import CppExtension

    names = ["a_default.cpp", "a_avx2.cpp", "a_avx512.cpp", "b.cpp"]
    for name in names:
        (tmp_path / name).write_text(f"int f_{name[:-4]}() {{ return {len(name)}; }}\n")
    runs = []
    module = setup_py["Build"].build_extension.__globals__  # the functions' own namespace

    def run_all(commands, jobs):
        runs.append([list(c) for c in commands])
        return setup_py["_run_all"](commands, jobs)

    monkeypatch.setitem(module, "_run_all", run_all)
    monkeypatch.setenv("MAX_JOBS", "3")
    monkeypatch.chdir(tmp_path)
    ext = CppExtension("probe._C", names, extra_compile_args={"cxx": ["-O0"]})
    dist = Distribution({"name": "probe", "ext_modules": [ext], "cmdclass": {"build_ext": setup_py["Build"]}})
    cmd = dist.get_command_obj("build_ext")
    cmd.build_lib, cmd.build_temp = str(tmp_path / "lib"), str(tmp_path / "temp")
    cmd.ensure_finalized()
    cmd.run()

    assert len(runs) == 1 and len(runs[0]) == len(names), runs
    flags = {name: next(c for c in runs[0] if name in c) for name in names}
    assert "-mavx512f" in flags["a_avx512.cpp"] and "-mavx512f" not in flags["a_avx2.cpp"]
    assert "-mavx2" in flags["a_avx2.cpp"] and "-DCPU_CAPABILITY=AVX2" in flags["a_avx2.cpp"]
    assert "-DCPU_CAPABILITY=DEFAULT" in flags["a_default.cpp"]
    assert not any(f.startswith(("-mavx", "-DCPU_CAPABILITY")) for f in flags["b.cpp"])
    assert os.path.exists(cmd.get_ext_fullpath("probe._C"))
    assert setup_py["_jobs"]() == 3


def test_run_all_runs_commands_at_once_and_reports_a_failure(setup_py, tmp_path):
    from setuptools.errors import CompileError

    # Each command waits (10 s at most) for the other's file: both finish only
    # when they run at the same time.
    def meet(mine, other):
        wait = f"i=0; while [ ! -e {other} ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done"
        return ["sh", "-c", f"touch {mine}; {wait}; [ -e {other} ]"]

    a, b = tmp_path / "a", tmp_path / "b"
    setup_py["_run_all"]([meet(a, b), meet(b, a)], 2)
    with pytest.raises(CompileError, match=r"exited with status 3 building .*broken\.o"):
        setup_py["_run_all"]([["true"], ["sh", "-c", "exit 3", "-o", "broken.o"]], 2)
