"""Exact epsilon-predictor for Gaussian data N(m, S) under a VP process on any ``alpha_bars`` grid.

With x_k = sqrt(a) x0 + sqrt(1 - a) eps (a = alpha_bars[k]), x_k and eps are jointly Gaussian, so
E[eps | x_k] = sqrt(1 - a) C^-1 (x_k - sqrt(a) m), C = a S + (1 - a) I. With S = U diag(lam) U^T this is
diagonal in U: C^-1 = U diag(1 / (a lam + 1 - a)) U^T. Written by hand: no library ships a closed-form denoiser.
"""

from __future__ import annotations

import torch
from torch import nn

from diffaccel.errors import UserError


def eigendecompose(mean: torch.Tensor, cov: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validated N(mean, cov) in its eigenbasis, float64: (flattened mean, eigenvalues >= 0, orthonormal basis)."""
    d = mean.numel()
    if cov.shape != (d, d):
        raise UserError(f"covariance must be {d}x{d} for a mean of {d} values, got {tuple(cov.shape)}")
    lam, basis = torch.linalg.eigh(cov.double())
    if lam.min() < -1e-8 * lam.abs().max().clamp(min=1.0):
        raise UserError("covariance is not positive semi-definite")
    return mean.double().flatten(), lam.clamp(min=0), basis


class GaussianVPEpsilon(nn.Module):
    """``net(x, k)`` returning the exact E[eps | x_k] for images of ``shape`` whose flattened law is N(mean, cov)."""

    def __init__(self, mean: torch.Tensor, cov: torch.Tensor, alpha_bars: torch.Tensor, shape: tuple[int, ...]):
        super().__init__()
        flat_mean, lam, basis = eigendecompose(mean, cov)
        self.shape = tuple(shape)
        self.register_buffer("mean", flat_mean)
        self.register_buffer("lam", lam)
        self.register_buffer("basis", basis)
        self.register_buffer("alpha_bars", alpha_bars.double())

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = self.alpha_bars[t.round().long()].unsqueeze(1)                 # [B, 1]
        centred = x.double().flatten(1) - a.sqrt() * self.mean
        coeff = (1 - a).sqrt() / (a * self.lam + 1 - a)                    # [B, D] in the eigenbasis
        eps = ((centred @ self.basis) * coeff) @ self.basis.T
        return eps.to(x.dtype).view(x.shape)
