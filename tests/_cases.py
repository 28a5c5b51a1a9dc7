"""Cases shared by the parity, edge and CUDA test files."""

import torch

from robustloss_fast.schemes import CCE, DM, GCE, IMAE, MAE, MSE, DMBeta, DMExponential, DMNormal

# Every scheme of SPEC §4 (the peer losses are listed where they are tested).
SCHEMES = [
    CCE(),
    MAE(),
    MSE(),
    GCE(),
    DM(),
    DM(lam=0.5, beta=12.0),
    DM(lam=0.0, beta=-3.0),
    IMAE(),
    DMNormal(psi=0.3, beta=4.0),
    DMExponential(),
    # alpha != eta, so swapping the two kernel parameters cannot go unnoticed.
    DMBeta(alpha=2.0, eta=3.0),
]
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
