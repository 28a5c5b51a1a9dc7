"""Example-weighting schemes (SPEC §4).

Every scheme is a function of ``p = p_y`` that gives the emphasis ``w(p) >= 0``:
the L1 norm of the gradient of an example w.r.t. its logits. The gradient
direction is always ``softmax - onehot(y)``; only its magnitude differs.

Derivative-defined schemes (``DM`` and its special cases) define ``w`` directly
and report the monitoring value ``w * (-log p)``. Loss-defined schemes (``CCE``,
``MAE``, ``MSE``, ``GCE``) are ordinary losses ``L(p)`` whose exact gradient
has magnitude ``w(p)``.

The kernels see a scheme only as ``(kernel_id, kernel_params, loss_scale)``,
which ``functional.kernel_spec`` folds with the loss's flags into one
``KernelSpec``: several schemes share one kernel formula (``IMAE(T)`` is
``DM(lam=1, beta=T)``, ``DMExponential(beta)`` is ``DM(lam=0, beta)``), so the
kernel table is small. This module is the one place that maps a scheme to its
formula; the ids are ``robustloss_fast._common.Kernel`` (and, for C++,
``csrc/include/robustloss/schemes.h``, which a test reads back against it).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import ClassVar, Optional, Tuple

from ._common import Kernel, int64_scalar, real_scalar

__all__ = [
    "Scheme",
    "DM",
    "IMAE",
    "DMNormal",
    "DMExponential",
    "DMBeta",
    "CCE",
    "MAE",
    "MSE",
    "GCE",
    "Poly1",
    "RCE",
    "SCE",
    "Focal",
    "TaylorCE",
    "NCE",
    "NFL",
    "APL",
]

def __getattr__(name):
    # KERNEL_IDS was the id table before robustloss_fast._common.Kernel; kept for old imports.
    if name == "KERNEL_IDS":
        warnings.warn(
            "robustloss_fast.schemes.KERNEL_IDS is deprecated; use robustloss_fast._common.Kernel",
            DeprecationWarning,
            stacklevel=2,
        )
        return {k.name: int(k) for k in Kernel}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _real(cls: str, name: str, value) -> float:
    value = real_scalar(value, f"{cls}: {name}")
    if not math.isfinite(value):
        raise ValueError(f"{cls}: {name} must be finite, got {value!r}")
    return value


def _numeric_mode(weight) -> Optional[float]:
    """argmax of weight(p) on [0, 1] (a grid, then golden-section refinement)."""
    n = 2000
    grid = [i / n for i in range(n + 1)]
    values = [weight(p) for p in grid]
    best = max(range(n + 1), key=values.__getitem__)
    if values[best] <= 0:
        return None
    lo, hi = grid[max(best - 1, 0)], grid[min(best + 1, n)]
    ratio = (math.sqrt(5) - 1) / 2
    for _ in range(60):
        a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
        if weight(a) >= weight(b):
            hi = b
        else:
            lo = a
    return (lo + hi) / 2


class Scheme:
    """Base class of all schemes: frozen, hashable, comparable by value."""

    #: True when the scheme is an ordinary loss L(p) whose gradient is exact.
    loss_defined: ClassVar[bool] = False
    #: True when the loss depends on the whole distribution, not p alone: its
    #: gradient has a second term and it has no emphasis w(p) to normalise.
    two_term: ClassVar[bool] = False

    @property
    def kernel_id(self) -> int:  # pragma: no cover - overridden
        raise NotImplementedError

    @property
    def kernel_params(self) -> Tuple[float, float]:
        """The two floats the kernel formula takes (unused slots are 0)."""
        raise NotImplementedError  # pragma: no cover

    @property
    def emphasis_mode(self) -> Optional[float]:
        """psi = argmax_p w(p) on [0, 1], or None where w has no unique maximum."""
        raise NotImplementedError  # pragma: no cover

    @property
    def loss_scale(self) -> float:
        """A constant factor on the loss, applied outside the kernels (APL's alpha with NFL)."""
        return 1.0

    @property
    def default_normalize(self) -> bool:
        """SPEC §5: derivative normalisation is on by default for derivative-defined schemes."""
        return not self.loss_defined


@dataclass(frozen=True)
class DM(Scheme):
    """Unified DM emphasis (DM eq. 12): w(p) = exp(beta * p**lam * (1 - p)).

    ``lam >= 0`` moves the emphasis mode psi = lam / (lam + 1) towards easy
    examples (more label noise -> larger lam); ``beta`` sets how peaked it is
    (``beta = 0`` weighs all examples equally, ``beta < 0`` inverts it).
    """

    lam: float = 1.0
    beta: float = 8.0

    def __post_init__(self):
        object.__setattr__(self, "lam", _real("DM", "lam", self.lam))
        object.__setattr__(self, "beta", _real("DM", "beta", self.beta))
        if self.lam < 0:
            raise ValueError(f"DM: lam must be >= 0, got {self.lam!r}")

    kernel_id = Kernel.DM

    @property
    def kernel_params(self):
        return (self.lam, self.beta)

    @property
    def emphasis_mode(self):
        if self.lam == 0 and self.beta < 0:
            return 1.0  # exp(beta q) with beta < 0 rises monotonically to p = 1
        return self.lam / (self.lam + 1.0) if self.beta > 0 else None


@dataclass(frozen=True)
class IMAE(Scheme):
    """IMAE (eq. 8): w(p) = exp(T * p * (1 - p)); the DM case lam = 1, beta = T."""

    T: float = 8.0

    def __post_init__(self):
        object.__setattr__(self, "T", _real("IMAE", "T", self.T))

    kernel_id = Kernel.DM

    @property
    def kernel_params(self):
        return (1.0, self.T)

    @property
    def emphasis_mode(self):
        return 0.5 if self.T > 0 else None


@dataclass(frozen=True)
class DMNormal(Scheme):
    """DM eq. 9: w(p) = exp(-beta * p * (p - 2 psi)), a Gaussian-shaped bump at psi."""

    psi: float = 0.5
    beta: float = 8.0

    def __post_init__(self):
        object.__setattr__(self, "psi", _real("DMNormal", "psi", self.psi))
        object.__setattr__(self, "beta", _real("DMNormal", "beta", self.beta))
        if not 0.0 <= self.psi <= 1.0:
            raise ValueError(f"DMNormal: psi must be in [0, 1], got {self.psi!r}")
        if self.beta < 0:
            raise ValueError(f"DMNormal: beta must be >= 0, got {self.beta!r}")

    kernel_id = Kernel.DM_NORMAL

    @property
    def kernel_params(self):
        return (self.psi, self.beta)

    @property
    def emphasis_mode(self):
        return self.psi if self.beta > 0 else None


@dataclass(frozen=True)
class DMExponential(Scheme):
    """DM eq. 10: w(p) = exp(beta * (1 - p)); the DM case lam = 0."""

    beta: float = 8.0

    def __post_init__(self):
        object.__setattr__(self, "beta", _real("DMExponential", "beta", self.beta))

    kernel_id = Kernel.DM

    @property
    def kernel_params(self):
        return (0.0, self.beta)

    @property
    def emphasis_mode(self):
        if self.beta > 0:
            return 0.0
        if self.beta < 0:
            return 1.0
        return None


@dataclass(frozen=True)
class DMBeta(Scheme):
    """DM eq. 11: w(p) = p**(alpha - 1) * (1 - p)**(eta - 1), alpha, eta >= 1."""

    alpha: float = 2.0
    eta: float = 2.0

    def __post_init__(self):
        object.__setattr__(self, "alpha", _real("DMBeta", "alpha", self.alpha))
        object.__setattr__(self, "eta", _real("DMBeta", "eta", self.eta))
        if self.alpha < 1:
            raise ValueError(f"DMBeta: alpha must be >= 1, got {self.alpha!r}")
        if self.eta < 1:
            raise ValueError(f"DMBeta: eta must be >= 1, got {self.eta!r}")

    kernel_id = Kernel.DM_BETA

    @property
    def kernel_params(self):
        return (self.alpha, self.eta)

    @property
    def emphasis_mode(self):
        a, e = self.alpha - 1.0, self.eta - 1.0
        return a / (a + e) if a + e > 0 else None


@dataclass(frozen=True)
class CCE(Scheme):
    """Categorical cross-entropy: L = -log p, w = 2(1 - p). Emphasises hard examples."""

    loss_defined: ClassVar[bool] = True
    kernel_id = Kernel.CCE

    @property
    def kernel_params(self):
        return (0.0, 0.0)

    @property
    def emphasis_mode(self):
        return 0.0


@dataclass(frozen=True)
class MAE(Scheme):
    """Mean absolute error of the probability vector / 2: L = 1 - p, w = 2p(1 - p)."""

    loss_defined: ClassVar[bool] = True
    kernel_id = Kernel.MAE

    @property
    def kernel_params(self):
        return (0.0, 0.0)

    @property
    def emphasis_mode(self):
        return 0.5


@dataclass(frozen=True)
class MSE(Scheme):
    """L = (1 - p)**2, w = 4p(1 - p)**2."""

    loss_defined: ClassVar[bool] = True
    kernel_id = Kernel.MSE

    @property
    def kernel_params(self):
        return (0.0, 0.0)

    @property
    def emphasis_mode(self):
        return 1.0 / 3.0


@dataclass(frozen=True)
class GCE(Scheme):
    """Generalised cross-entropy (Zhang & Sabuncu 2018): L = (1 - p**q) / q, w = 2 p**q (1 - p).

    ``q`` in (0, 1]; q -> 0 approaches CCE, q = 1 is MAE.
    """

    loss_defined: ClassVar[bool] = True
    q: float = 0.7

    def __post_init__(self):
        object.__setattr__(self, "q", _real("GCE", "q", self.q))
        if not 0.0 < self.q <= 1.0:
            raise ValueError(f"GCE: q must be in (0, 1], got {self.q!r}")

    kernel_id = Kernel.GCE

    @property
    def kernel_params(self):
        return (self.q, 0.0)

    @property
    def emphasis_mode(self):
        return self.q / (self.q + 1.0)


# Peer losses that are functions of p alone (issue 7, first part). Each is
# loss-defined: its exact gradient has emphasis w = 2q (-p L'(p)), so it runs
# on the same fused pass as DM. Poly-1, RCE and SCE are one kernel formula,
# L = -a log p + b q with w = 2q (a + b p).


@dataclass(frozen=True)
class Poly1(Scheme):
    """Poly-1 (Leng et al. 2022): L = -log p + epsilon (1 - p), w = 2q (1 + epsilon p).

    ``epsilon >= -1`` keeps the emphasis non-negative; the paper's default is 1.
    """

    loss_defined: ClassVar[bool] = True
    epsilon: float = 1.0

    def __post_init__(self):
        object.__setattr__(self, "epsilon", _real("Poly1", "epsilon", self.epsilon))
        if self.epsilon < -1:
            raise ValueError(f"Poly1: epsilon must be >= -1, got {self.epsilon!r}")

    kernel_id = Kernel.POLY

    @property
    def kernel_params(self):
        return (1.0, self.epsilon)

    @property
    def emphasis_mode(self):
        e = self.epsilon
        return (e - 1) / (2 * e) if e > 1 else 0.0


@dataclass(frozen=True)
class RCE(Scheme):
    """Reverse cross-entropy (Wang et al., ICCV 2019): L = -A (1 - p), w = -2A p q.

    ``A`` is log 0, clipped: -4 in the paper, ln(1e-4) ~ -9.21 in the official
    code (which clamps the one-hot label at 1e-4). ``A < 0``.
    """

    loss_defined: ClassVar[bool] = True
    A: float = -4.0

    def __post_init__(self):
        object.__setattr__(self, "A", _real("RCE", "A", self.A))
        if self.A >= 0:
            raise ValueError(f"RCE: A must be < 0 (it stands for log 0), got {self.A!r}")

    kernel_id = Kernel.POLY

    @property
    def kernel_params(self):
        return (0.0, -self.A)

    @property
    def emphasis_mode(self):
        return 0.5


@dataclass(frozen=True)
class SCE(Scheme):
    """Symmetric cross-entropy (Wang et al., ICCV 2019): alpha CCE + beta RCE(A).

    L = -alpha log p - beta A (1 - p), w = 2q (alpha - beta A p). Paper settings:
    CIFAR-10 alpha=0.1, beta=1; CIFAR-100 alpha=6, beta=0.1; A = -4.
    """

    loss_defined: ClassVar[bool] = True
    alpha: float = 0.1
    beta: float = 1.0
    A: float = -4.0

    def __post_init__(self):
        for name in ("alpha", "beta", "A"):
            object.__setattr__(self, name, _real("SCE", name, getattr(self, name)))
        if self.alpha < 0 or self.beta < 0:
            raise ValueError(f"SCE: alpha and beta must be >= 0, got alpha={self.alpha!r}, beta={self.beta!r}")
        if self.alpha == 0 and self.beta == 0:
            raise ValueError("SCE: alpha and beta cannot both be 0")
        if self.A >= 0:
            raise ValueError(f"SCE: A must be < 0 (it stands for log 0), got {self.A!r}")

    kernel_id = Kernel.POLY

    @property
    def kernel_params(self):
        return (self.alpha, -self.beta * self.A)

    @property
    def emphasis_mode(self):
        a, b = self.kernel_params
        return (b - a) / (2 * b) if b > a else 0.0


@dataclass(frozen=True)
class Focal(Scheme):
    """Focal loss (Lin et al. 2017): L = -(1 - p)**gamma log p, with its true gradient.

    w = 2 q**(gamma + 1) - 2 gamma p q**gamma log p (not the variant that
    detaches the modulating factor). ``gamma = 0`` is CCE.
    """

    loss_defined: ClassVar[bool] = True
    gamma: float = 2.0

    def __post_init__(self):
        object.__setattr__(self, "gamma", _real("Focal", "gamma", self.gamma))
        if self.gamma < 0:
            raise ValueError(f"Focal: gamma must be >= 0, got {self.gamma!r}")

    kernel_id = Kernel.FOCAL

    @property
    def kernel_params(self):
        return (self.gamma, 0.0)

    @property
    def emphasis_mode(self):
        g = self.gamma
        if g == 0:
            return 0.0  # CCE

        def w(p):
            q = 1.0 - p
            plogp = p * math.log(p) if p > 0 else 0.0
            return 2 * q**g * (q - g * plogp)

        return _numeric_mode(w)


@dataclass(frozen=True)
class TaylorCE(Scheme):
    """Taylor cross-entropy (Feng et al. 2020): L = sum_{k=1..order} (1 - p)**k / k.

    w = 2q (1 - q**order); order 1 is MAE, order -> infinity approaches CCE.
    """

    loss_defined: ClassVar[bool] = True
    order: int = 2

    def __post_init__(self):
        object.__setattr__(self, "order", int64_scalar(self.order, "TaylorCE: order"))
        if not 1 <= self.order <= 64:
            raise ValueError(f"TaylorCE: order must be in 1..64, got {self.order!r}")

    kernel_id = Kernel.TAYLOR

    @property
    def kernel_params(self):
        return (float(self.order), 0.0)

    @property
    def emphasis_mode(self):
        t = self.order
        if t == 1:
            return 0.5  # MAE
        return _numeric_mode(lambda p: 2 * (1 - p) * (1 - (1 - p) ** t))


# Peer losses of the whole distribution (issue 7, second part). With
# Lambda = sum_k -log P_k, NCE = -log p / Lambda; their gradient is
# alpha (softmax over non-targets) + beta (constant) off the target, so they
# share the fused pass with one more row reduction (docs/math.md).


@dataclass(frozen=True)
class NCE(Scheme):
    """Normalized cross-entropy (Ma et al., ICML 2020): L = log p / sum_k log P_k.

    ``L`` is in ``[0, 1]``; it is robust to symmetric noise but underfits on
    its own (the paper pairs it with a passive loss: :class:`APL`). With a
    masked (``-inf``) non-target class the denominator is infinite and the
    row contributes 0; a masked target gives 1 (both limits, no gradient).
    Not a function of ``p`` alone, so it has no emphasis ``w(p)``:
    ``normalize=True`` is refused.
    """

    loss_defined: ClassVar[bool] = True
    two_term: ClassVar[bool] = True
    kernel_id = Kernel.NCE

    @property
    def kernel_params(self):
        return (1.0, 0.0)

    @property
    def emphasis_mode(self):
        return None


@dataclass(frozen=True)
class NFL(Scheme):
    """Normalized focal loss (Ma et al., ICML 2020): L = FL(p) / sum_k FL(P_k), FL(P) = -(1-P)^gamma log P.

    ``gamma = 0`` is :class:`NCE`; the paper uses ``gamma = 0.5`` with APL.
    The gradient is the true gradient of this definition, as for
    :class:`Focal`: the authors' code (and the copies of it in circulation)
    detaches the modulating factors ``(1 - P)^gamma`` (``logpt.data``), which
    gives the same value but a gradient that differs by ~10% (relative L2, at
    gamma = 0.5). The gradient has a per-class term ``h(P_j)``, recomputed by
    the backward kernel from the logits (a power, an exp and a division per
    logit, so it costs ~2x DM on the CPU). ``normalize=True`` is refused, as
    for NCE. A masked (``-inf``) non-target class makes the loss 0 (the
    denominator is infinite), a masked target makes it 1, both without
    gradient: the limits.
    """

    loss_defined: ClassVar[bool] = True
    two_term: ClassVar[bool] = True
    gamma: float = 0.5

    def __post_init__(self):
        object.__setattr__(self, "gamma", _real("NFL", "gamma", self.gamma))
        if self.gamma < 0:
            raise ValueError(f"NFL: gamma must be >= 0, got {self.gamma!r}")

    kernel_id = Kernel.NFL

    @property
    def kernel_params(self):
        return (self.gamma, 0.0)

    @property
    def emphasis_mode(self):
        return None


@dataclass(frozen=True)
class APL(Scheme):
    """Active-passive loss (Ma et al., ICML 2020): alpha * active + beta * passive.

    ``active="nce"`` (:class:`NCE`) or ``"nfl"`` (:class:`NFL` with
    ``gamma``); ``passive="rce"`` (reverse cross-entropy ``-A (1 - p)``) or
    ``"mae"`` (``1 - p``, as in the authors' code, which is what their
    ``beta`` values multiply; the paper's text writes MAE as
    ``sum_k |e_y - P|_k = 2 (1 - p)``). Paper settings: CIFAR-10
    ``alpha = beta = 1``; CIFAR-100 ``alpha = 10`` and ``beta = 0.1`` (RCE)
    or ``1`` (MAE); ``gamma = 0.5`` for NFL. To reproduce the authors' code
    use ``A = math.log(1e-4)`` (~ -9.21: their RCE clamps the one-hot label
    at 1e-4); the default ``A = -4`` is :class:`RCE`'s (the SCE paper's value).
    """

    loss_defined: ClassVar[bool] = True
    two_term: ClassVar[bool] = True
    active: str = "nce"
    passive: str = "rce"
    alpha: float = 1.0
    beta: float = 1.0
    A: float = -4.0
    gamma: float = 0.5

    def __post_init__(self):
        if self.active not in ("nce", "nfl"):
            raise ValueError(f"APL: active must be 'nce' or 'nfl', got {self.active!r}")
        if self.passive not in ("rce", "mae"):
            raise ValueError(f"APL: passive must be 'rce' or 'mae', got {self.passive!r}")
        for name in ("alpha", "beta", "A", "gamma"):
            object.__setattr__(self, name, _real("APL", name, getattr(self, name)))
        if self.alpha < 0 or self.beta < 0:
            raise ValueError(f"APL: alpha and beta must be >= 0, got alpha={self.alpha!r}, beta={self.beta!r}")
        if self.alpha == 0 and self.beta == 0:
            raise ValueError("APL: alpha and beta cannot both be 0")
        if self.A >= 0:
            raise ValueError(f"APL: A must be < 0 (it stands for log 0), got {self.A!r}")
        if self.gamma < 0:
            raise ValueError(f"APL: gamma must be >= 0, got {self.gamma!r}")

    def _formula(self) -> Tuple[Kernel, float, float, float]:
        """(kernel, a, b, loss scale): the one place APL's two kernel forms are chosen."""
        passive = self.beta * (-self.A if self.passive == "rce" else 1.0)
        if self.active == "nfl" and self.alpha > 0:
            # The NFL formula takes (gamma, b): alpha NFL + b' q = alpha (NFL + (b'/alpha) q).
            return Kernel.NFL, self.gamma, passive / self.alpha, self.alpha
        if self.active == "nfl":
            return Kernel.NCE, 0.0, passive, 1.0  # alpha = 0: the passive term alone (NCE's formula with a = 0)
        return Kernel.NCE, self.alpha, passive, 1.0

    @property
    def kernel_id(self):
        return self._formula()[0]

    @property
    def kernel_params(self):
        return self._formula()[1:3]

    @property
    def loss_scale(self):
        return self._formula()[3]

    @property
    def emphasis_mode(self):
        return None
