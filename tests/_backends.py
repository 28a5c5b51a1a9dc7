"""Every registered backend, each on the device its registry entry names: the parametrisation of the backend suite.

The suite (tests/test_backends.py end to end, tests/test_backend_ops.py op by
op) runs once per entry of ``PARAMS``, which is derived from
``robustloss_fast.backends`` alone, so a backend added to ``backends.NAMES``
gets the whole suite without a test edit:

* the device is the first device type of ``backends.devices(name)`` that
  exists on this machine: "cpu" for the C++ kernels, "cuda" for the CUDA
  kernels, "cuda" for Triton on a GPU and "cpu" under the Triton interpreter
  (which also takes CUDA tensors, but there is no GPU then);
* a backend that takes any device (``devices`` is None: the reference) runs
  on the CPU and, where a GPU exists, on it too;
* a backend that cannot run here is still listed, and its cases skip with the
  registry's own ``unavailable_reason`` (or the missing device), never silently.

Importing this module imports the backends, so conftest.py imports it only
after it has set TRITON_INTERPRET.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import pytest
import torch

from robustloss_fast import backends

#: Device types the suite tries for a backend that takes tensors on any device.
ANY_DEVICE = ("cpu", "cuda")


def device_missing(device_type: str) -> Optional[str]:
    """None when tensors of ``device_type`` can be made here, else why not."""
    if device_type == "cpu":
        return None
    module = getattr(torch, device_type, None)
    is_available = getattr(module, "is_available", None)
    if is_available is None or not is_available():
        return f"no {device_type} device here (torch.{device_type}.is_available() is False)"
    return None


def device_of(name: str) -> str:
    """The device type a test should put backend ``name``'s tensors on (the suite's rule, for other files)."""
    types = backends.devices(name) or ANY_DEVICE
    return next((t for t in types if device_missing(t) is None), types[0])


@dataclass(frozen=True)
class OnDevice:
    """One backend of the registry and the device type its tensors live on in the suite."""

    name: str
    device: str

    def __str__(self) -> str:
        return f"{self.name}_on_{self.device}"  # an id that pytest -k accepts

    @property
    def impl(self) -> backends.Backend:
        """The registry's entry points (``loss``, ``rows``, ``grad``)."""
        return backends.get(self.name)

    @property
    def emulated(self) -> bool:
        """Runs on a stand-in for its own device: a device type other than the first its registry
        entry lists (the Triton interpreter on CPU tensors), orders of magnitude slower."""
        types = backends.devices(self.name)
        return types is not None and self.device != types[0]

    def put(self, t):
        """``t`` on this backend's device (None stays None)."""
        return None if t is None else t.to(self.device)


def _why_not(name: str, device: str) -> Optional[str]:
    reason = backends.unavailable_reason(name)
    if reason is not None:
        return f"backend {name!r} is unavailable here: {reason}"
    missing = device_missing(device)
    if missing is not None:
        return f"backend {name!r} on {device}: {missing}"
    return None


def _marks(name: str, device: str):
    marks = []
    if name == "triton":
        # pyproject's marker; the interpreter evaluates both branches of tl.where
        # in numpy (log(0) on lanes that are then discarded) and numpy warns.
        marks += [pytest.mark.triton, pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")]
    if device == "cuda":
        marks.append(pytest.mark.cuda)
    reason = _why_not(name, device)
    if reason is not None:
        marks.append(pytest.mark.skip(reason=reason))
    return marks


def _entries():
    for name in backends.NAMES:
        types = backends.devices(name)
        if types is None:  # takes any device: each one the suite knows
            devices = ANY_DEVICE
        else:
            devices = (device_of(name),)
        for device in devices:
            yield OnDevice(name, device)


def thin(items, backend: OnDevice, share: int, offset: int = 0):
    """All of ``items``; for an emulated backend only ``share`` of them, evenly spread and rotated by ``offset``.

    The suite's loops run every case on every backend at native speed. Under
    an emulator (the Triton interpreter, orders of magnitude slower) each test
    takes an evenly spread share, and the tests of one family pass different
    offsets, so that together they still reach every case.
    """
    items = list(items)
    if not backend.emulated or len(items) <= share:
        return items
    stride = len(items) / share
    return [items[(offset + int(i * stride)) % len(items)] for i in range(share)]


#: ``pytest.param`` per (backend, device): the params of conftest's ``backend`` fixture.
PARAMS = [pytest.param(entry, id=str(entry), marks=_marks(entry.name, entry.device)) for entry in _entries()]
