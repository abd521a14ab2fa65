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


# --- the fit drives the exact nets ---------------------------------------------------------------------------------
def test_exact_epsilon_of_fitted_digits_is_the_closed_form_and_denoises_at_small_t():
    """On scikit-learn's digits, the fitted Gaussian's exact eps equals sqrt(1-a)(aS + (1-a)I)^-1 (x - sqrt(a) m)
    computed here by a dense solve (no eigendecomposition), at small and large t; at t = 1 its Tweedie estimate
    x0 = (x - sqrt(1-a) eps)/sqrt(a) of a noised training image is within the noise scale of that image."""
    from diffaccel.oracle.fit import fit_dataset
    from diffaccel.oracle.gaussian_vp import GaussianVPEpsilon
    from diffaccel.schedules import linear_schedule
    from diffaccel.data import load_dataset

    fit = fit_dataset("digits")
    cov = fit.covariance()
    ab = linear_schedule(1000).double()
    net = GaussianVPEpsilon(fit.mean, cov, ab, (1, 8, 8))
    data = load_dataset("digits")
    x0 = data.to_model_space(data.images[:64]).double()
    g = torch.Generator().manual_seed(5)
    for k in (1, 10, 500, 1000):
        a = ab[k]
        noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
        xk = a.sqrt() * x0 + (1 - a).sqrt() * noise
        got = net(xk, torch.full((64,), float(k))).flatten(1)
        C = a * cov + (1 - a) * torch.eye(64, dtype=torch.float64)
        want = (1 - a).sqrt() * torch.linalg.solve(C, (xk.flatten(1) - a.sqrt() * fit.mean).T).T
        assert torch.allclose(got, want, rtol=1e-6, atol=1e-8), k
        if k == 1:   # noise std 0.01: the denoised image is no farther from x0 than the noise that was added
            x0_hat = (xk.flatten(1) - (1 - a).sqrt() * got) / a.sqrt()
            assert ((x0_hat - x0.flatten(1)).norm(dim=1) <= (1 - a).sqrt() * noise.flatten(1).norm(dim=1) + 1e-9).all()


def test_ddpm_1000_on_the_fitted_digits_gaussian_reproduces_it_per_band():
    """DDPM-1000 driven by the exact eps of the Gaussian fitted to digits: per DCT band the produced variance is
    the target's within 5 Monte-Carlo standard errors (``_ratio_tol``), and the overall Fréchet distance is within 3x the
    distance of n exact draws from the target (the finite-sample floor)."""
    from diffaccel.metrics.fid import frechet_distance
    from diffaccel.oracle.bands import band_metrics
    from diffaccel.oracle.fit import fit_dataset
    from diffaccel.oracle.gaussian_vp import GaussianVPEpsilon
    from diffaccel.samplers import ddim, ddpm
    from diffaccel.schedules import linear_schedule

    fit = fit_dataset("digits")
    cov, n = fit.covariance(), 4000
    ab = linear_schedule(1000).double()
    net = GaussianVPEpsilon(fit.mean, cov, ab, (1, 8, 8))
    g = torch.Generator().manual_seed(6)
    x = ddpm(net, torch.randn(n, 1, 8, 8, generator=g, dtype=torch.float64), ab, generator=g,
             progress=False).flatten(1)
    floor = frechet_distance(*_moments(fit.sample(n, generator=g)), fit.mean, cov)
    assert frechet_distance(*_moments(x), fit.mean, cov) < 3 * floor
    for name, band in band_metrics(x, fit.mean, cov, 8, 8).items():
        assert abs(band["var_ratio"] - 1) < _ratio_tol(cov, name, n), (name, band)
    # the same closed form sees a sampler that is too coarse: DDIM-3 (eta 1) misses the high band by far more
    x3 = ddim(net, torch.randn(n, 1, 8, 8, generator=g, dtype=torch.float64), ab, 3, eta=1.0, generator=g,
              progress=False).flatten(1)
    assert frechet_distance(*_moments(x3), fit.mean, cov) > 10 * floor


def test_dvdp_exact_epsilon_of_fitted_digits_reproduces_the_target_through_its_sampler():
    """DVDP's DDPM sampler (T1 = 600, 8x8 -> 4x4) on the exact per-subspace eps of the fitted digits Gaussian
    ends at the data covariance: variance ratio within 5 Monte-Carlo standard errors plus 0.01 in every band. The
    sampler runs in float64 (in float32 it loses a further 1-2 % of variance); the 0.01 covers the small
    under-dispersion of ancestral sampling with the posterior variance (1-2.5 % in the high band at 1000 steps,
    measured for DDPM too)."""
    from diffaccel.methods.dvdp import DVDP
    from diffaccel.oracle.bands import band_metrics
    from diffaccel.oracle.dvdp_exact import DVDPExactEpsilon
    from diffaccel.oracle.fit import fit_dataset

    fit = fit_dataset("digits")
    cov, n = fit.covariance(), 4000
    method = DVDP((600,))
    net = DVDPExactEpsilon(method, fit.mean, cov, (1, 8, 8))
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)      # the sampler draws its noise in the default dtype
    try:
        x = method.sample(net, n, (1, 8, 8), generator=torch.Generator().manual_seed(7), sampler="ddpm",
                          progress=False)
    finally:
        torch.set_default_dtype(previous)
    for name, band in band_metrics(x.flatten(1), fit.mean, cov, 8, 8).items():
        assert abs(band["var_ratio"] - 1) < _ratio_tol(cov, name, n) + 0.01, (name, band)


def _ratio_tol(cov, band_name, n, z=5.0):
    """z standard errors of a band's produced / target variance from n Gaussian draws: the band's total sample
    variance tr(S_b) has variance 2 tr(C_b²)/n, so the ratio's std is sqrt(2 tr(C_b²)/n) / tr(C_b)."""
    from diffaccel.oracle.bands import BANDS, dct_basis

    basis, band = dct_basis(8, 8)
    sel = band == BANDS.index(band_name)
    cb = (basis @ cov @ basis.T)[sel][:, sel]
    return z * (2 * (cb @ cb).trace() / n).sqrt().item() / cb.trace().item()


def _moments(x):
    return x.mean(0), torch.cov(x.T)
