"""Build the extension in place with its sources compiled in parallel.

    python benchmarks/build_parallel.py [-j JOBS]     # = python setup.py build_ext --inplace, JOBS at a time

setup.py builds without ninja (each CPU capability file needs its own flags),
and setuptools then compiles one source after another: on the 16-core GPU
machine the first CUDA build took 159 s with 15 cores idle. This runs setup.py
unchanged, with setuptools' per-extension compile loop replaced by one that
forks a child per object file (JOBS at a time, default $MAX_JOBS or the core
count). Forked children, not threads: torch's compile wrapper swaps the
compiler executable on the shared compiler object for each CUDA file.

If setup.py ever builds with ninja, torch installs its own compile function
on the compiler object, this loop is never called, and ninja honours MAX_JOBS.
Exit status: setup.py's.
"""

from __future__ import annotations

import argparse
import os
import runpy
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _compiler_classes():
    classes = []
    for name in ("setuptools._distutils.ccompiler", "distutils.ccompiler"):
        try:
            module = __import__(name, fromlist=["CCompiler"])
        except ImportError:
            continue
        cls = getattr(module, "CCompiler", None)
        if cls is not None and cls not in classes:
            classes.append(cls)
    return classes


def parallel_compile(jobs: int):
    """A CCompiler.compile that runs ``self._compile`` for each object in a forked child."""

    def compile(self, sources, output_dir=None, macros=None, include_dirs=None, debug=False, extra_preargs=None,
                extra_postargs=None, depends=None):
        macros, objects, extra_postargs, pp_opts, build = self._setup_compile(
            output_dir, macros, include_dirs, sources, depends, extra_postargs
        )
        cc_args = self._get_cc_args(pp_opts, debug, extra_preargs)
        todo = [(obj,) + tuple(build[obj]) for obj in objects if obj in build]
        print(f"build_parallel: {len(todo)} of {len(objects)} objects to compile, {jobs} at a time", flush=True)
        running, failed = {}, []

        def reap():
            pid, status = os.wait()
            if pid not in running:
                return
            src, t0 = running.pop(pid)
            code = os.waitstatus_to_exitcode(status)
            print(f"build_parallel: {src}: {'ok' if code == 0 else f'FAILED ({code})'} in {time.monotonic() - t0:.0f} s",
                  flush=True)
            if code != 0:
                failed.append(src)

        for obj, src, ext in todo:
            while len(running) >= jobs:
                reap()
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    self._compile(obj, src, ext, cc_args, extra_postargs, pp_opts)
                    code = 0
                except BaseException:  # noqa: BLE001 - the parent reports it through the exit code
                    traceback.print_exc()
                finally:
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(code)
            running[pid] = (src, time.monotonic())
        while running:
            reap()
        if failed:
            error = getattr(sys.modules[type(self).__module__], "CompileError", None) or RuntimeError
            raise error(f"compilation failed: {', '.join(failed)}")
        return objects

    return compile


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-j", "--jobs", type=int, default=int(os.environ.get("MAX_JOBS") or os.cpu_count() or 1))
    args = ap.parse_args(argv)
    classes = _compiler_classes()
    if not classes:
        print("build_parallel: no distutils CCompiler found; building serially", flush=True)
    for cls in classes:
        cls.compile = parallel_compile(max(1, args.jobs))
    os.chdir(ROOT)
    sys.argv = ["setup.py", "build_ext", "--inplace"]
    try:
        runpy.run_path(os.path.join(ROOT, "setup.py"), run_name="__main__")
    except SystemExit as exc:
        if isinstance(exc.code, int) or exc.code is None:
            return exc.code or 0
        print(exc.code, file=sys.stderr)  # setuptools' error message, which Python would have printed
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
