"""Improved precision and recall (Kynkäänniemi et al. 2019) with k-nearest-neighbour manifolds.

Each set's manifold is the union of balls around its samples with radius the distance to the k-th nearest
other sample of the same set. precision = fraction of fake samples inside the real manifold; recall =
fraction of real samples inside the fake manifold. Hand-written: torchmetrics and the other maintained
packages usable here (no torchvision) do not provide it.
"""

from __future__ import annotations

import torch

from diffaccel.errors import UserError
from diffaccel.metrics.fid import _check


def _pairwise_sq_dist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # |a|^2 + |b|^2 - 2 a.b : one matmul instead of an [Na, Nb, D] difference tensor.
    d = (a * a).sum(1, keepdim=True) + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return d.clamp_min_(0.0)


def knn_radii(features: torch.Tensor, k: int = 3, chunk: int = 1024) -> torch.Tensor:
    """Squared distance from each sample to its k-th nearest neighbour in the same set (itself excluded)."""
    if len(features) <= k:
        raise UserError(f"precision/recall with k={k} needs more than {k} samples per set, got {len(features)}")
    out = []
    for start in range(0, len(features), chunk):
        d = _pairwise_sq_dist(features[start:start + chunk], features)
        # the k+1 smallest include the sample itself (distance 0)
        out.append(d.topk(k + 1, dim=1, largest=False).values[:, k])
    return torch.cat(out)


def _coverage(queries: torch.Tensor, support: torch.Tensor, radii: torch.Tensor, chunk: int = 1024) -> float:
    """Fraction of ``queries`` lying within radius of at least one ``support`` sample."""
    inside = 0
    for start in range(0, len(queries), chunk):
        d = _pairwise_sq_dist(queries[start:start + chunk], support)
        inside += int((d <= radii[None, :]).any(dim=1).sum())
    return inside / len(queries)


def precision_recall_from_features(real: torch.Tensor, fake: torch.Tensor, k: int = 3,
                                   max_samples: int | None = 10000, seed: int = 0) -> tuple[float, float]:
    """(precision, recall). Sets larger than ``max_samples`` are subsampled with a fixed seed (the cost is
    quadratic in the set size)."""
    _check(real, fake)
    gen = torch.Generator().manual_seed(seed)
    if max_samples is not None:
        if len(real) > max_samples:
            real = real[torch.randperm(len(real), generator=gen)[:max_samples]]
        if len(fake) > max_samples:
            fake = fake[torch.randperm(len(fake), generator=gen)[:max_samples]]
    real, fake = real.float(), fake.float()
    real_radii, fake_radii = knn_radii(real, k), knn_radii(fake, k)
    precision = _coverage(fake, real, real_radii)
    recall = _coverage(real, fake, fake_radii)
    return precision, recall
