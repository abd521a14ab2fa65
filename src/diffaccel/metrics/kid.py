"""Kernel Inception Distance (Binkowski et al. 2018) on precomputed features, via torchmetrics.

Unbiased MMD^2 with the cubic polynomial kernel k(x, y) = (x.y / D + 1)^3, averaged over random subsets.
"""

from __future__ import annotations

import warnings

import torch
from torchmetrics.image.kid import KernelInceptionDistance

from diffaccel.metrics.fid import PrecomputedFeatures, _check


def kid_from_features(real: torch.Tensor, fake: torch.Tensor, subsets: int = 20, subset_size: int = 1000,
                      seed: int = 0) -> tuple[float, float]:
    """(mean, std) of KID over ``subsets`` random subsets of ``min(subset_size, N_real, N_fake)`` samples.

    The subsets are drawn from a fixed seed (torchmetrics uses the global RNG; we fork it) so a score is
    reproducible."""
    _check(real, fake)
    size = min(subset_size, len(real), len(fake))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        metric = KernelInceptionDistance(feature=PrecomputedFeatures(real.shape[1]), subsets=subsets,
                                         subset_size=size)
    # float32: kernel values are O(1) and KID is their mean difference; float64 doubles the cost for nothing.
    metric.update(real.float(), real=True)
    metric.update(fake.float(), real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)
