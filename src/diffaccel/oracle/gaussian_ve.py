"""Exact VE score for Gaussian data N(m, S): y_sigma = x0 + sigma * xi has law N(m, S + sigma^2 I), so

    grad log p_sigma(y) = -(S + sigma^2 I)^-1 (y - m) = -U diag(1 / (lam + sigma^2)) U^T (y - m)

with S = U diag(lam) U^T. Written by hand: no library ships a closed-form score.
"""

from __future__ import annotations

import torch

from diffaccel.oracle.gaussian_vp import eigendecompose


class GaussianVEScore:
    """``score(y, sigma)`` for images of any shape whose flattened law is N(mean, cov); sigma is [B] or a scalar."""

    def __init__(self, mean: torch.Tensor, cov: torch.Tensor):
        self.mean, self.lam, self.basis = eigendecompose(mean, cov)

    @classmethod
    def fit(cls, images: torch.Tensor) -> "GaussianVEScore":
        """The Gaussian with the sample mean and covariance of ``images`` [n, ...]."""
        flat = images.double().flatten(1)
        return cls(flat.mean(0), torch.cov(flat.T))

    def __call__(self, y: torch.Tensor, sigma) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1)      # [B or 1, 1]
        centred = (y.double().flatten(1) - self.mean) @ self.basis
        score = -(centred / (self.lam + sigma ** 2)) @ self.basis.T
        return score.to(y.dtype).view(y.shape)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        z = torch.randn(n, self.mean.numel(), generator=generator, dtype=torch.float64)
        return self.mean + (z * self.lam.sqrt()) @ self.basis.T
