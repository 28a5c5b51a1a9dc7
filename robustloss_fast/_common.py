"""What every backend shares: kernel ids, reductions, dtypes, the target check, and ``KernelSpec``.

Nothing here computes a loss. This module holds the vocabulary that the API,
the backends, the fused linear layer and the distributed paths speak, once:

* ``Kernel``: the kernel-formula ids (the one Python table; the C++ table is
  ``csrc/include/robustloss/schemes.h`` and a test reads it back against this
  one), with the named classes of ids the code branches on;
* ``Reduction``: the reduction codes of the op schemas;
* ``acc_dtype``: the accumulation dtype rule (spec §6);
* ``check_target`` and ``bad_target_message``: the host-side target check of
  spec §6 and its one wording (the C++ ops use the same words,
  ``ROBUSTLOSS_BAD_TARGET_MSG`` in ``checks.h``);
* ``KernelSpec``: the one immutable value computed from a scheme and the
  loss's flags (``functional.kernel_spec``) and handed to every backend.
"""

from __future__ import annotations

import enum
import math
import numbers
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

__all__ = [
    "Kernel",
    "Reduction",
    "RowCol",
    "StatCol",
    "ROW_COLS",
    "STAT_COLS",
    "KernelSpec",
    "acc_dtype",
    "bad_target_message",
    "check_target",
    "set_validate_targets",
    "validating_targets",
    "real_scalar",
    "int64_scalar",
    "NORMALIZE_TWO_TERM_MSG",
]

_INT64 = (-(2**63), 2**63 - 1)


class Kernel(enum.IntEnum):
    """Kernel-formula ids (spec §4, §7, §8). Several schemes share one formula:
    ``IMAE(T)`` is ``DM`` with ``(1, T)``, ``RCE``/``SCE``/``Poly1`` are ``POLY``."""

    CCE = 0  # L = -log p                      w = 2q
    MAE = 1  # L = q                           w = 2pq
    MSE = 2  # L = q^2                         w = 4pq^2
    GCE = 3  # L = (1 - p^a) / a               w = 2 p^a q
    DM = 4  # w = exp(b p^a q)                 derivative-defined
    DM_NORMAL = 5  # w = exp(-b p (p - 2a))    derivative-defined
    DM_BETA = 6  # w = p^(a-1) q^(b-1)         derivative-defined
    POLY = 7  # L = -a log p + b q             w = 2q (a + b p)
    FOCAL = 8  # L = -q^a log p
    TAYLOR = 9  # L = sum_{k <= a} q^k / k
    CCE_LS = 10  # label smoothing: (1 - a) u_y (-log p) + (a / C) Lambda   (the label_smoothing= keyword)
    NCE = 11  # L = a (-log p) / Lambda + b q
    NFL = 12  # L = FL(p) / sum_k FL(P_k) + b q, FL(P) = -(1 - P)^a log P

    @property
    def loss_defined(self) -> bool:
        """An ordinary loss L whose exact gradient the kernels write (not a designed emphasis)."""
        return self not in (Kernel.DM, Kernel.DM_NORMAL, Kernel.DM_BETA)

    @property
    def two_term(self) -> bool:
        """Depends on the whole distribution: gradient ``alpha r + beta u`` off the target, no emphasis w(p)."""
        return self in (Kernel.CCE_LS, Kernel.NCE, Kernel.NFL)

    @property
    def needs_spread(self) -> bool:
        """Needs the second row reduction ``spread = sum_k u_k (M - z_k)``, M the row's largest logit (spec §8.2)."""
        return self in (Kernel.CCE_LS, Kernel.NCE)

    @property
    def p_form(self) -> bool:
        """Rows and stats carry ``lse`` (not ``lse_nt``) and the gradient has a per-class term (NFL)."""
        return self is Kernel.NFL

    @property
    def weight_in_rows(self) -> bool:
        """The class weights weigh every class of the row's sum (label smoothing, as in F.cross_entropy)."""
        return self is Kernel.CCE_LS


class Reduction(enum.IntEnum):
    """The ``reduction`` codes of the op schemas."""

    NONE = 0
    MEAN = 1
    SUM = 2

    @classmethod
    def parse(cls, name) -> "Reduction":
        if name == "none":
            return cls.NONE
        if name == "mean":
            return cls.MEAN
        if name == "sum":
            return cls.SUM
        raise ValueError(f"reduction must be one of 'none', 'mean', 'sum', got {name!r}")


class RowCol(enum.IntEnum):
    """Columns of the row pass's output ``rows (N, ROW_COLS)`` (spec §9.3).

    ``M`` and ``LS`` are the non-target log-sum-exp ``lse_nt = M + LS`` kept
    as its two parts: ``M`` the largest finite non-target logit and ``LS`` the
    log of the sum of ``exp(z_j - M)`` (in ``[0, log C]``). Their sum is never
    formed: at logits of 1e8 a float32 ``M + LS`` drops ``LS`` altogether
    (spec §2.2). P-form rows (NFL) hold ``lse = M + LS`` the same way.
    """

    M = 0
    LS = 1
    LOGW = 2
    X = 3
    ALPHA = 4
    BETA = 5
    GAMMA = 6


class StatCol(enum.IntEnum):
    """Columns of the per-row ``stats (N, STAT_COLS)`` that the gradient pass reads (spec §9.1-§9.2)."""

    M = 0
    LS = 1
    ALPHA = 2
    BETA = 3
    GAMMA = 4


ROW_COLS = len(RowCol)
STAT_COLS = len(StatCol)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Spec §6: float64 accumulates in float64, every other dtype in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def real_scalar(value, what: str) -> float:
    """``value`` as a float, taking every real scalar PyTorch users pass; errors name ``what``.

    Python ints and floats, NumPy real scalars and one-element real tensors
    (as ``F.cross_entropy`` takes ``label_smoothing``) are accepted; bools,
    complex numbers, strings and larger tensors are a TypeError, and a value
    beyond the float range (``2**1100``) a ValueError. Finiteness is the
    caller's rule.
    """
    if type(value) is float:  # the common case, without the ABC checks below (a few us per call)
        return value
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.dtype == torch.bool or value.dtype.is_complex:
            raise TypeError(f"{what} must be a real number, got a tensor of shape {tuple(value.shape)} and {value.dtype}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{what} must be a real number, got {value!r}")
    try:
        return float(value)
    except OverflowError:
        shown = f"an integer of {int(value).bit_length()} bits" if isinstance(value, numbers.Integral) else repr(value)
        raise ValueError(f"{what} must be finite, got {shown} (beyond the float range)") from None


def int64_scalar(value, what: str) -> int:
    """``value`` as a Python int that fits the int64 of the op schemas; errors name ``what``."""
    if type(value) is not int:  # bool is not int here; the ABC check only for the rest
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{what} must be an int, got {value!r}")
        value = int(value)
    if not _INT64[0] <= value <= _INT64[1]:
        raise ValueError(f"{what} must fit in int64, got {value}")
    return value


NORMALIZE_TWO_TERM_MSG = (
    "derivative normalisation (normalize=True) is defined for schemes whose gradient is w(p) (softmax - onehot) / 2; "
    "label smoothing and NCE/NFL/APL have a second gradient term: use normalize=False"
)


def bad_target_message(value: int, position: int, num_classes: int, ignore_index: int) -> str:
    """The one wording of a bad target (the C++ ops' ROBUSTLOSS_BAD_TARGET_MSG says the same)."""
    return (
        f"robust_cross_entropy: target value {value} (at flat position {position}) is out of bounds for "
        f"{num_classes} classes; expected 0..{num_classes - 1} or ignore_index={ignore_index}"
    )


#: The device-side assertion's words (the kernels cannot format the value; see set_validate_targets).
BAD_TARGET_ASSERT_MSG = (
    "robust_cross_entropy: target out of bounds: expected 0 <= target < num_classes or target == "
    "ignore_index (robustloss_fast.set_validate_targets(True) names the value and its position)"
)

_VALIDATE_TARGETS = False


def set_validate_targets(enabled: bool) -> bool:
    """Check every target on the host before the loss runs; returns the previous setting.

    On the CPU the targets are always checked (it costs nothing there) and a bad
    one raises ``IndexError`` naming its value and position. On a GPU the
    kernels check them on the device instead and stop with a device-side
    assertion, as ``F.cross_entropy`` does: no step waits for the device. With
    validation on, a GPU call first reads the targets' check back too (one
    device-to-host synchronisation per call) and raises the same
    ``IndexError`` as on the CPU, which leaves the CUDA context usable. Off by
    default; traced calls (``torch.compile``) never validate on the host.
    """
    global _VALIDATE_TARGETS
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {enabled!r}")
    previous, _VALIDATE_TARGETS = _VALIDATE_TARGETS, enabled
    return previous


def validating_targets() -> bool:
    """Whether ``set_validate_targets(True)`` is in effect."""
    return _VALIDATE_TARGETS


def check_target(target: torch.Tensor, num_classes: int, ignore_index: int) -> None:
    """Raise IndexError naming the first target outside [0, C) that is not ``ignore_index``.

    Reads one flag back from the target's device: free on the CPU, a
    synchronisation on a GPU (which is why the GPU paths call it only when
    ``set_validate_targets(True)`` asks for it).
    """
    bad = (target != ignore_index) & ((target < 0) | (target >= num_classes))
    if bool(bad.any()):
        pos = int(bad.nonzero()[0, 0])
        raise IndexError(bad_target_message(int(target[pos]), pos, num_classes, ignore_index))


@dataclass(frozen=True)
class KernelSpec:
    """Everything a backend needs to know about a loss besides its tensors.

    Built once per call from the scheme and the flags (``functional.kernel_spec``)
    and passed unchanged to the backend, the fused linear layer and the
    distributed paths; at an op boundary it is unpacked into the op's schema
    arguments in one place per backend.

    ``kernel``, ``a``, ``b``: the kernel formula and its two parameters.
    ``scale``: a constant factor on the loss applied once outside the kernels
    (APL's ``alpha`` with NFL, whose formula already takes two parameters; 1
    for every other scheme). ``reduction``, ``normalize``, ``ignore_index``:
    as in the API (``normalize`` matters for ``"mean"`` only).
    """

    kernel: Kernel
    a: float = 0.0
    b: float = 0.0
    scale: float = 1.0
    reduction: Reduction = Reduction.MEAN
    normalize: bool = False
    ignore_index: int = -100

    @property
    def normalised(self) -> bool:
        """Derivative normalisation is in effect: ``"mean"`` with ``normalize=True`` (spec §5)."""
        return self.reduction == Reduction.MEAN and self.normalize

    @property
    def log_weight_range(self) -> Optional[Tuple[float, float]]:
        """Bounds ``(lo, hi)`` of ``log w(p)`` over ``p`` in [0, 1], attained, where the formula has finite ones.

        DM (and IMAE, DMExponential): ``log w = beta p^lam (1 - p)``, and
        ``p^lam (1 - p)`` peaks at ``p = lam / (1 + lam)`` with
        ``lam^lam / (1 + lam)^(1 + lam)`` (1 at ``lam = 0``) and is 0 at p = 1.
        DMNormal: ``log w = beta (2 psi p - p^2)``, between ``2 psi - 1`` (p = 1)
        or 0 (p = 0) and ``psi^2`` (p = psi), times ``beta >= 0``. Every other
        formula has ``log p`` or ``log q`` in ``log w`` (unbounded): None.
        """
        if self.kernel == Kernel.DM:
            lam, beta = self.a, self.b
            peak = math.exp(lam * math.log(lam) - (1.0 + lam) * math.log1p(lam)) if lam > 0 else 1.0
            return (min(0.0, beta * peak), max(0.0, beta * peak))
        if self.kernel == Kernel.DM_NORMAL:
            psi, beta = self.a, self.b
            return (beta * min(0.0, 2.0 * psi - 1.0), beta * psi * psi)
        return None

    @property
    def two_term(self) -> bool:
        return self.kernel.two_term

    @property
    def p_form(self) -> bool:
        return self.kernel.p_form

    @property
    def weight_in_rows(self) -> bool:
        """The class weights enter the rows (label smoothing) instead of the row scale s_i."""
        return self.kernel.weight_in_rows

    def smooth_weight(self, weight):
        """The class weights as the rows' ``u`` (label smoothing), else None."""
        return weight if self.kernel.weight_in_rows else None
