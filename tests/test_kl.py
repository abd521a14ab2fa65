"""KL diffusion: basis, exact coefficients, losses (eq. 19, 20, 25), epsilon (eq. 24) and fine-tuning (§6.6)."""

import argparse
import functools
import math

import numpy as np
import pytest
import torch
from scipy import integrate
from torch import nn

from diffaccel.errors import UserError
from diffaccel.methods.kl import KLDiffusion, h, init_from_baseline, kl_loss, kl_partial_loss, phi, phi_dot
from diffaccel.nets.unet import build_unet
from diffaccel.schedules import VPSchedule

T = torch.tensor([0.05, 0.1, 0.25, 0.5, 0.75, 1.0], dtype=torch.float64)


@functools.lru_cache
def h_at_T(M):
    return h(T, M)


# --- basis ------------------------------------------------------------------------------------------------
def test_phi_values_and_shape():
    p = phi(torch.zeros(3, 2), 5)
    assert p.shape == (3, 2, 5) and p.abs().max() == 0
    # phi_m(1) = 2√2/((2m−1)π)·(−1)^(m+1)
    m = torch.arange(1, 6, dtype=torch.float64)
    expected = 2 * math.sqrt(2) / ((2 * m - 1) * math.pi) * (-1) ** (m + 1)
    torch.testing.assert_close(phi(torch.tensor(1.0, dtype=torch.float64), 5), expected)


def test_phi_dot_is_derivative_and_orthonormal():
    t = torch.linspace(0.01, 0.99, 50, dtype=torch.float64)
    eps = 1e-6
    numeric = (phi(t + eps, 6) - phi(t - eps, 6)) / (2 * eps)
    torch.testing.assert_close(numeric, phi_dot(t, 6), atol=1e-8, rtol=1e-6)
    # ∫_0^1 phi_m' phi_n' = δ_mn (Gauss-Legendre, exact for these trigonometric polynomials to rounding)
    x, w = np.polynomial.legendre.leggauss(200)
    s, w = torch.tensor((x + 1) / 2), torch.tensor(w / 2)
    d = phi_dot(s, 6)
    torch.testing.assert_close(d.T @ (w[:, None] * d), torch.eye(6, dtype=torch.float64), atol=1e-12, rtol=0)


def test_sum_phi_squared_tends_to_t():
    """Σ_m phi_m(t)² = t (the Brownian variance); the truncation error decreases in M and is < 1/(π²M)·4."""
    errors = [(t_ - phi(T, M).square().sum(-1)).abs() for t_, M in ((T, 1), (T, 8), (T, 64), (T, 4096))]
    for coarse, fine in zip(errors, errors[1:]):
        assert (fine <= coarse + 1e-15).all()
    # tail Σ_{m>M} 8/((2m−1)²π²) ≤ 8/π² · 1/(4M−2)... bounded by 2/(π²(M−1/2))
    for M in (8, 64, 4096):
        assert (T - phi(T, M).square().sum(-1)).max() <= 2 / (math.pi**2 * (M - 0.5))
    torch.testing.assert_close(phi(T, 4096).square().sum(-1), T, atol=2e-4, rtol=0)


# --- exact KL forward coefficients h_m(t) (eq. 12-13) -----------------------------------------------------
def test_h_matches_independent_quadrature():
    for t, m in ((0.3, 1), (0.7, 5), (1.0, 12)):
        def f(u):
            # written out independently: mu(t)/mu(s) = exp(-(0.1(t−s) + 9.95(t²−s²))/2)
            return math.sqrt(0.1 + 19.9 * u) * math.exp(-(0.1 * (t - u) + 9.95 * (t * t - u * u)) / 2) \
                * math.sqrt(2) * math.cos((2 * m - 1) * math.pi * u / 2)
        ref, _ = integrate.quad(f, 0, t, limit=200, epsabs=1e-13, epsrel=1e-13)
        assert abs(h(torch.tensor(t, dtype=torch.float64), m)[m - 1].item() - ref) < 1e-12


def test_sum_h_squared_tends_to_sigma_squared():
    """Eq. 13: Σ_m h_m(t)² → sigma(t)². By Bessel's inequality (h_m are the coefficients of the Itô kernel in
    the orthonormal basis phi_m') the partial sums never exceed sigma², and the gap shrinks like 1/M.
    Stated tolerance: within 7.5 % of sigma² at M = 64 and within 2 % at M = 256 for t in [0.05, 1]."""
    sigma2 = VPSchedule().sigma(T).square()
    ratios = {M: h_at_T(M).square().sum(-1) / sigma2 for M in (4, 16, 64, 256)}
    for M, r in ratios.items():
        assert (r <= 1 + 1e-10).all(), M
    assert ((1 - ratios[64]) < (1 - ratios[16])).all() and ((1 - ratios[16]) < (1 - ratios[4])).all()
    assert (1 - ratios[64]).max() < 0.075
    assert (1 - ratios[256]).max() < 0.02


def test_eq15_approximation_has_same_limit():
    """Eq. 15 replaces Σ h_m² by sigma²·Σ phi_m²/t; both tend to sigma² (within 2 % of each other at M = 256,
    8 % at M = 64 where the exact variance lags most near t = 1, as beta(1) = 20 is largest there)."""
    sigma2 = VPSchedule().sigma(T).square()
    for M, tol in ((64, 0.08), (256, 0.02)):
        approx = sigma2 * phi(T, M).square().sum(-1) / T
        exact = h_at_T(M).square().sum(-1)
        assert ((approx - exact).abs() / sigma2).max() < tol, M


# --- forward noise Z' (eq. 16) ---------------------------------------------------------------------------
def test_variance_of_z_prime_is_sum_phi_squared_over_t():
    M, N, n = 8, 20, 200_000
    method = KLDiffusion(M=M, N=N)
    g = torch.Generator().manual_seed(0)
    for k in (1, 5, 20):
        kk = torch.full((n,), k)
        z = torch.randn((n, M, 1), generator=g, dtype=torch.float64)
        x_t, z_prime = method.noised(torch.zeros(n, 1, dtype=torch.float64), kk, z)
        t = torch.tensor(k / N, dtype=torch.float64)
        expected = (phi(t, M).square().sum() / t).item()
        # sample variance of n Gaussians: relative std √(2/n) = 0.32 %; 5 σ tolerance
        assert abs(z_prime.var().item() - expected) < 5 * expected * math.sqrt(2 / n)
        torch.testing.assert_close(x_t, VPSchedule().sigma(t) * z_prime)
    # for M = 8 the variance is 0.68 at t = 1/20 and ≥ 0.95 from t = 1/4 on
    assert 0.6 < (phi(torch.tensor(0.05), 8).square().sum() / 0.05).item() < 0.7


# --- losses -----------------------------------------------------------------------------------------------
class Zero(nn.Module):
    def __init__(self, out_factor=1):
        super().__init__()
        self.out_factor = out_factor

    def forward(self, x, t):
        return torch.zeros(x.shape[0], x.shape[1] * self.out_factor, *x.shape[2:], dtype=x.dtype)


class TimeConv(nn.Module):
    """A small deterministic network whose output depends on x and t (per-sample, no batch statistics)."""

    def __init__(self, c_in=1, c_out=1):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1)
        with torch.no_grad():
            for p in self.conv.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)

    def forward(self, x, t):
        return torch.tanh(self.conv(x)) * torch.cos(0.1 * t).view(-1, 1, 1, 1) + 0.01 * t.view(-1, 1, 1, 1)


def test_zero_network_loss_equals_closed_form():
    """E[loss] of a zero network: E_k[Σ_m phi_m(t_k)²/t_k] for eq. 19/25, E_k[M'/t_k] for eq. 20."""
    M, N, B = 8, 20, 4096
    tk = torch.arange(1, N + 1, dtype=torch.float64) / N
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(B, 1, 8, 8, generator=g) * 2 - 1
    full = (phi(tk, M).square().sum(-1) / tk).mean().item()
    for variant, net in (("1st", Zero()), ("2nd", Zero(M))):
        loss = KLDiffusion(M=M, N=N, variant=variant).loss(net, x0, generator=g).item()
        # per-image std ≤ √(2/64)·max_k(Σphi²/t) plus the spread over k (< 0.35); 5 σ over B images
        assert abs(loss - full) < 5 * 0.45 / math.sqrt(B), (variant, loss, full)
    partial = (4 / tk).mean().item()                       # 4·H_20 = 14.39
    loss = KLDiffusion(M=M, N=N, partial=4).loss(Zero(), x0, generator=g).item()
    # per-image values are 4/t_k·χ²-mean, std of 1/t_k over k is ≈ 4·4.2 → relative tolerance 5 σ
    assert abs(loss - partial) < 5 * 4 * 4.6 / math.sqrt(B), (loss, partial)
    # and exactly, for a fixed k and Z: (1/t)·mean((Σ phi_m Z_m)²)
    k, z = torch.full((B,), 7), torch.randn(B, M, 1, 8, 8, generator=g)
    t = torch.tensor(7 / N, dtype=torch.float64)
    exact = (torch.einsum("m,bm...->b...", phi(t, M).float(), z).square().mean() / t).item()
    assert KLDiffusion(M=M, N=N).loss(Zero(), x0, k=k, z=z).item() == pytest.approx(exact, rel=1e-5)


def test_batched_equals_looped_eq19():
    M, N, B = 4, 20, 3
    method = KLDiffusion(M=M, N=N)
    g = torch.Generator().manual_seed(2)
    x0 = torch.rand(B, 1, 8, 8, generator=g) * 2 - 1
    k = torch.tensor([1, 11, 20])
    z = torch.randn(B, M, 1, 8, 8, generator=g)
    for net in (TimeConv(), build_unet("tiny", 1, 1, 8)):
        net.eval()
        batched = method.loss(net, x0, k=k, z=z)
        # reference: one network call per term m, the loss written term by term
        x_t, _ = method.noised(x0, k, z)
        t = k.double() / N
        ph = phi(t, M)
        residual = 0
        for m in range(1, M + 1):
            z_hat = net(x_t, (N * (m - 1) + k).float())
            residual = residual + ph[:, m - 1].float().view(-1, 1, 1, 1) * (z[:, m - 1] - z_hat)
        looped = (residual.square().mean((1, 2, 3)) / t.float()).mean()
        torch.testing.assert_close(batched, looped, rtol=1e-5, atol=1e-6)


def test_first_variant_uses_time_indices_N_m_minus_1_plus_k_in_one_call():
    calls = []

    class Recorder(nn.Module):
        def forward(self, x, t):
            calls.append(t.clone())
            return torch.zeros_like(x)

    M, N = 8, 20
    KLDiffusion(M=M, N=N).loss(Recorder(), torch.zeros(2, 1, 4, 4), k=torch.tensor([3, 20]))
    assert len(calls) == 1 and calls[0].numel() == 2 * M
    expected = sorted(N * (m - 1) + k for m in range(1, M + 1) for k in (3, 20))
    assert sorted(calls[0].tolist()) == expected and max(expected) == N * M
    calls.clear()
    KLDiffusion(M=M, N=N, partial=3).loss(Recorder(), torch.zeros(2, 1, 4, 4), k=torch.tensor([3, 20]))
    assert len(calls) == 1 and calls[0].numel() == 2 * 3
    assert all(((v - k) % N == 0) for v, k in zip(calls[0].view(2, 3).tolist(), (3, 20)) for v in v)


def test_partial_loss_with_all_terms_bounds_full_loss():
    """NOTE 3: eq. 20 with M' = M bounds eq. 19. The paper's proof is wrong (it claims |phi_m| ≥ 1); the bound
    holds by Cauchy-Schwarz: ‖Σ phi_m v_m‖² ≤ (Σ phi_m²)(Σ‖v_m‖²) ≤ t·Σ‖v_m‖², i.e. full ≤ t·partial ≤ partial."""
    M, N, B = 8, 20, 20
    g = torch.Generator().manual_seed(3)
    x0 = torch.rand(B, 1, 8, 8, generator=g) * 2 - 1
    k = torch.arange(1, B + 1)
    z = torch.randn(B, M, 1, 8, 8, generator=g)
    full_m, part_m = KLDiffusion(M=M, N=N), KLDiffusion(M=M, N=N, partial=M)
    net = TimeConv()
    terms = torch.rand(B, M, generator=g).argsort(1)
    x_t, _ = full_m.noised(x0, k, z)
    z_hat = full_m.coefficients(net, x_t, k)
    t = k.double() / N
    full = kl_loss(z, z_hat, phi(t, M), t)
    part = kl_partial_loss(z, z_hat, t)
    assert (full <= t * part * (1 + 1e-6)).all() and (full < part).all()
    # the method's partial loss with all M terms (in any order) equals the per-image sum
    torch.testing.assert_close(part_m.loss(net, x0, k=k, z=z, terms=terms), part.mean().float(), rtol=1e-5, atol=0)
    torch.testing.assert_close(full_m.loss(net, x0, k=k, z=z), full.mean().float(), rtol=1e-5, atol=0)


def test_second_variant_shapes_and_gradients():
    M, N, C = 8, 20, 3
    method = KLDiffusion(M=M, N=N, variant="2nd")
    assert method.output_channels(C) == M * C
    nets = method.build_networks({"preset": "tiny"}, (C, 8, 8))
    net = nets["net"]
    x0 = torch.rand(2, C, 8, 8) * 2 - 1
    assert net(x0, torch.tensor([1.0, 2.0])).shape == (2, M * C, 8, 8)
    loss = method.loss(net, x0)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)
    assert method.coefficients(net, x0, torch.tensor([3, 4])).shape == (2, M, C, 8, 8)
    assert method.epsilon(net, x0, torch.tensor([3.0, 4.0])).shape == (2, C, 8, 8)
    out = method.sample(net, 3, (C, 8, 8), generator=torch.Generator().manual_seed(0), steps=5, progress=False)
    assert out.shape == (3, C, 8, 8) and torch.isfinite(out).all()
    assert method.nfe(steps=20) == 20 and KLDiffusion(M=M).nfe(steps=20) == 20 * M
    assert KLDiffusion(M=M, N=N).nfe(sampler="ddpm") == N * M
    with pytest.raises(UserError, match="output channels"):
        method.loss(build_unet("tiny", C, C, 8), x0)


# --- epsilon (eq. 24) -------------------------------------------------------------------------------------
class Oracle1st(nn.Module):
    """Returns the true Z_m of the image it recognises, for the term m encoded in the time index N(m−1)+k."""

    def __init__(self, x_t, z, N):
        super().__init__()
        self.x_t, self.z, self.N = x_t, z, N

    def forward(self, x, t):
        b = torch.cdist(x.flatten(1), self.x_t.flatten(1)).argmin(1)
        m = ((t.round().long() - 1) // self.N)
        return self.z[b, m]


def test_epsilon_of_oracle_recovers_the_noise_exactly():
    M, N, B = 8, 20, 5
    g = torch.Generator().manual_seed(4)
    x0 = torch.rand(B, 1, 8, 8, generator=g) * 2 - 1
    k = torch.tensor([1, 4, 9, 15, 20])
    z = torch.randn(B, M, 1, 8, 8, generator=g, dtype=torch.float64)
    method = KLDiffusion(M=M, N=N)
    x_t, z_prime = method.noised(x0.double(), k, z)
    eps = method.epsilon(Oracle1st(x_t, z, N), x_t, k.double())
    torch.testing.assert_close(eps, z_prime, rtol=1e-12, atol=1e-12)
    t = k.double() / N
    mu, sigma = (f(t).view(-1, 1, 1, 1) for f in (VPSchedule().mu, VPSchedule().sigma))
    torch.testing.assert_close(mu * x0.double() + sigma * eps, x_t)
    # 2nd variant: the M·C output channels hold Z_1..Z_M term-major
    second = KLDiffusion(M=M, N=N, variant="2nd")

    class Oracle2nd(nn.Module):
        def forward(self, x, t):
            b = torch.cdist(x.flatten(1), x_t.flatten(1)).argmin(1)
            return z[b].flatten(1, 2)

    torch.testing.assert_close(second.epsilon(Oracle2nd(), x_t, k.double()), z_prime, rtol=1e-12, atol=1e-12)
    # and a perfect network has zero loss
    assert KLDiffusion(M=M, N=N).loss(Oracle1st(x_t, z, N), x0.double(), k=k, z=z).item() < 1e-20


def test_kl_sampling_runs_ddim_and_ddpm_reproducibly():
    method = KLDiffusion(M=2, N=4)
    net = build_unet("tiny", 1, 1, 8)
    a = method.sample(net, 2, (1, 8, 8), generator=torch.Generator().manual_seed(5), steps=2, progress=False)
    b = method.sample(net, 2, (1, 8, 8), generator=torch.Generator().manual_seed(5), steps=2, progress=False)
    torch.testing.assert_close(a, b)
    c = method.sample(net, 2, (1, 8, 8), generator=torch.Generator().manual_seed(5), sampler="ddpm", progress=False)
    assert c.shape == (2, 1, 8, 8) and torch.isfinite(c).all()


# --- fine-tuning (§6.6) -----------------------------------------------------------------------------------
def _trained_like_baseline(out_channels=1):
    torch.manual_seed(6)
    net = build_unet("tiny", 1, out_channels, 8)
    with torch.no_grad():  # move away from the zero-initialised output conv so the identity is not trivial
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net.eval()


def test_fine_tune_second_variant_reproduces_baseline_epsilon():
    base, base_N, M, N = _trained_like_baseline(), 1000, 8, 20
    for correction in ("paper", "posterior"):
        method = KLDiffusion(M=M, N=N, variant="2nd", correction=correction)
        net = build_unet("tiny", 1, M, 8).eval()
        init_from_baseline(method, net, base, base_N)
        assert method.time_scale == base_N / N and method.config()["correction"] == correction
        x = torch.randn(4, 1, 8, 8)
        k = torch.tensor([1.0, 5.0, 12.0, 20.0])
        with torch.no_grad():
            torch.testing.assert_close(method.epsilon(net, x, k), base(x, k * base_N / N), rtol=1e-4, atol=1e-5)
        # the correction is part of the config, so a reloaded method gives the same epsilon
        again = KLDiffusion(**method.config())
        with torch.no_grad():
            torch.testing.assert_close(again.epsilon(net, x, k), method.epsilon(net, x, k))


def test_fine_tune_first_variant_first_term_is_corrected_baseline():
    """1st variant: Ẑ(x, N·0 + k) = gain(t_k)·ε_base(x, k) for m = 1 (the only identity the paper claims);
    with the paper's gain √t/Σphi_m every term starts as the corrected baseline at its own time index."""
    base, base_N, M, N = _trained_like_baseline(), 1000, 8, 20
    method = KLDiffusion(M=M, N=N)
    net = build_unet("tiny", 1, 1, 8).eval()
    init_from_baseline(method, net, base, base_N)
    assert method.correction == "paper"
    x = torch.randn(3, 1, 8, 8)
    k = torch.tensor([2, 10, 20])
    t = k.double() / N
    gain = (t.sqrt() / phi(t, M).sum(-1)).float().view(-1, 1, 1, 1)
    with torch.no_grad():
        coeffs = method.coefficients(net, x, k)
        torch.testing.assert_close(coeffs[:, 0], gain * base(x, k.float() * base_N / N), rtol=1e-4, atol=1e-5)
        for m in (2, 8):
            tau = (N * (m - 1) + k).float() * base_N / N
            torch.testing.assert_close(coeffs[:, m - 1], gain * base(x, tau), rtol=1e-4, atol=1e-5)


def test_fine_tune_rejects_a_different_architecture():
    method = KLDiffusion(M=4, N=20)
    with pytest.raises(UserError, match="architecture|shape"):
        init_from_baseline(method, build_unet("tiny", 1, 1, 8), build_unet("small", 1, 1, 8), 1000)


# --- configuration ----------------------------------------------------------------------------------------
def test_config_round_trip_and_cli_arguments():
    method = KLDiffusion(M=6, N=30, partial=2)
    assert KLDiffusion(**method.config()).config() == method.config()
    parser = argparse.ArgumentParser()
    KLDiffusion.add_arguments(parser.add_argument_group("kl"))
    args = parser.parse_args(["--kl-terms", "6", "--kl-partial", "2"])
    args.time_steps = 30
    assert KLDiffusion.from_args(args).config() == method.config()
    args = parser.parse_args(["--kl-variant", "2nd"])
    assert KLDiffusion.from_args(args).config()["N"] == 20 and KLDiffusion.from_args(args).variant == "2nd"


@pytest.mark.parametrize("kwargs, match", [
    (dict(M=0), "kl-terms"), (dict(N=0), "time-steps"), (dict(variant="3rd"), "kl-variant"),
    (dict(partial=9), "kl-partial"), (dict(partial=2, variant="2nd"), "1st variant"),
    (dict(schedule="linear"), "continuous VP"), (dict(correction="x"), "correction"),
])
def test_bad_configuration_is_a_user_error(kwargs, match):
    with pytest.raises(UserError, match=match):
        KLDiffusion(**kwargs)


def test_fine_tune_from_a_baseline_run_directory(tmp_path):
    """The whole --init-from path: a trained baseline run, from_args (records the settings in the KL config)
    and the initialize hook the trainer calls (copies the EMA weights)."""
    from diffaccel.methods.baseline import Baseline
    from diffaccel.runs import load_run
    from diffaccel.train import TrainConfig, train

    net_cfg = {"preset": "tiny", "overrides": {"block_out_channels": [8, 16], "norm_num_groups": 4}}
    common = dict(data="digits", resolution=8, net=net_cfg, batch_size=4, steps=2, log_every=1, sample_n=4,
                  sample_options={"steps": 2}, device="cpu")
    base_dir = train(TrainConfig(out=str(tmp_path / "base"), **common), Baseline(N=1000), progress=False,
                     log=lambda *_: None)
    _, base_nets = load_run(base_dir)
    args = argparse.Namespace(kl_terms=4, kl_partial=None, kl_variant="2nd", kl_correction="paper", time_steps=None,
                              init_from=str(base_dir))
    method = KLDiffusion.from_args(args)
    assert method.config()["time_scale"] == 1000 / 20 and method.config()["correction"] == "paper"
    nets = method.build_networks(net_cfg, (1, 8, 8))
    method.initialize(nets, base_dir)
    x, k = torch.randn(2, 1, 8, 8), torch.tensor([3.0, 17.0])
    with torch.no_grad():
        torch.testing.assert_close(method.epsilon(nets["net"].eval(), x, k), base_nets["net"](x, k * 50),
                                   rtol=1e-4, atol=1e-5)
    kl_dir = train(TrainConfig(out=str(tmp_path / "kl"), init_from=str(base_dir), **common), method,
                   progress=False, log=lambda *_: None)
    reloaded, _ = load_run(kl_dir)
    assert reloaded.config() == method.config()
    with pytest.raises(UserError, match="not a baseline"):
        KLDiffusion(M=4).initialize(nets, kl_dir)


def test_benchmark_quick_run_writes_results(tmp_path):
    from diffaccel.bench.kl import run

    out = run(tmp_path / "kl", quick=True)
    labels = {r["model"] for r in out["rows"]}
    assert labels == {"Baseline-b16", "Baseline-b128", "KL-8d-b16 (1st)", "KL-8d-b16 (2nd)", "KL-8d4-b16 (partial)",
                      "KL-8d4-b16 (partial, normalised)", "Baseline-b16 N=20", "Baseline-b16 N=20 v(t)-noise",
                      "KL-8d-b16 (1st, m-embedding)", "KL-8d-b16 (2nd) from Baseline-b16 at half"}
    # §6.6's row trains from the half-budget Baseline-b16 with the fine-tuning parameterisation
    from diffaccel.runs import load_run, read_config

    tuned = tmp_path / "kl" / "work" / "kl-8d-b16-2nd-from-baseline-b16-at-half" / "seed0" / "run"
    pretrained = tmp_path / "kl" / "work" / "setup" / "pretrained-baseline" / "seed0" / "run"
    assert read_config(tuned)["train"]["init_from"] == str(pretrained)
    assert load_run(tuned)[0].time_scale == 1000 / 20 and read_config(pretrained)["method"] == "baseline"
    for name in ("results.json", "results.md", "results.png", "samples_kl-8d-b16-2nd_ddim-2.png"):
        assert (tmp_path / "kl" / name).is_file(), name
    assert all(math.isfinite(r["fid[digits]"].mean) and r["train_sec_per_step"].mean > 0 for r in out["rows"])
    # every curve point carries steps, seconds and images processed (step × batch) for the three plots
    for label, curves in out["curves"].items():
        batch = 128 if label == "Baseline-b128" else 16
        assert all(p["images"] == p["step"] * batch for p in curves["fid[digits]"])


def test_eq19_per_image_equals_noise_prediction_error_of_the_assembled_epsilon():
    """Each image is trained at one t, so (1/t)‖Σ phi_m (Z_m − Ẑ_m)‖² = ‖Z' − ε̂‖² with Z' of eq. 16 and ε̂ of
    eq. 24: KL training is noise prediction of Z' by an output assembled from M evaluations."""
    M, N, B = 8, 20, 6
    method = KLDiffusion(M=M, N=N)
    g = torch.Generator().manual_seed(5)
    x0 = torch.rand(B, 1, 8, 8, generator=g) * 2 - 1
    k = torch.tensor([1, 2, 7, 13, 19, 20])
    z = torch.randn(B, M, 1, 8, 8, generator=g)
    net = build_unet("tiny", 1, 1, 8).eval()
    x_t, z_prime = method.noised(x0, k, z)
    with torch.no_grad():
        eps_hat = method.epsilon(net, x_t, k)
        for i in range(B):  # a batch of one image: the loss of that image
            loss_i = method.loss(net, x0[i:i + 1], k=k[i:i + 1], z=z[i:i + 1])
            target = (z_prime[i] - eps_hat[i]).square().mean()
            torch.testing.assert_close(loss_i, target, rtol=2e-6, atol=1e-7)


def _h_by_quad(t, m):
    """h_m(t) = ∫_0^t √beta(s)·mu(t)/mu(s)·phi_m'(s) ds by adaptive quadrature (independent of kl.h)."""
    log_mu = lambda s: -(0.1 * s + 9.95 * s * s) / 2  # noqa: E731
    f = lambda s: math.sqrt(0.1 + 19.9 * s) * math.exp(log_mu(t) - log_mu(s)) * math.sqrt(2) * math.cos(
        (2 * m - 1) * math.pi * s / 2)  # noqa: E731
    return integrate.quad(f, 0, t, limit=200, epsabs=1e-13, epsrel=1e-12)[0]


@pytest.mark.parametrize("variance", ["kl", "kl-h"])
def test_kl_variance_baseline_draws_noise_of_the_kl_variance(variance):
    """"kl": v(t) = Σ_m phi_m(t)²/t = Var Z' (eq. 16), 0.68 at t = 0.05 and 0.97 at t = 1 for M = 8;
    "kl-h": v(t) = Σ_m h_m(t)²/sigma(t)² of the exact expansion (eq. 12), 0.61 and 0.55 there."""
    from diffaccel.methods.baseline import Baseline

    M, N = 8, 20
    method = Baseline(N=N, noise_variance=variance, kl_terms=M)
    sigma2 = lambda t: 1 - math.exp(-(0.1 * t + 9.95 * t * t))  # noqa: E731
    phi2 = lambda t, m: (2 * math.sqrt(2) / ((2 * m - 1) * math.pi) * math.sin((2 * m - 1) * math.pi * t / 2)) ** 2
    expected = {"kl": (0.676, 0.975), "kl-h": (0.606, 0.547)}[variance]
    for k, value in zip((1, N), expected):
        t = k / N
        if variance == "kl":
            v_ref = sum(phi2(t, m) for m in range(1, M + 1)) / t
        else:
            v_ref = sum(_h_by_quad(t, m) ** 2 for m in range(1, M + 1)) / sigma2(t)
        assert abs(float(method.variance[k]) - v_ref) < 1e-10
        assert abs(v_ref - value) < 0.001
    # Monte-Carlo: 20k draws per index, the sample variance's relative std is √(2/20k) = 0.01; 5 std allowed
    n = 400_000
    k = torch.arange(1, N + 1).repeat(n // N)
    noise = method.draw_noise(torch.zeros(len(k), 1, 1, 1, dtype=torch.float64), k,
                              generator=torch.Generator().manual_seed(0))
    for kk in (1, 5, 20):
        sel = noise[k == kk].flatten()
        rel = float(sel.var()) / float(method.variance[kk]) - 1
        assert abs(rel) < 5 * math.sqrt(2 / len(sel)), (kk, rel)
    # the unit baseline is untouched, and a saved unit run rebuilds from its old two-key config
    assert Baseline(N=N).config() == {"N": N, "schedule": "vp"} and Baseline(N=N).variance is None
    assert Baseline(**method.config()).config() == method.config()
    with pytest.raises(UserError, match="noise-variance"):
        Baseline(noise_variance="half")
    with pytest.raises(UserError, match="VP"):
        Baseline(schedule="cosine", noise_variance=variance)


def test_normalized_partial_loss_has_unit_scale_and_unit_order_gradient_at_initialisation():
    """Eq. 20 divided by M'·H_N: a zero network scores 1 in expectation (as eq. 19 scores Σphi²/t ≈ 1); at the
    initialisation of a tiny UNet its gradient norm is of the order of eq. 19's, the plain loss's M'·H_N times
    larger."""
    M, N, Mp = 8, 20, 4
    plain = KLDiffusion(M=M, N=N, partial=Mp)
    normed = KLDiffusion(M=M, N=N, partial=Mp, partial_normalized=True)
    assert abs(normed.partial_scale() - Mp * sum(1 / k for k in range(1, N + 1))) < 1e-12
    # zero network: E = 1; 20k images × 4 terms × 4 pixels, relative std of the mean ≈ √2·(std of 1/t ÷ E 1/t)/√20k
    x0 = torch.rand(20000, 1, 2, 2) * 2 - 1
    zero = normed.loss(lambda x, t: torch.zeros_like(x), x0, generator=torch.Generator().manual_seed(0))
    assert abs(float(zero) - 1) < 0.05  # std of this estimate ≈ 0.012 (1/t_k has relative std ≈ 1.6)

    def grad_norm(method, seed):
        torch.manual_seed(0)  # the same initialisation for every loss
        net = build_unet("tiny", 1, 1, 8)
        x = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
        method.loss(net, x, generator=torch.Generator().manual_seed(seed)).backward()
        return float(torch.cat([p.grad.flatten() for p in net.parameters()]).norm())

    for seed in range(3):
        g_plain, g_norm = grad_norm(plain, seed), grad_norm(normed, seed)
        g_full = grad_norm(KLDiffusion(M=M, N=N), seed)
        assert abs(g_plain / g_norm / normed.partial_scale() - 1) < 1e-4  # same draws: exactly the scale apart
        assert 0.2 < g_norm / g_full < 5, (g_norm, g_full)
        assert g_plain > 5 * g_full
    assert normed.config()["partial_normalized"] is True and "partial_normalized" not in plain.config()
    assert KLDiffusion(**normed.config()).partial_normalized
    with pytest.raises(UserError, match="kl-partial"):
        KLDiffusion(partial_normalized=True)


def test_term_embedding_changes_only_the_conditioning():
    """--kl-term-embedding: the network sees time index k for every term and the term m−1 as a label whose
    learned embedding is added to the time embedding; loss, noise and aggregation are those of eq. 19 / 24."""
    calls = []

    class Recorder(nn.Module):
        def forward(self, x, t, labels=None):
            calls.append((t.clone(), labels.clone()))
            return torch.zeros_like(x)

    M, N = 4, 20
    KLDiffusion(M=M, N=N, term_embedding=True).loss(Recorder(), torch.zeros(2, 1, 4, 4), k=torch.tensor([3, 20]))
    (t, labels), = calls
    assert t.view(2, M).tolist() == [[3.0] * M, [20.0] * M] and labels.view(2, M).tolist() == [list(range(M))] * 2
    # the network is the default one plus an [M, temb] embedding table; with that table zeroed and the other
    # weights equal, every term's prediction is the default network's m = 1 term (index N·0 + k = k)
    plain, embed = KLDiffusion(M=M, N=N), KLDiffusion(M=M, N=N, term_embedding=True)
    torch.manual_seed(0)
    net = plain.build_networks({"preset": "tiny"}, (1, 8, 8))["net"].eval()
    net_e = embed.build_networks({"preset": "tiny"}, (1, 8, 8))["net"].eval()
    extra = set(net_e.state_dict()) - set(net.state_dict())
    assert extra == {"unet.class_embedding.weight"} and set(net.state_dict()) <= set(net_e.state_dict())
    state = {**net.state_dict(), "unet.class_embedding.weight": torch.zeros(M, net_e.unet.time_embedding.linear_2
                                                                             .out_features)}
    net_e.load_state_dict(state)
    g = torch.Generator().manual_seed(3)
    x, k = torch.randn(3, 1, 8, 8, generator=g), torch.tensor([1, 9, 20])
    z = torch.randn(3, M, 1, 8, 8, generator=g)
    with torch.no_grad():
        first = plain.coefficients(net, x, k)[:, :1]
        torch.testing.assert_close(embed.coefficients(net_e, x, k), first.expand(-1, M, -1, -1, -1))
        # same loss function: eq. 19 of these coefficients
        t = k.double() / N
        x_t, _ = embed.noised(x, k, z)
        torch.testing.assert_close(embed.loss(net_e, x, k=k, z=z),
                                   kl_loss(z, embed.coefficients(net_e, x_t, k), phi(t, M), t).mean())
        # a non-zero embedding makes the terms differ
        net_e.unet.class_embedding.weight.normal_()
        c = embed.coefficients(net_e, x, k)
        assert (c[:, 0] - c[:, 1]).abs().max() > 1e-4
    assert KLDiffusion(**embed.config()).term_embedding and "term_embedding" not in plain.config()
    with pytest.raises(UserError, match="1st variant"):
        KLDiffusion(variant="2nd", term_embedding=True)
