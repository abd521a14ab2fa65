"""fit_gaussian recovers known covariances: full for small images, DCT-diagonal for large ones."""

import pytest
import torch
from scipy.fft import dctn

from diffaccel.errors import UserError
from diffaccel.oracle.fit import fit_gaussian


def test_full_covariance_of_synthetic_set_recovered():
    g = torch.Generator().manual_seed(0)
    d, n = 16, 200_000
    a = torch.randn(d, d, generator=g, dtype=torch.float64) / 4
    cov = a @ a.T + 0.05 * torch.eye(d, dtype=torch.float64)
    mean = torch.linspace(-1, 1, d, dtype=torch.float64)
    x = mean + torch.randn(n, d, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(cov).T
    fit = fit_gaussian(x.reshape(n, 1, 4, 4))
    assert fit.basis is not None
    # Sample-covariance standard error ~ sqrt(2/n) * scale: 5 sigma of that bounds the entrywise error.
    scale = cov.diag().max()
    assert (fit.covariance() - cov).abs().max() < 5 * (2 / n) ** 0.5 * scale
    assert (fit.mean - mean).abs().max() < 5 * (scale / n) ** 0.5


def test_dct_diagonal_fit_matches_diagonal_in_dct_construction():
    g = torch.Generator().manual_seed(1)
    c, h, w, n = 2, 8, 8, 40_000
    var = torch.rand(c, h, w, generator=g, dtype=torch.float64) + 0.1
    coeffs = torch.randn(n, c, h, w, generator=g, dtype=torch.float64) * var.sqrt()
    from scipy.fft import idctn
    x = torch.from_numpy(idctn(coeffs.numpy(), norm="ortho", axes=(-2, -1))) + 0.3
    fit = fit_gaussian(x, full_max_pixels=64)           # 128 values per image > 64: diagonal DCT fit
    assert fit.basis is None
    # Variance estimate relative standard error sqrt(2/n): 5 sigma.
    assert ((fit.variances - var.flatten()) / var.flatten()).abs().max() < 5 * (2 / n) ** 0.5
    # The dense covariance is the DCT-diagonal one: cov = D^T diag(v) D with D the per-channel DCT.
    d = c * h * w
    eye = torch.eye(d, dtype=torch.float64).reshape(d, c, h, w).numpy()
    dmat = torch.from_numpy(dctn(eye, norm="ortho", axes=(-2, -1))).reshape(d, d).T   # column j = DCT of pixel j
    expected = dmat.T @ torch.diag(fit.variances) @ dmat
    assert torch.allclose(fit.covariance(), expected, atol=1e-12)
    # Round trip and exact draws have the fitted moments.
    assert torch.allclose(fit.from_coeffs(fit.to_coeffs(x[:5].flatten(1))), x[:5].flatten(1), atol=1e-12)
    s = fit.sample(40_000, generator=torch.Generator().manual_seed(2))
    assert ((fit.to_coeffs(s - fit.mean).var(0) - fit.variances) / fit.variances).abs().max() < 5 * (2 / 40_000) ** 0.5


def test_bad_images_refused():
    with pytest.raises(UserError):
        fit_gaussian(torch.zeros(1, 1, 4, 4))
    with pytest.raises(UserError):
        fit_gaussian(torch.full((3, 1, 2, 2), float("nan")))
