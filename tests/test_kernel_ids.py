"""The kernel-id table exists once per language; this test reads the C++ one back against Python's.

``robustloss_fast._common.Kernel`` (Python, also the Triton kernels' ids) and
``enum SchemeId`` in ``csrc/include/robustloss/schemes.h`` (the CPU and CUDA
kernels) must give every formula the same number, and the named classes of
ids (two-term, spread, P-form, class weights in the rows, loss-defined) must
pick the same ids on both sides: the C++ helpers' return expressions are
evaluated here for every id.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from robustloss_fast._common import Kernel, Reduction, RowCol, StatCol

INCLUDE = Path(__file__).resolve().parents[1] / "csrc" / "include" / "robustloss"
HEADER = INCLUDE / "schemes.h"
ARGS_HEADER = INCLUDE / "kernel_args.h"


def _enum(text: str, name: str) -> dict:
    body = re.search(r"enum\s+" + name + r"\s*:\s*\w+\s*\{(.*?)\};", text, re.S)
    assert body, f"enum {name} not found"
    code = re.sub(r"//[^\n]*", "", body.group(1))
    return {k: int(v) for k, v in re.findall(r"(k\w+)\s*=\s*(\d+)", code)}


def _key(name: str, prefix: str = "") -> str:
    """C++ kCCELS / kDMNormal and Python CCE_LS / DM_NORMAL name the same id: compare without case or '_'."""
    return re.sub(r"^k" + prefix + r"(?=[A-Z])", "", name).replace("_", "").upper()


@pytest.fixture(scope="module")
def header():
    return HEADER.read_text()


def test_ids_agree(header):
    cpp = _enum(header, "SchemeId")
    count = cpp.pop("kNumSchemes")
    assert count == len(Kernel), f"kNumSchemes = {count}, Python has {len(Kernel)} kernels"
    assert {_key(k): v for k, v in cpp.items()} == {_key(k.name): int(k) for k in Kernel}


@pytest.mark.parametrize("cpp,prefix,py", [("RowCol", "Row", RowCol), ("StatCol", "Stat", StatCol)])
def test_row_and_stat_layouts_agree(cpp, prefix, py):
    """The columns of rows and stats: kernel_args.h's enums against _common's (spec §9)."""
    cols = _enum(ARGS_HEADER.read_text(), cpp)
    assert cols.pop(f"k{prefix}Cols") == len(py)
    assert {_key(k, prefix): v for k, v in cols.items()} == {_key(c.name): int(c) for c in py}


def test_reductions_agree(header):
    cpp = _enum(header, "Reduction")
    assert {_key(k): v for k, v in cpp.items()} == {_key(r.name): int(r) for r in Reduction}


@pytest.mark.parametrize(
    "helper,prop",
    [
        ("is_loss_defined", "loss_defined"),
        ("is_two_term", "two_term"),
        ("needs_spread", "needs_spread"),
        ("is_p_form", "p_form"),
        ("weight_in_rows", "weight_in_rows"),
    ],
)
def test_id_classes_agree(header, helper, prop):
    ids = _enum(header, "SchemeId")
    found = re.search(r"RL_HD bool " + helper + r"\(int64_t id\)\s*\{\s*return (.*?);\s*\}", header, re.S)
    assert found, f"{helper} not found in {HEADER}"
    expr = found.group(1).replace("&&", " and ").replace("||", " or ")
    for kernel in Kernel:
        got = eval(expr, {"__builtins__": {}}, dict(ids, id=int(kernel)))  # noqa: S307 - our own header
        assert bool(got) == getattr(kernel, prop), f"{helper}({kernel.name}) = {got}, Kernel.{prop} disagrees"
