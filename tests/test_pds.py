"""PDS filters, preconditioner algebra, stationarity (Theorems 1/2), VE score samplers, the VP extension."""

import math

import numpy as np
import pytest
import torch

from diffaccel.errors import UserError
from diffaccel.methods.pds import (Preconditioner, ShiftSolenoid, frequency_filter, pds_filter_main, radial_filter,
                                   space_filter)
from diffaccel.methods.score_ve import ScoreVE, max_pairwise_distance, sigma_max_from_data
from diffaccel.samplers import preconditioned_ddim
from diffaccel.samplers_score import ald_sampler, pc_sampler, ve_sigmas


def _smooth_images(n=64, c=1, h=8, w=8, seed=0):
    """Images in [-1, 1] with image-like statistics (a bright blob on a dark background)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    cy = h / 2 + torch.randn(n, 1, 1, 1, generator=g)
    cx = w / 2 + torch.randn(n, 1, 1, 1, generator=g)
    blob = torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * (h / 5) ** 2))
    return (2 * blob.expand(n, c, h, w) - 1 + 0.05 * torch.randn(n, c, h, w, generator=g)).clamp(-1, 1)


def _random_symmetric_freq(shape, lo=1.0, hi=1.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = torch.rand(shape, generator=g, dtype=torch.float64)
    h, w = shape[-2:]
    r = (r + r[..., (-torch.arange(h)) % h, :][..., (-torch.arange(w)) % w]) / 2  # R(k) = R(-k)
    return lo + (hi - lo) * r


def _dense_operators(freq, space):
    """M, computed independently as dense matrices with numpy's DFT matrices (row-major pixels)."""
    h, w = freq.shape[-2:]
    fh = np.exp(-2j * np.pi * np.outer(np.arange(h), np.arange(h)) / h)
    fw = np.exp(-2j * np.pi * np.outer(np.arange(w), np.arange(w)) / w)
    f2 = np.kron(fh, fw)
    m = np.linalg.inv(f2) @ np.diag(freq.numpy().reshape(-1)) @ f2 @ np.diag(space.numpy().reshape(-1))
    return m


# --- filters ---------------------------------------------------------------------------------------------------
def test_frequency_filter_range_and_unit_at_highest_power():
    images = _smooth_images(200, h=16, w=16)
    r = frequency_filter(images, alpha=5.0)
    assert r.shape == (1, 16, 16)
    assert r.min() >= 1.0 - 1e-6 and r.max() <= 1.25 + 1e-6
    power = torch.fft.fft2((images.double() + 1) / 2).abs().square().mean(0)
    peak = power.reshape(-1).argmax()
    assert r.reshape(-1)[peak] == pytest.approx(1.0, abs=1e-6)
    assert peak == 0  # the DC term (no fftshift)
    # independent computation of eq. 22
    m = np.log1p(power.numpy())
    m = (m / m.max() + 4.0) / 5.0
    np.testing.assert_allclose(r.numpy(), 1.0 / m, rtol=1e-5)
    # R(k) = R(-k): the preconditioner is real
    np.testing.assert_allclose(r.numpy(), np.roll(np.flip(r.numpy(), (-2, -1)), (1, 1), (-2, -1)), rtol=1e-6)


def test_frequency_filter_alpha_controls_range():
    r = frequency_filter(_smooth_images(50), alpha=10.0)
    assert r.max() <= 10 / 9 + 1e-6 and r.min() >= 1.0 - 1e-6
    with pytest.raises(UserError):
        frequency_filter(_smooth_images(4), alpha=1.0)


def test_space_filter():
    images = _smooth_images(100)
    a = space_filter(images, alpha=5.0)
    mean_sq = ((images + 1) / 2).square().mean(0)
    assert a.min() >= 1 - 1e-6 and a.max() <= 1.25 + 1e-6
    assert a.reshape(-1)[mean_sq.reshape(-1).argmax()] == pytest.approx(1.0, abs=1e-6)
    # darker pixels on average get larger A
    assert a.reshape(-1)[mean_sq.reshape(-1).argmin()] > 1.1


def test_radial_filter_eq20():
    r = radial_filter((1, 10, 10), r=2.0, lam=1.6)
    shifted = torch.fft.fftshift(r, dim=(-2, -1))[0]
    for h in range(10):
        for w in range(10):
            inside = (h - 5) ** 2 + (w - 5) ** 2 <= 2 * 2.0 ** 2
            assert shifted[h, w].item() == pytest.approx(1.0 if inside else 1.6)
    assert r[0, 0, 0] == 1.0  # DC inside
    Preconditioner(freq=r)  # symmetric: accepted as a real preconditioner


# --- preconditioner algebra ------------------------------------------------------------------------------------
def test_preconditioner_matches_dense_matrix_and_documented_transpose():
    freq = _random_symmetric_freq((1, 4, 6))
    space = 1 + 0.3 * torch.rand(1, 4, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    m = _dense_operators(freq, space)
    assert np.abs(m.imag).max() < 1e-10  # real operator
    m = m.real
    pre = Preconditioner(freq, space)
    v = torch.randn(5, 1, 4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    flat = v.reshape(5, -1).numpy()
    np.testing.assert_allclose(pre.apply(v).reshape(5, -1).numpy(), flat @ m.T, atol=1e-10)
    np.testing.assert_allclose(pre.apply_transpose(v).reshape(5, -1).numpy(), flat @ m, atol=1e-10)
    np.testing.assert_allclose(pre.apply_gram(v).reshape(5, -1).numpy(), flat @ (m @ m.T).T, atol=1e-10)
    # M·Mᵀ is not Mᵀ·M when A is not constant: the order matters and is the documented one
    assert np.abs(m @ m.T - m.T @ m).max() > 1e-3
    assert pre.apply(v).dtype == torch.float64 and not pre.apply(v).is_complex()


def test_preconditioner_rejects_asymmetric_or_wrong_filters():
    with pytest.raises(UserError):
        Preconditioner(freq=torch.rand(1, 4, 4) + 1 + torch.arange(16.).view(1, 4, 4))
    with pytest.raises(UserError):
        Preconditioner(space=-torch.ones(1, 4, 4))
    with pytest.raises(UserError):
        Preconditioner(freq=torch.ones(1, 4, 4)).check_shape((1, 8, 8))


def test_solenoid_is_skew_symmetric_and_frequency_variant_vanishes():
    s = ShiftSolenoid((1, 2), omega=3.0)
    u, v = torch.randn(2, 1, 5, 6, dtype=torch.float64).unbind(0)
    assert (u * s(v)).sum().item() == pytest.approx(-(s(u) * v).sum().item(), abs=1e-10)
    # S4-S6 of eq. 24: Re[F (P - Pᵀ) F⁻¹] x = 0 for real x (documented reason they are not offered)
    x = torch.randn(1, 5, 6, dtype=torch.float64)
    inner = torch.fft.ifft2(x)
    rolled = torch.roll(inner, (1, 2), (-2, -1)) - torch.roll(inner, (-1, -2), (-2, -1))
    assert torch.fft.fft2(rolled).real.abs().max() < 1e-12


def test_save_load_roundtrip(tmp_path):
    pre = Preconditioner(frequency_filter(_smooth_images(20)), space_filter(_smooth_images(20)))
    pre.save(tmp_path / "f.safetensors", alpha=5)
    back = Preconditioner.load(tmp_path / "f.safetensors", use_space=True)
    assert torch.equal(back.freq, pre.freq) and torch.equal(back.space, pre.space)
    assert Preconditioner.load(tmp_path / "f.safetensors", use_space=False).space is None
    (tmp_path / "bad.safetensors").write_bytes(b"not a file")
    with pytest.raises(UserError):
        Preconditioner.load(tmp_path / "bad.safetensors")
    with pytest.raises(UserError):
        Preconditioner.load(tmp_path / "missing.safetensors")


# --- stationarity (Theorems 1 and 2) ---------------------------------------------------------------------------
def _gaussian_target(d=16, seed=0, lo=0.3, hi=1.5):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    cov = q @ torch.diag(torch.linspace(lo, hi, d, dtype=torch.float64)) @ q.T
    mean = 0.5 * torch.randn(d, generator=g, dtype=torch.float64)
    return mean, cov


def _langevin(pre, drift_pre, mean, cov, n=1500, burn_in=400, snapshots=10, every=20, delta=0.02, seed=0):
    """Euler–Maruyama Langevin x ← x + (δ/2)·D(score) + √δ·M·ξ; moments pooled over snapshots after burn-in."""
    prec = torch.linalg.inv(cov)
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, 1, 4, 4, dtype=torch.float64)
    pooled = []
    for step in range(burn_in + snapshots * every):
        score = (-(x.reshape(n, -1) - mean) @ prec).reshape(x.shape)
        z = torch.randn(x.shape, generator=g, dtype=torch.float64)
        x = x + 0.5 * delta * drift_pre(score) + delta ** 0.5 * pre.apply(z)
        if step >= burn_in and (step - burn_in) % every == every - 1:
            pooled.append(x.reshape(n, -1))
    flat = torch.cat(pooled)
    return flat.mean(0), torch.cov(flat.T)


def test_preconditioned_langevin_keeps_the_stationary_distribution():
    """Theorem 1 by Monte Carlo: 1500 chains on a correlated 16-d Gaussian (eigenvalues 0.5–1), step 0.02,
    400 burn-in steps, moments pooled over 10 snapshots 20 steps apart. Tolerance 0.08 on every mean and
    covariance entry (measured: 0.034 and 0.026; Euler bias ≈ δ·λ_max(MMᵀC⁻¹)/4 ≲ 2 % of the variance).
    The negative control (noise preconditioned, score not) misses the covariance by ≈ 0.5."""
    mean, cov = _gaussian_target(lo=0.5, hi=1.0)
    pre = Preconditioner(_random_symmetric_freq((1, 4, 4), 1.0, 1.25),
                         1 + 0.1 * torch.rand(1, 4, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64),
                         solenoid=ShiftSolenoid((1, 1), omega=0.3))
    m, c = _langevin(pre, pre.apply_gram, mean, cov)
    assert (m - mean).abs().max() < 0.08
    assert (c - cov).abs().max() < 0.08
    # negative control: preconditioning the noise without M·Mᵀ on the score changes the distribution
    _, c_wrong = _langevin(pre, lambda s: s, mean, cov, n=1000, snapshots=2)
    assert (c_wrong - cov).abs().max() > 0.2


# --- VE samplers -----------------------------------------------------------------------------------------------
def _gaussian_score(var=0.2, mean=0.3):
    return lambda x, sigma: -(x - mean) / (var + sigma.view(-1, 1, 1, 1) ** 2)


def test_ve_sigmas():
    s = ve_sigmas(0.01, 50.0, 5)
    assert s[0] == pytest.approx(50.0) and s[-1] == pytest.approx(0.01)
    ratios = s[1:] / s[:-1]
    assert torch.allclose(ratios, ratios[0].expand_as(ratios))
    with pytest.raises(UserError):
        ve_sigmas(0.01, 50.0, 0)


@pytest.mark.parametrize("sampler", [pc_sampler, ald_sampler])
def test_identity_filters_reproduce_vanilla_samplers(sampler):
    sigmas = ve_sigmas(0.01, 5.0, 12)
    ones = Preconditioner(torch.ones(1, 8, 8), torch.ones(1, 8, 8))
    kwargs = {"step_lr": 1e-4} if sampler is ald_sampler else {}
    a = sampler(_gaussian_score(), (4, 1, 8, 8), sigmas, generator=torch.Generator().manual_seed(0), **kwargs)
    b = sampler(_gaussian_score(), (4, 1, 8, 8), sigmas, preconditioner=ones,
                generator=torch.Generator().manual_seed(0), **kwargs)
    assert a.shape == (4, 1, 8, 8)
    assert torch.equal(a, b)  # identity filters are skipped: bit for bit (more cases in test_ve_samplers.py)
    c = sampler(_gaussian_score(), (4, 1, 8, 8), sigmas, preconditioner=Preconditioner(radial_filter((1, 8, 8), 1.5, 1.6)),
                generator=torch.Generator().manual_seed(0), **kwargs)
    assert (a - c).abs().max() > 1e-3  # a real preconditioner changes the trajectory


def test_pc_sampler_hits_gaussian_target():
    """With the exact score of N(0.3, 0.2·I), PC sampling (40 levels) gives mean 0.3 ± 0.03 and var 0.2 ± 0.03."""
    sigmas = ve_sigmas(0.01, 5.0, 40)
    for pre in (None, Preconditioner(radial_filter((1, 8, 8), 1.5, 1.6))):
        x = pc_sampler(_gaussian_score(), (300, 1, 8, 8), sigmas, preconditioner=pre, denoise=False,
                       generator=torch.Generator().manual_seed(1))
        assert x.mean().item() == pytest.approx(0.3, abs=0.03)
        assert x.var().item() == pytest.approx(0.2, abs=0.03)


# --- VP extension ----------------------------------------------------------------------------------------------
def _vp_eps_fn(alpha_bars, mean, cov):
    d = mean.numel()
    # exact: x_k ~ N(√ᾱ μ, ᾱ C + (1 − ᾱ) I), ε = √(1 − ᾱ)·Cov_k⁻¹ (x − √ᾱ μ)
    inv = torch.linalg.inv(alpha_bars[:, None, None] * cov + (1 - alpha_bars)[:, None, None] * torch.eye(d))

    def eps_fn(x, k):
        i = int(k[0].item())
        ab = alpha_bars[i]
        flat = x.reshape(x.shape[0], -1) - ab.sqrt() * mean
        return ((1 - ab).sqrt() * flat @ inv[i]).reshape(x.shape)

    return eps_fn


def test_preconditioned_ddim_identity_reproduces_ddim():
    from diffaccel.samplers import ddim
    from diffaccel.schedules import linear_schedule

    ab = linear_schedule(1000)
    mean, cov = _gaussian_target()
    eps_fn = _vp_eps_fn(ab, mean, 0.1 * cov)
    x_T = torch.randn(8, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for eta in (0.0, 0.5, 1.0):
        a = ddim(eps_fn, x_T, ab, 25, eta=eta, generator=torch.Generator().manual_seed(1), progress=False)
        b = preconditioned_ddim(eps_fn, x_T, ab, 25, eta=eta, generator=torch.Generator().manual_seed(1),
                                preconditioner=Preconditioner(torch.ones(1, 4, 4), torch.ones(1, 4, 4)))
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)


def test_preconditioned_ddpm_keeps_the_data_distribution():
    """Invariance: with the exact epsilon of Gaussian data N(μ, C) (16-d, correlated, variances 0.03–0.15),
    preconditioned DDPM (η = 1, 100 steps, exact prior N(0, I)) ends at N(μ, C) as closely as the vanilla sampler:
    every mean/covariance entry within 0.05 (measured ≈ 0.016 / 0.023 vanilla, 0.014 / 0.026 PDS with 2000
    samples; the residual is the 100-step discretisation plus MC error ≈ 0.005). The negative control
    (noise preconditioned, score not) misses the covariance by ≈ 0.11."""
    from diffaccel.schedules import linear_schedule

    ab = linear_schedule(1000)
    mean, cov = _gaussian_target()
    mean, cov = 0.5 * mean, 0.1 * cov
    eps_fn = _vp_eps_fn(ab, mean, cov)
    pre = Preconditioner(_random_symmetric_freq((1, 4, 4), 1.0, 1.6),
                         1 + 0.25 * torch.rand(1, 4, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64))
    x_T = torch.randn(2000, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    errors = {}
    for name, p in (("vanilla", None), ("pds", pre)):
        x = preconditioned_ddim(eps_fn, x_T, ab, 100, eta=1.0, preconditioner=p,
                                generator=torch.Generator().manual_seed(1)).reshape(2000, -1)
        errors[name] = max((x.mean(0) - mean).abs().max().item(), (torch.cov(x.T) - cov).abs().max().item())
    assert errors["vanilla"] < 0.05 and errors["pds"] < 0.05, errors

    class NoiseOnly(Preconditioner):  # negative control: M on the noise without M·Mᵀ on the score
        def apply_gram(self, v):
            return v

    bad = NoiseOnly(pre.freq, pre.space)
    x = preconditioned_ddim(eps_fn, x_T, ab, 100, eta=1.0, preconditioner=bad,
                            generator=torch.Generator().manual_seed(1)).reshape(2000, -1)
    assert (torch.cov(x.T) - cov).abs().max().item() > 0.08


# --- score-ve method -------------------------------------------------------------------------------------------
def test_sigma_max_rule_is_max_pairwise_distance():
    from scipy.spatial.distance import pdist

    images = torch.randint(0, 256, (50, 1, 6, 6), dtype=torch.uint8)
    expected = pdist(images.reshape(50, -1).double().numpy() / 255.0).max()
    assert sigma_max_from_data(images) == pytest.approx(expected, rel=1e-9)
    x = torch.randn(30, 7, dtype=torch.float64)
    assert max_pairwise_distance(x, chunk=4) == pytest.approx(pdist(x.numpy()).max(), rel=1e-9)


def test_score_ve_method_tiny():
    from diffaccel.data import ImageDataset

    images = ((_smooth_images(16) + 1) * 127.5).round().to(torch.uint8)
    method = ScoreVE(num_scales=6)
    method.prepare(ImageDataset(images, "synthetic"), "cpu")
    assert method.sigma_max == pytest.approx(sigma_max_from_data(images))
    nets = method.build_networks({"preset": "tiny"}, (1, 8, 8))
    x0 = images[:4].float() / 127.5 - 1
    loss = method.loss(nets["net"], x0)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    rebuilt = ScoreVE(**method.config())
    g = torch.Generator().manual_seed(0)
    pre = Preconditioner(frequency_filter(x0))
    for sampler in ("pc", "ald"):
        out = rebuilt.sample(nets["net"], 3, (1, 8, 8), sampler=sampler, steps=4, preconditioner=pre, generator=g,
                             progress=False)
        assert out.shape == (3, 1, 8, 8) and out.min() >= -1 and out.max() <= 1
    assert rebuilt.nfe(sampler="pc", steps=4) == 8 and rebuilt.nfe(sampler="ald", steps=4) == 5
    assert rebuilt.nfe() == 12
    with pytest.raises(UserError):
        rebuilt.sample(nets["net"], 1, (1, 8, 8), sampler="euler", steps=2)
    with pytest.raises(UserError):
        ScoreVE(num_scales=4).sample(nets["net"], 1, (1, 8, 8), steps=2)  # sigma_max unknown


def test_pds_filter_cli(tmp_path, capsys):
    out = tmp_path / "mnist.safetensors"
    assert pds_filter_main(["--data", "digits", "--out", str(out), "--space", "--images", "50"]) == 0
    pre = Preconditioner.load(out)
    assert pre.freq.shape == (1, 8, 8) and pre.space.shape == (1, 8, 8)
    assert 1.0 - 1e-6 <= pre.freq.min() and pre.freq.max() <= 1.25 + 1e-6
    assert "saved PDS filters" in capsys.readouterr().out


def test_pds_benchmark_quick(tmp_path):
    from diffaccel.bench.pds import KL_MODEL, VE_REFERENCE, harness_benchmark, run, sigma_ratio

    summary = run(tmp_path, quick=True)
    bench = harness_benchmark(quick=True)
    ve = bench.model(VE_REFERENCE)
    labels = {s.label for s in ve.samplers}
    assert {"PC-8", "Ancestral-8", "PC-2 PDS a=5", "Ancestral-2 PDS a=5"} <= labels and "PC-8 PDS a=5" not in labels
    for vp in ("Baseline-1000", KL_MODEL):
        assert {s.label for s in bench.model(vp).samplers} == {"DDIM-2", "DDIM-2 eta=1", "DDIM-2 eta=1 PDS"}
        rows = [r for r in summary["rows"] if r["model"] == vp]
        assert len(rows) == 3 and all(math.isfinite(r["fid[digits]"].mean) for r in rows)
    extra = summary["extra"]
    assert extra["best_snr"]["sampler"].startswith("sweep PC-2 snr=")
    assert extra["best_alpha"]["sampler"].startswith("sweep PC-2 PDS a=")
    ratios = extra["sigma_ratio"]
    assert set(ratios) == labels
    # N levels from sigma_max to sigma_min: the ratio to the power N - 1 spans the whole range
    assert ratios["PC-8"] ** 7 == pytest.approx(ratios["PC-2"])
    assert sigma_ratio(0.01, 10.0, 4) == pytest.approx(10.0)
    exact = extra["exact_score"]
    assert set(exact) == labels
    assert all(b["var_ratio"] > 0 and b["frechet"] >= 0 for row in exact.values() for b in row.values())
    vp = extra["exact_epsilon"]
    assert set(vp) == {"DDIM-2", "DDIM-2 eta=1", "DDIM-2 eta=1 PDS"}
    assert all(b["var_ratio"] > 0 and b["frechet"] >= 0 for row in vp.values() for b in row.values())
    cost = extra["pds_cost"]
    assert cost["network_seconds"] > 0 and cost["pds_seconds"] > 0
    assert (tmp_path / "results.json").is_file()
    assert (tmp_path / "work" / "exact" / "pc-8.json").is_file()
    md = (tmp_path / "results.md").read_text()
    assert "Exact score" in md and "Exact epsilon" in md and "| PC-2 PDS a=5 |" in md and "tuned vanilla" in md and "%**" in md


def test_pds_filter_sweep_quick(tmp_path):
    from diffaccel.bench.pds import SWEEP_SLUGS, run_filter_sweep

    results = run_filter_sweep(tmp_path, quick=True)
    assert [r["preconditioner"] for r in results["rows"]] == list(SWEEP_SLUGS)
    assert all(r["fid[effnet]"] >= 0 for r in results["rows"])
    assert (tmp_path / "sweep_N2_radial.png").is_file() and (tmp_path / "results.md").is_file()
