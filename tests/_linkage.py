"""What a built shared library links against, read with binutils (nm, readelf).

A private copy of the C++ runtime or of the unwinder inside
robustloss_fast/_C*.so makes a C++ error raised in it crash the interpreter or
lose its message (setup.py, RUNTIME_LINK_ARGS). Used by conftest.py, which
stops a run before the first such error, and by test_build.py.
"""

import re
import shutil
import subprocess

# The runtime symbols an extension may use but must never define, and the
# shared library that defines them for every library of the process.
RUNTIME = {
    "__cxa_throw": "libstdc++.so.6",
    "__cxa_begin_catch": "libstdc++.so.6",
    "__gxx_personality_v0": "libstdc++.so.6",
    "_Unwind_RaiseException": "libgcc_s.so.1",
    "_Unwind_Resume": "libgcc_s.so.1",
    "_Unwind_SetGR": "libgcc_s.so.1",
}


def missing_tools():
    return [tool for tool in ("nm", "readelf") if shutil.which(tool) is None]


def _nm(*args):
    out = subprocess.run(["nm", *args], capture_output=True, text=True, check=True).stdout
    # "address type name[@version]"; mangled names hold no spaces.
    return {line.split()[-1].split("@")[0] for line in out.splitlines() if line.strip()}


def own_runtime(path):
    """The runtime symbols the file defines: its full symbol table (the static
    unwinder's are local) and its dynamic one (left when the file is stripped)."""
    defined = _nm("--defined-only", path) | _nm("-D", "--defined-only", path)
    return sorted(defined & RUNTIME.keys())


def imported_runtime(path):
    """The runtime symbols the file takes from other libraries."""
    return sorted(_nm("-D", "--undefined-only", path) & RUNTIME.keys())


def needed(path):
    """The file's DT_NEEDED shared libraries."""
    out = subprocess.run(["readelf", "-d", path], capture_output=True, text=True, check=True).stdout
    return re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", out)
