"""A Gaussian fitted to a real image set, so the exact-score testbed carries the dataset's spectrum.

Small images (at most ``FULL_COV_MAX_PIXELS`` values per image) get the sample mean and full sample covariance.
Larger ones get the sample mean and a covariance that is diagonal in the orthonormal 2-D DCT-II basis (applied
per channel): natural images are close to stationary, and stationary covariances are nearly diagonal there, while
a full d x d covariance would not fit in memory. Either way the fit is stored as orthonormal directions and their
variances, cov = basis^T diag(variances) basis, which is what the closed-form denoisers diagonalise anyway.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from scipy.fft import dctn, idctn

from diffaccel.errors import UserError

FULL_COV_MAX_PIXELS = 32 * 32


@dataclass
class GaussianFit:
    """N(mean, cov) over images of ``shape``; ``basis`` is None when the fit is diagonal in the per-channel DCT."""

    mean: torch.Tensor            # [d], float64, flattened image
    variances: torch.Tensor       # [d], float64, >= 0: eigenvalues (full) or DCT-coefficient variances (diagonal)
    basis: torch.Tensor | None    # [d, d] orthonormal rows (eigenvectors) for the full fit
    shape: tuple[int, ...]

    def to_coeffs(self, x: torch.Tensor) -> torch.Tensor:
        """Coordinates [n, d] of flattened images ``x`` [n, d] in the fit's orthonormal directions."""
        if self.basis is not None:
            return x.double() @ self.basis.T
        img = x.double().reshape(-1, *self.shape).numpy()
        return torch.from_numpy(dctn(img, norm="ortho", axes=(-2, -1))).reshape(x.shape[0], -1)

    def from_coeffs(self, c: torch.Tensor) -> torch.Tensor:
        """Inverse of ``to_coeffs``: flattened images [n, d]."""
        if self.basis is not None:
            return c.double() @ self.basis
        img = c.double().reshape(-1, *self.shape).numpy()
        return torch.from_numpy(idctn(img, norm="ortho", axes=(-2, -1))).reshape(c.shape[0], -1)

    def covariance(self) -> torch.Tensor:
        """Dense d x d covariance (for the full fit, or a diagonal fit small enough to hold)."""
        d = self.mean.numel()
        if self.basis is None:
            rows = self.to_coeffs(torch.eye(d, dtype=torch.float64))   # row i = DCT coefficients of pixel i
            return rows @ torch.diag(self.variances) @ rows.T
        return self.basis.T @ torch.diag(self.variances) @ self.basis

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n exact draws [n, d] from the fitted Gaussian."""
        z = torch.randn(n, self.mean.numel(), dtype=torch.float64, generator=generator)
        return self.mean + self.from_coeffs(z * self.variances.sqrt())


def fit_gaussian(images: torch.Tensor, full_max_pixels: int = FULL_COV_MAX_PIXELS) -> GaussianFit:
    """Fit N(mean, cov) to ``images`` [n, c, h, w] (or [n, h, w]): full covariance when c*h*w <= full_max_pixels."""
    if images.dim() == 3:
        images = images.unsqueeze(1)
    if images.dim() != 4 or images.shape[0] < 2:
        raise UserError(f"fit_gaussian needs images [n>=2, c, h, w], got {tuple(images.shape)}")
    if not torch.isfinite(images).all():
        raise UserError("fit_gaussian: images contain NaN or inf")
    shape = tuple(images.shape[1:])
    flat = images.double().flatten(1)
    mean = flat.mean(0)
    if flat.shape[1] <= full_max_pixels:
        lam, vecs = torch.linalg.eigh(torch.cov(flat.T))
        return GaussianFit(mean, lam.clamp(min=0), vecs.T.contiguous(), shape)
    fit = GaussianFit(mean, torch.empty(0), None, shape)
    coeffs = fit.to_coeffs(flat - mean)
    fit.variances = coeffs.pow(2).sum(0) / (flat.shape[0] - 1)   # unbiased, same normalisation as torch.cov
    return fit


def fit_dataset(spec: str, resolution: int | None = None, limit: int | None = None) -> GaussianFit:
    """``fit_gaussian`` of a dataset ``load_dataset`` knows (e.g. ``"mnist5k"``, ``"digits"``), in model space [-1, 1]."""
    from diffaccel.data import load_dataset

    data = load_dataset(spec, resolution, limit=limit)
    return fit_gaussian(data.to_model_space(data.images))
