"""robustloss_fast: fused, noise-robust drop-in replacements for cross-entropy.

DM / IMAE example weighting (Wang et al.) and the losses they generalise,
with fused C++ (CPU), CUDA and Triton kernels behind one API.
"""

from . import distributed, schemes
from ._common import set_validate_targets, validating_targets
from .backends import available_backends
from .elr import ELRLoss
from .analysis import EmphasisStats, ExampleWeights, emphasis_stats, example_weights
from .functional import dm_loss, imae_loss, robust_cross_entropy
from .linear import LinearRobustCrossEntropyLoss, linear_robust_cross_entropy
from .modules import DMLoss, IMAELoss, RobustCrossEntropyLoss
from .schemes import (
    CCE,
    DM,
    GCE,
    IMAE,
    MAE,
    MSE,
    RCE,
    SCE,
    DMBeta,
    DMExponential,
    DMNormal,
    Focal,
    Poly1,
    Scheme,
    TaylorCE,
)

__version__ = "0.1.0"

__all__ = [
    "schemes",
    "distributed",
    "robust_cross_entropy",
    "linear_robust_cross_entropy",
    "LinearRobustCrossEntropyLoss",
    "dm_loss",
    "imae_loss",
    "RobustCrossEntropyLoss",
    "DMLoss",
    "IMAELoss",
    "ELRLoss",
    "available_backends",
    "set_validate_targets",
    "validating_targets",
    "example_weights",
    "ExampleWeights",
    "emphasis_stats",
    "EmphasisStats",
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
]
