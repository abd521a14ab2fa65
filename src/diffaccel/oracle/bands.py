"""Closed-form sample metrics against a Gaussian target, split into low / mid / high DCT frequency bands.

Each band is the span of the orthonormal 2-D DCT-II basis images whose (row + column) frequency falls in its
third of the range; per band we report the Gaussian W2 (Frechet) distance between the samples' moments and the
target's, and the ratio of produced to target total variance.
"""

from __future__ import annotations

import torch
from scipy.fft import dct

from diffaccel.metrics.fid import frechet_distance

BANDS = ("low", "mid", "high")


def dct_basis(h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormal 2-D DCT matrix [h*w, h*w] (rows = basis images, flattened) and each row's band index 0/1/2."""
    rows = torch.from_numpy(dct(torch.eye(h).numpy(), norm="ortho", axis=0)).double()
    cols = torch.from_numpy(dct(torch.eye(w).numpy(), norm="ortho", axis=0)).double()
    basis = torch.kron(rows, cols)
    freq = (torch.arange(h)[:, None] + torch.arange(w)[None, :]).flatten().double() / max(h + w - 2, 1)
    return basis, torch.clamp((freq * 3).long(), max=2)


def band_metrics(samples: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor, h: int, w: int) -> dict:
    """Per band: {'frechet': W2^2 of moments, 'var_ratio': produced / target variance} for samples [n, h*w]."""
    basis, band = dct_basis(h, w)
    coeffs = samples.double().flatten(1) @ basis.T
    t_mean, t_cov = basis @ mean.double().flatten(), basis @ cov.double() @ basis.T
    out = {}
    for b, name in enumerate(BANDS):
        sel = band == b
        c = coeffs[:, sel]
        s_cov, tc = torch.atleast_2d(torch.cov(c.T)), t_cov[sel][:, sel]
        out[name] = {"frechet": frechet_distance(c.mean(0), s_cov, t_mean[sel], tc),
                     "var_ratio": float(s_cov.trace() / tc.trace())}
    return out
