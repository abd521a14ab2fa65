"""VE predictors (reverse diffusion, ancestral) with exact Gaussian scores, M = I bit-for-bit equality, the PDS
step-size safeguard, and the score-ve sampler options."""

import argparse
import math

import numpy as np
import pytest
import torch

from diffaccel.errors import UserError
from diffaccel.methods.pds import Preconditioner, frequency_filter, space_filter
from diffaccel.methods.score_ve import ScoreVE
from diffaccel.samplers import preconditioned_ddim
from diffaccel.samplers_score import PREDICTORS, ald_sampler, pc_nfe, pc_sampler, safeguard_bound, ve_sigmas


# --- exact scores ----------------------------------------------------------------------------------------------
def _dense_gaussian(d=16, seed=0):
    """N(μ, Σ) on 4×4 images, Σ = Q·diag(λ)·Qᵀ with λ from 0.05 to 1; score −(Σ + σ²I)⁻¹(x − μ)."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    lam = torch.linspace(0.05, 1.0, d, dtype=torch.float64)
    mean = 0.5 * torch.randn(d, generator=g, dtype=torch.float64)

    def score(x, sigma):
        flat = x.reshape(x.shape[0], -1) - mean
        return -(((flat @ q) / (lam + sigma[0].double() ** 2)) @ q.T).reshape(x.shape)

    def whitened_errors(x):
        """max |Σ^{-1/2}(m̂ − μ)| and max |Σ^{-1/2} Ĉ Σ^{-1/2} − I| (MC std ≈ 1/√n per entry, √2/√n on the diagonal)."""
        white = q @ torch.diag(lam.rsqrt()) @ q.T
        flat = x.reshape(x.shape[0], -1)
        m = (flat.mean(0) - mean) @ white
        c = white @ torch.cov(flat.T) @ white - torch.eye(d, dtype=torch.float64)
        return m.abs().max().item(), c.abs().max().item()

    return score, whitened_errors


def _stationary_gaussian(h=8, seed=0):
    """A stationary Gaussian on h×h images with an image-like spectrum λ_k = 0.25·(1 + |k|²)⁻² (2.3e-4 to 0.25,
    the range of MNIST-16's spectrum), mean 0.3; its exact score is diagonal in frequency; R from 200 draws (eq. 22)."""
    k2 = torch.fft.fftfreq(h, 1 / h).double()[:, None] ** 2 + torch.fft.fftfreq(h, 1 / h).double()[None] ** 2
    lam = 0.25 * (1 + k2) ** -2
    mu = 0.3

    def score(x, sigma):
        return -torch.fft.ifft2(torch.fft.fft2(x - mu) / (lam + sigma[0].double() ** 2)).real

    z = torch.randn(200, 1, h, h, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    draws = mu + torch.fft.ifft2(torch.fft.fft2(z) * lam.sqrt()).real
    sigma_max = torch.cdist(draws.flatten(1), draws.flatten(1)).max().item()
    freq = frequency_filter(2 * draws - 1, alpha=5.0).double()

    def power_ratio(x, where):
        """Mean over the frequencies ``where`` of the samples' power / the target's power."""
        power = torch.fft.fft2(x - mu).abs().square().mean(0)[0] / (h * h)
        return (power / lam)[where].mean().item()

    return score, freq, sigma_max, power_ratio


def _symmetric_filter(shape, lo, hi, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = torch.rand(shape, generator=g, dtype=torch.float64)
    h, w = shape[-2:]
    r = (r + r[..., (-torch.arange(h)) % h, :][..., (-torch.arange(w)) % w]) / 2  # R(k) = R(-k)
    return lo + (hi - lo) * r


# --- predictors reproduce the target ---------------------------------------------------------------------------
@pytest.mark.parametrize("predictor", ["reverse-diffusion", "ancestral"])
def test_predictor_alone_reproduces_gaussian_at_1000_levels(predictor):
    """Predictor only (no corrector), exact score of a correlated 16-d Gaussian, 1000 geometric levels from 10 to
    0.01 (ratio 1.0069), 4000 samples: whitened mean and covariance entries within 0.1 of the target (measured
    0.033 / 0.054 reverse diffusion, 0.033 / 0.047 ancestral; MC std ≈ 0.016–0.022 per entry over 152 entries).
    At 10 levels (ratio 2.15) the same check fails clearly (covariance off by 1.4 and 0.5): the test can fail."""
    score, errors = _dense_gaussian()
    for n_levels, should_pass in ((1000, True), (10, False)):
        x = pc_sampler(score, (4000, 1, 4, 4), ve_sigmas(0.01, 10.0, n_levels), corrector_steps=0,
                       predictor=predictor, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        mean_err, cov_err = errors(x)
        assert (mean_err < 0.1 and cov_err < 0.1) == should_pass, (n_levels, mean_err, cov_err)


def test_predictors_differ_only_in_their_noise():
    """Both predictors take x̄ = x + Δ·s(x, σ_i); the noise is √Δ·ξ (reverse diffusion) or σ_{i+1}/σ_i·√Δ·ξ
    (ancestral). Replayed by hand on levels (2, 1) with ``denoise=False`` (the noisy x is returned)."""
    score, _ = _dense_gaussian()
    sig = torch.tensor([2.0, 1.0], dtype=torch.float64)
    runs = {p: pc_sampler(score, (3, 1, 4, 4), sig, corrector_steps=0, predictor=p, denoise=False,
                          generator=torch.Generator().manual_seed(0), dtype=torch.float64) for p in PREDICTORS[:2]}
    g = torch.Generator().manual_seed(0)
    xi = [torch.randn(3, 1, 4, 4, generator=g, dtype=torch.float64) for _ in range(3)]
    # level 0: Δ = 4 − 1 = 3, ancestral std = (1/2)·√3; level 1 (onto σ = 0): Δ = 1, ancestral std = 0
    for p, std0, std1 in (("reverse-diffusion", math.sqrt(3.0), 1.0), ("ancestral", 0.5 * math.sqrt(3.0), 0.0)):
        x = 2.0 * xi[0]
        x = x + 3.0 * score(x, torch.full((3,), 2.0)) + std0 * xi[1]
        x = x + 1.0 * score(x, torch.full((3,), 1.0)) + std1 * xi[2]
        torch.testing.assert_close(runs[p], x, rtol=1e-12, atol=1e-12)


def test_pc_with_pds_reproduces_gaussian_at_1000_levels():
    """PC (one Langevin corrector step per level, snr 0.16) with a PDS filter R ∈ [1, 1.25]: within the same 0.1
    (measured 0.034 / 0.062, 4000 samples). Without the corrector the PDS predictor misses the covariance by ≈ 0.2
    (docs/pds.md: M·Mᵀ on the whole reverse drift does not keep the marginals; the corrector does)."""
    score, errors = _dense_gaussian()
    pre = Preconditioner(_symmetric_filter((1, 4, 4), 1.0, 1.25))
    x = pc_sampler(score, (4000, 1, 4, 4), ve_sigmas(0.01, 10.0, 1000), preconditioner=pre,
                   generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    mean_err, cov_err = errors(x)
    assert mean_err < 0.1 and cov_err < 0.1, (mean_err, cov_err)


# --- M = I: bit for bit ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("predictor", PREDICTORS)
@pytest.mark.parametrize("corrector_steps", [0, 1, 2])
def test_identity_preconditioner_is_bitwise_vanilla_pc(predictor, corrector_steps):
    if predictor == "none" and corrector_steps == 0:
        pytest.skip("not a sampler (refused, see test_pc_options_are_validated)")
    score, _ = _dense_gaussian()
    sig = ve_sigmas(0.01, 5.0, 7)
    identity = Preconditioner(torch.ones(1, 4, 4), torch.ones(1, 4, 4))
    runs = []
    for pre, guard in ((None, True), (identity, True), (identity, False)):
        log = []
        runs.append(pc_sampler(score, (5, 1, 4, 4), sig, predictor=predictor, corrector_steps=corrector_steps,
                               preconditioner=pre, safeguard=guard, safeguard_log=log,
                               generator=torch.Generator().manual_seed(3)))
        assert log == []  # ‖I‖ = 1 never exceeds the bound
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])


def test_identity_preconditioner_is_bitwise_vanilla_ald_and_ddim():
    score, _ = _dense_gaussian()
    identity = Preconditioner(torch.ones(1, 4, 4), torch.ones(1, 4, 4))
    a, b = (ald_sampler(score, (5, 1, 4, 4), ve_sigmas(0.01, 5.0, 6), steps_each=2, step_lr=1e-4, preconditioner=p,
                        generator=torch.Generator().manual_seed(0)) for p in (None, identity))
    assert torch.equal(a, b)

    ab = torch.linspace(0.9999, 0.01, 101, dtype=torch.float64).cumprod(0).clamp(min=1e-4)
    ab = torch.cat([torch.ones(1, dtype=torch.float64), ab[:100]])

    def eps_fn(x, k):
        return 0.3 * x

    x_T = torch.randn(4, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    c, d = (preconditioned_ddim(eps_fn, x_T, ab, 10, eta=1.0, preconditioner=p,
                                generator=torch.Generator().manual_seed(1)) for p in (None, identity))
    assert torch.equal(c, d)


def test_a_real_filter_changes_the_trajectory():
    score, _ = _dense_gaussian()
    sig = ve_sigmas(0.01, 5.0, 7)
    a, b = (pc_sampler(score, (5, 1, 4, 4), sig, predictor="ancestral", preconditioner=p,
                       generator=torch.Generator().manual_seed(3))
            for p in (None, Preconditioner(_symmetric_filter((1, 4, 4), 1.0, 1.25).float())))
    assert (a - b).abs().max() > 1e-3


# --- the safeguard ---------------------------------------------------------------------------------------------
def test_safeguard_bound_closed_form():
    """Predictor step Δ = σ_i² − σ_{i+1}²: b² = 2σ_i²/Δ − 1 = (r² + 1)/(r² − 1) with r = σ_i/σ_{i+1}; b ≥ 1 always,
    b = 1 for the final step onto σ = 0 and for any step h ≥ σ² (where the vanilla step itself overshoots)."""
    for r in (1.0069, 1.09, 1.2, 2.06, 5.1):
        sigma = 3.0
        delta = sigma ** 2 - (sigma / r) ** 2
        assert safeguard_bound(sigma, delta) == pytest.approx(math.sqrt((r * r + 1) / (r * r - 1)), rel=1e-12)
    assert safeguard_bound(0.01, 0.01 ** 2) == 1.0
    assert safeguard_bound(1.0, 5.0) == 1.0
    assert safeguard_bound(1.0, 0.0) == math.inf
    # the paper's coarsest ratios leave room for ‖M‖ = 2.35 (1.20) and 3.41 (1.09); α = 5 filters have ‖M‖ ≤ 1.5625
    assert safeguard_bound(1.2, 1.2 ** 2 - 1) > 2.3 and safeguard_bound(1.09, 1.09 ** 2 - 1) > 3.4
    # with α = 5 (max R = 1.25) it acts from r = √((1.5625 + 1)/(1.5625 − 1)) = 2.134 on
    r_star = math.sqrt(2.5625 / 0.5625)
    assert safeguard_bound(r_star, r_star ** 2 - 1) == pytest.approx(1.25, rel=1e-9)


def _dense_m(pre, h, w):
    """M as a dense matrix, from numpy's DFT matrices (independent of the FFT code)."""
    fh = np.exp(-2j * np.pi * np.outer(np.arange(h), np.arange(h)) / h)
    fw = np.exp(-2j * np.pi * np.outer(np.arange(w), np.arange(w)) / w)
    f2 = np.kron(fh, fw)
    freq = np.ones(h * w) if pre.freq is None else pre.freq.double().numpy().reshape(-1)
    space = np.ones(h * w) if pre.space is None else pre.space.double().numpy().reshape(-1)
    return (np.linalg.inv(f2) @ np.diag(freq) @ f2 @ np.diag(space)).real


def test_limited_preconditioner_respects_the_bound():
    freq = _symmetric_filter((1, 4, 6), 1.0, 1.6)
    space = 1 + 0.25 * torch.rand(1, 4, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for pre in (Preconditioner(freq), Preconditioner(freq, space)):
        norm = np.linalg.norm(_dense_m(pre, 4, 6), 2)
        assert norm <= pre.norm_bound() + 1e-9
        assert pre.limited(pre.norm_bound()) is pre  # nothing to do: the same object
        for bound in (1.0, 1.2, 1.45):
            limited = pre.limited(bound)
            assert np.linalg.norm(_dense_m(limited, 4, 6), 2) <= bound + 1e-9
    # without a space filter the clipping is per frequency: values under the bound are untouched
    limited = Preconditioner(freq).limited(1.3)
    keep = freq <= 1.3
    assert torch.equal(limited.freq[keep], freq[keep]) and torch.all(limited.freq[~keep] == 1.3)


@pytest.mark.parametrize("ratio", [1.09, 1.20])
def test_safeguard_never_acts_at_the_papers_step_ratios(ratio):
    """σ from 50 down to 0.01 at the paper's coarsest per-step ratios (CIFAR-10 at 100 iterations: 1.09; FFHQ at 66:
    1.20), α = 5 frequency and space filters (‖M‖ ≤ 1.5625), both predictors in PC and annealed Langevin at its
    default step_lr: the safeguard acts on no step between two levels. It acts only on the final predictor step
    onto σ = 0 (b = 1 there: that step becomes the vanilla Tweedie denoising step)."""
    score, freq, _, _ = _stationary_gaussian()
    draws = 2 * torch.rand(50, 1, 8, 8, generator=torch.Generator().manual_seed(2)) - 1
    pre = Preconditioner(freq, space_filter(draws, alpha=5.0).double())
    assert pre.norm_bound() <= 1.25 ** 2 + 1e-6
    n_levels = int(math.log(50 / 0.01) / math.log(ratio)) + 1
    sig = 50.0 / ratio ** torch.arange(n_levels, dtype=torch.float64)
    assert len(sig) > 40 and sig[-1] > 0.009
    for predictor in ("reverse-diffusion", "ancestral"):
        log = []
        pc_sampler(score, (20, 1, 8, 8), sig, predictor=predictor, preconditioner=pre, safeguard_log=log,
                   generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        assert [(e["level"], e["step"], e["bound"]) for e in log] == [(n_levels - 1, predictor, 1.0)]
    log = []
    ald_sampler(score, (20, 1, 8, 8), sig, preconditioner=pre, safeguard_log=log,
                generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert log == []


@pytest.mark.parametrize("predictor", ["reverse-diffusion", "ancestral"])
def test_safeguard_prevents_divergence_at_five_levels(predictor):
    """Exact score of an 8×8 stationary Gaussian with an image-like spectrum, R from eq. 22 (α = 5), PC at N = 5
    (σ ratio 4.2 per step), 500 samples. Power at the low-power frequencies (R > 1.2), relative to the target:
    vanilla 5.4 (reverse diffusion) / 0.52 (ancestral); PDS without the safeguard 19.5 / 3.3 (it diverges where
    vanilla does not); with it 4.1 / 0.52 — no worse than vanilla. Thresholds: > 2.5× and ≤ 1.1× vanilla's."""
    score, freq, sigma_max, power_ratio = _stationary_gaussian()
    pre = Preconditioner(freq)
    weak = freq[0] > 1.2
    sig = ve_sigmas(0.01, sigma_max, 5)
    ratio = {}
    for name, p, guard in (("vanilla", None, True), ("pds", pre, False), ("guarded", pre, True)):
        x = pc_sampler(score, (500, 1, 8, 8), sig, predictor=predictor, preconditioner=p, safeguard=guard,
                       generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        ratio[name] = power_ratio(x, weak)
    assert ratio["pds"] > 2.5 * ratio["vanilla"], ratio
    assert ratio["guarded"] <= 1.1 * ratio["vanilla"], ratio


# --- options and errors ----------------------------------------------------------------------------------------
def test_pc_options_are_validated():
    score, _ = _dense_gaussian()
    sig = ve_sigmas(0.01, 1.0, 3)
    for kwargs in ({"predictor": "euler"}, {"predictor": "none", "corrector_steps": 0}, {"corrector_steps": -1},
                   {"snr": 0.0}):
        with pytest.raises(UserError):
            pc_sampler(score, (2, 1, 4, 4), sig, **kwargs)
    with pytest.raises(UserError):
        ald_sampler(score, (2, 1, 4, 4), sig, steps_each=0)
    assert pc_nfe(10) == 20 and pc_nfe(10, "none", 2) == 20 and pc_nfe(10, "ancestral", 0) == 10


def _args(**kw):
    base = dict(sampler=None, steps=None, eta=None, clip_x0=False, pds=False, pds_alpha=5.0, pds_space=False,
                pds_filter=None, no_pds_safeguard=False, predictor=None, corrector_steps=None, snr=None, step_lr=None,
                steps_each=None)
    base.update(kw)
    return argparse.Namespace(**base)


def test_score_ve_sampler_options():
    m = ScoreVE(sigma_max=5.0, num_scales=20)
    assert m.sampler_options(_args()) == {"sampler": "pc", "pds": False, "pds_alpha": 5.0, "pds_space": False,
                                          "pds_safeguard": True}
    opts = m.sampler_options(_args(predictor="ancestral", corrector_steps=0, snr=0.2, pds=True, no_pds_safeguard=True))
    assert opts["predictor"] == "ancestral" and opts["corrector_steps"] == 0 and opts["snr"] == 0.2
    assert opts["pds_safeguard"] is False and m.nfe(**opts) == 20
    opts = m.sampler_options(_args(sampler="ald", step_lr=1e-4, steps_each=3))
    assert opts["step_lr"] == 1e-4 and m.nfe(**opts) == 61
    for bad in (_args(sampler="euler"), _args(sampler="ddim"), _args(sampler="ald", snr=0.1),
                _args(predictor="ancestral", sampler="ald"), _args(step_lr=1e-4), _args(eta=1.0),
                _args(predictor="heun"), _args(no_pds_safeguard=True), _args(sampler="ald", steps_each=0)):
        with pytest.raises(UserError):
            m.sampler_options(bad)
    with pytest.raises(UserError):
        m.nfe(sampler="euler")


def test_unknown_sampler_is_a_one_line_cli_error(tmp_path, capsys):
    from diffaccel.cli import main

    run = tmp_path / "ve"
    main(["train", "--method", "score-ve", "--data", "digits", "--preset", "tiny", "--batch-size", "8",
          "--steps", "1", "--num-scales", "4", "--log-every", "1", "--checkpoint-every", "1", "--out", str(run)])
    capsys.readouterr()
    for argv in (["--sampler", "euler"], ["--predictor", "heun"], ["--sampler", "ald", "--snr", "0.2"]):
        with pytest.raises(SystemExit) as exit_info:
            main(["sample", str(run), "--n", "2", "--steps", "2", *argv, "--out", str(tmp_path / "g.png")])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("diffaccel: error:") and "\n" not in err, err
    main(["sample", str(run), "--n", "2", "--steps", "2", "--predictor", "ancestral", "--corrector-steps", "0",
          "--out", str(tmp_path / "g.png")])
    out = capsys.readouterr().out
    assert "NFE 2" in out and (tmp_path / "g.png").is_file()


def test_score_sampler_flags_are_refused_on_epsilon_models():
    from diffaccel.methods.baseline import Baseline

    m = Baseline(N=50)
    assert m.sampler_options(_args(sampler="ddim", steps=5)) == {"sampler": "ddim", "steps": 5}
    for bad in (_args(predictor="ancestral"), _args(snr=0.2), _args(step_lr=1e-4), _args(no_pds_safeguard=True)):
        with pytest.raises(UserError):
            m.sampler_options(bad)
