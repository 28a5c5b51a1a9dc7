"""What a step runs: its Triton launches, and the ATen calls the CPU profiler sees outside them.

Under the Triton interpreter each launch copies its tensors to and from the
host with ATen ops of its own, which a GPU launch does not; marking every
launch as a profiler range lets a test count only the ops the library itself
issues.
"""

from __future__ import annotations

from typing import List

import torch

LAUNCH = "triton launch"


def mark_triton_launches(monkeypatch, device: str) -> List[str]:
    """Wrap Triton's launcher: each launch appends its kernel's name to the returned list and runs
    inside a profiler range named ``LAUNCH``."""
    from triton.runtime import interpreter

    if getattr(interpreter, "InterpretedFunction", None) is not None and device == "cpu":
        cls = interpreter.InterpretedFunction
    else:  # pragma: no cover - on a GPU
        from triton.runtime.jit import JITFunction as cls
    real_run = cls.run
    launches: List[str] = []

    def run(self, *args, **kwargs):
        launches.append(self.fn.__name__)
        with torch.profiler.record_function(LAUNCH):
            return real_run(self, *args, **kwargs)

    monkeypatch.setattr(cls, "run", run)
    return launches


def aten_outside_launches(prof) -> List[str]:
    """The ATen op names (without ``aten::``) of a profile, in order, leaving out those inside a launch."""
    events = list(prof.events())
    inside = [(e.time_range.start, e.time_range.end) for e in events if e.name == LAUNCH]

    def in_launch(e):
        return any(a <= e.time_range.start and e.time_range.end <= b for a, b in inside)

    return [e.name.split("::", 1)[1] for e in events if e.name.startswith("aten::") and not in_launch(e)]
