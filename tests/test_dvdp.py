"""DVDP and subspace diffusion: decomposition identities, forward marginals, schedule, reverse jump (Theorem 1),
reverse sampler with an exact (oracle) epsilon, errors, and a tiny end-to-end run."""

from __future__ import annotations

import argparse
import math

import pytest
import torch

from diffaccel.errors import UserError
from diffaccel.methods import build_method
from diffaccel.methods.dvdp import (DVDP, SubspaceDiffusion, apply_per_subspace, attenuation_schedule, block_mean,
                                   down, subspace_components, up)
from diffaccel.schedules import linear_schedule


def _downs(x, k):
    for _ in range(k):
        x = down(x)
    return x


def _matrix(fn, d_in, shape_in):
    """The matrix of a linear map given as a function of images, column j = fn(e_j)."""
    eye = torch.eye(d_in, dtype=torch.float64).reshape(d_in, *shape_in)
    return fn(eye).reshape(d_in, -1).T


# --- decomposition ---------------------------------------------------------------------------------------------
def test_down_up_identities():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 8, 8, generator=g, dtype=torch.float64)
    y = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    torch.testing.assert_close(down(up(y)), y)  # D Dᵀ = I
    P = up(down(x))
    torch.testing.assert_close(up(down(P)), P)  # projection: idempotent
    torch.testing.assert_close((down(x) * y).sum(), (x * up(y)).sum())  # up is the adjoint of down
    torch.testing.assert_close(((x - P) * P).sum(), torch.zeros((), dtype=torch.float64))  # orthogonal projection
    # P is the 2×2 block mean, and down preserves the norm of block-constant images
    torch.testing.assert_close(P[..., :2, :2], x[..., :2, :2].mean((-1, -2), keepdim=True).expand(3, 2, 2, 2))
    torch.testing.assert_close(down(P).norm(), P.norm())
    torch.testing.assert_close(block_mean(x, 2), up(up(down(down(x)))))


def test_subspace_components_and_per_subspace_scaling():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 1, 16, 16, generator=g, dtype=torch.float64)
    K = 3
    for level in range(K + 1):
        xl = _downs(x, level)
        comps = subspace_components(xl, level, K)
        torch.testing.assert_close(sum(comps), xl)
        for a in range(len(comps)):
            for b in range(a + 1, len(comps)):
                assert abs((comps[a] * comps[b]).sum()) < 1e-10
        coef = torch.tensor([0.3, -1.5, 2.0, 0.7], dtype=torch.float64)
        expect = sum(coef[level + m] * c for m, c in enumerate(comps))
        torch.testing.assert_close(apply_per_subspace(xl, level, coef), expect)
    # down maps the subspaces that survive onto the next level's subspaces
    for i, (c0, c1) in enumerate(zip(subspace_components(x, 0, K)[1:], subspace_components(down(x), 1, K))):
        torch.testing.assert_close(down(c0), c1)


# --- schedule --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tps,lam_turn", [((600,), 1e-2), ((300, 600), 1e-2), ((250, 500, 750), 1e-3)])
def test_schedule_snr_monotone_and_small_at_turns(tps, lam_turn):
    lam, sig = attenuation_schedule(tps, 1000, lam_turn)
    K = len(tps)
    torch.testing.assert_close(lam[K] ** 2, linear_schedule(1000))  # coarsest subspace: DDPM linear
    torch.testing.assert_close(lam**2 + sig**2, torch.ones_like(lam))  # variance preserving per subspace
    snr = lam[:, 1:] ** 2 / sig[:, 1:] ** 2
    assert (snr[:, 1:] < snr[:, :-1]).all()  # SNR strictly decreasing in every subspace
    for i, turn in enumerate(tps):
        assert lam[i, turn] <= lam_turn * (1 + 1e-9)
        assert (lam[i] <= lam[i + 1]).all()  # each detail fades at least as fast as the next coarser subspace
    # every subspace is a valid Markov chain (eq. 7): L_t² = σ̄_t² − (λ̄_t/λ̄_{t−1})² σ̄_{t−1}² ≥ 0, with betas
    # that increase linearly in t like DDPM's: β_{i,t} = 1 − (1 − β_t)^{c_i} ≈ c_i β_t
    alpha = (lam[:, 1:] / lam[:, :-1]) ** 2
    L2 = sig[:, 1:] ** 2 - alpha * sig[:, :-1] ** 2
    assert (L2 >= -1e-12).all()
    betas = 1 - alpha
    base = betas[K]
    for i in range(K):
        c = betas[i, 0] / base[0]
        rel = (betas[i, : tps[i]] / (c * base[: tps[i]]) - 1).abs().max()
        assert rel < 0.1, rel


def test_subspace_diffusion_has_one_schedule():
    m = SubspaceDiffusion((300, 600))
    torch.testing.assert_close(m.lam, m.lam[-1:].expand_as(m.lam))
    torch.testing.assert_close(m.sig, m.sig[-1:].expand_as(m.sig))
    assert m.name == "subspace" and build_method("subspace", m.config()).turning_points == (300, 600)


# --- forward process -------------------------------------------------------------------------------------------
def test_q_sample_is_downsampled_full_resolution_process():
    """Eq. 6: x_t^k = D^k x_t^0, where x_t^0 is the full-dimensional ADP of eq. 5 with noise ε^0 and ε^k = D^k ε^0."""
    m = DVDP((300, 600))
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(4, 1, 16, 16, generator=g, dtype=torch.float64)
    e0 = torch.randn(4, 1, 16, 16, generator=g, dtype=torch.float64)
    for t in (1, 300, 301, 600, 601, 1000):
        k = int(m.stage(torch.tensor([t])))
        x_full = apply_per_subspace(x0, 0, m.lam[:, t]) + apply_per_subspace(e0, 0, m.sig[:, t])
        torch.testing.assert_close(m.q_sample(x0, torch.full((4,), t), _downs(e0, k)), _downs(x_full, k))


@pytest.mark.parametrize("t", [150, 450, 800])
def test_forward_marginal_per_subspace_monte_carlo(t):
    """Per subspace i, the component of x_t^k has mean λ̄_{i,t}·(D^k v_i) and per-dimension variance σ̄_{i,t}².

    N = 4000 draws; mean tolerance 5 standard errors per pixel, variance tolerance 5·sqrt(2/(N d_i)) relative."""
    m = DVDP((300, 600))
    g = torch.Generator().manual_seed(3)
    x0 = torch.rand(1, 1, 16, 16, generator=g, dtype=torch.float64) * 2 - 1
    N = 4000
    tt = torch.full((N,), t)
    k = int(m.stage(tt[:1]))
    xt = m.q_sample(x0.expand(N, -1, -1, -1), tt, generator=g)
    assert xt.shape == (N, 1, 16 // 2**k, 16 // 2**k)
    v = subspace_components(_downs(x0, k), k, m.K)
    for m_i, comp in enumerate(subspace_components(xt, k, m.K)):
        i = k + m_i
        lam, sig = m.lam[i, t].item(), m.sig[i, t].item()
        mean = comp.mean(0, keepdim=True)
        assert (mean - lam * v[m_i]).abs().max() <= 5 * sig / math.sqrt(N) + 1e-12
        d_i = subspace_dim(16 // 2**k, k, i, m.K)
        var = ((comp - lam * v[m_i]) ** 2).sum((1, 2, 3)).mean() / d_i
        assert abs(var / sig**2 - 1) <= 5 * math.sqrt(2 / (N * d_i)), (i, var, sig**2)


def subspace_dim(n: int, level: int, i: int, K: int) -> int:
    """Dimension of subspace i in an n×n single-channel image at resolution level ``level``."""
    coarse = n * n // 4 ** (i - level)
    return coarse if i == K else coarse - coarse // 4


def test_loss_is_zero_for_the_exact_epsilon_of_a_point_mass():
    """With every image equal to one x0, ε = per-subspace (x_t − λ̄ x_0^k)/σ̄ exactly, so the loss (eq. 12) vanishes;
    also checks that each stage's group reaches the network at its own resolution with its own t."""
    m = DVDP((300, 600))
    g = torch.Generator().manual_seed(4)
    x0 = torch.rand(1, 1, 16, 16, generator=g) * 2 - 1
    seen = []

    def oracle(x, t):
        k = {16: 0, 8: 1, 4: 2}[x.shape[-1]]
        ti = t.long()
        assert (m.stage(ti) == k).all()
        seen.append(k)
        x0k = _downs(x0, k)
        inv = (1 / m.sig[:, ti]).T
        return apply_per_subspace(x - apply_per_subspace(x0k.expand_as(x), k, m.lam[:, ti].T), k, inv)

    torch.manual_seed(0)
    loss = m.loss(oracle, x0.expand(64, -1, -1, -1))
    assert loss < 1e-9 and sorted(seen) == [0, 1, 2]


@pytest.mark.parametrize("batch, counts", [(32, [10, 9, 13]), (7, [2, 2, 3])])
def test_stratified_training_times_have_the_uniform_t_expectation(batch, counts):
    """Stage k gets n_k = its share of the batch (largest remainders), t uniform within it, weight p_k/n_k: the
    weighted batch sum of any f(t) is an unbiased estimate of the mean of f over t = 1..T. Monte Carlo over 4,000
    batches, tolerance 4 standard errors; shapes fixed from batch to batch."""
    m = DVDP((300, 600))
    torch.manual_seed(0)
    draws = [m.training_times(batch) for _ in range(4000)]
    for t, w in draws[:5]:  # shares 0.3, 0.3, 0.4 of the batch
        assert float(w.sum()) == pytest.approx(1.0)
        assert torch.allclose(w, torch.tensor([0.3 / counts[0]] * counts[0] + [0.3 / counts[1]] * counts[1]
                                              + [0.4 / counts[2]] * counts[2]))
    assert all([int((m.stage(t) == k).sum()) for k in range(3)] == counts for t, _ in draws)
    assert all(t.min() >= 1 and t.max() <= 1000 for t, _ in draws)

    def f(t):
        return (t.double() / 1000) ** 3 + (t > 600).double()  # uneven across and within the stages

    est = torch.stack([(w.double() * f(t)).sum() for t, w in draws])
    exact = f(torch.arange(1, 1001)).mean()
    assert abs(est.mean() - exact) < 4 * est.std() / math.sqrt(len(est))
    naive = torch.stack([f(torch.randint(1, 1001, (batch,))).mean() for _ in range(4000)])
    assert est.std() < naive.std()  # stratification lowers the variance


def test_batches_smaller_than_the_stage_count_fall_back_to_uniform_t():
    m = DVDP((300, 600))
    t, w = m.training_times(2)
    assert t.shape == (2,) and torch.equal(w, torch.full((2,), 0.5))


@pytest.mark.parametrize("t", [150, 450, 800])
def test_clipped_epsilon_keeps_in_range_x0_and_clips_the_rest(t):
    """clip_x0 for DVDP: with the true ε of an in-range x0 the clipped ε is ε itself; for an image outside the data
    range, the x0 implied by the clipped ε is D^k x0 clamped to ±2^k (the range of D^k of [-1, 1] images)."""
    m = DVDP((300, 600))
    k = int(m.stage(torch.tensor([t])))
    g = torch.Generator().manual_seed(5)
    x0 = (torch.rand(2, 1, 16, 16, generator=g, dtype=torch.float64) * 2 - 1)
    noise = torch.randn(2, 1, 16 // 2**k, 16 // 2**k, generator=g, dtype=torch.float64)
    lam, sig = m.lam[:, t], m.sig[:, t]
    x_t = m.q_sample(x0, torch.tensor([t]), noise)
    torch.testing.assert_close(m.clipped_epsilon(x_t, noise, t, k), noise, rtol=0, atol=1e-9)

    wide = 3 * x0
    wide[..., :8] += 2  # left half beyond the range at every level, right half partly inside
    x_t = m.q_sample(wide, torch.tensor([t]), noise)
    eps = m.clipped_epsilon(x_t, noise, t, k)
    implied = apply_per_subspace(x_t, k, 1 / lam) - apply_per_subspace(eps, k, sig / lam)
    assert (_downs(wide, k).abs() > 2**k).any() and (_downs(wide, k).abs() < 2**k).any()
    torch.testing.assert_close(implied, _downs(wide, k).clamp(-(2**k), 2**k), rtol=0, atol=1e-9)


# --- reverse process -------------------------------------------------------------------------------------------
def _jump_covariance_error(method, Sigma, n=4):
    """Exact covariances (from the code's linear maps) of the true q(x_{T_1}^0) and of the jump's p(x_{T_1}^0)."""
    d = Sigma.shape[0]
    T1 = method.turning_points[0]
    t = torch.full((d,), T1)
    A = _matrix(lambda e: method.q_sample(e, t, torch.zeros_like(e)), d, (1, n, n))
    E = _matrix(lambda e: method.q_sample(torch.zeros_like(e), t, e), d, (1, n, n))
    cov_q = A @ Sigma @ A.T + E @ E.T
    Dm = _matrix(down, d, (1, n, n))  # x_{T_1}^1 = D x_{T_1}^0 (eq. 8)
    U = _matrix(up, d // 4, (1, n // 2, n // 2))
    P = U @ Dm
    sig = method.sig[0, T1].item()
    cov_p = U @ (Dm @ cov_q @ Dm.T) @ U.T + sig**2 * (torch.eye(d, dtype=torch.float64) - P)  # eq. 11
    return cov_q, cov_p


def _sym_kl_bound(c1, c2):
    """JSD(p‖q) ≤ ¼(KL(p‖q) + KL(q‖p)) for zero-mean Gaussians (KL is convex in its second argument)."""
    d = c1.shape[0]
    kl12 = 0.5 * (torch.linalg.solve(c2, c1).trace() - d + torch.logdet(c2) - torch.logdet(c1))
    kl21 = 0.5 * (torch.linalg.solve(c1, c2).trace() - d + torch.logdet(c1) - torch.logdet(c2))
    return (0.25 * (kl12 + kl21)).item()


def _theorem1_bound(method, d):
    T1 = method.turning_points[0]
    snr = method.lam[:, T1] / method.sig[:, T1]
    r = 2 * math.sqrt(d) * snr.max().item()
    log_vd = (d / 2) * math.log(math.pi) - math.lgamma(d / 2 + 1) + d * math.log(r)  # volume of the d-ball
    return (math.sqrt(2) / 2 * math.exp(-0.5) * math.sqrt(d)
            * (2 * math.sqrt(2) + math.exp(log_vd - d / 2 * math.log(2 * math.pi))) * snr[0].item())


def test_reverse_jump_theorem1_gaussian_data():
    """x0 ~ N(0, Σ) with correlated pixels on 4×4 images: the jump at T_1 (eq. 11) applied to the true low-dimensional
    marginal gives a Gaussian whose divergence from the true q(x_{T_1}^0) is within Theorem 1's bound and vanishes
    as lambda_at_turn → 0 (JSD ≈ O(λ̄²), covariance error O(λ̄)); subspace diffusion at the same T_1 is far worse."""
    d, n = 16, 4
    g = torch.Generator().manual_seed(5)
    B = torch.randn(d, d, generator=g, dtype=torch.float64)
    Sigma = 0.2 * (B @ B.T) / d + 0.05 * torch.eye(d, dtype=torch.float64)
    jsd, cov_err = [], []
    for lam_turn in (1e-1, 1e-2, 1e-3):
        m = DVDP((600,), lambda_at_turn=lam_turn)
        cov_q, cov_p = _jump_covariance_error(m, Sigma, n)
        jsd.append(_sym_kl_bound(cov_p, cov_q))
        cov_err.append((cov_p - cov_q).norm().item())
        assert jsd[-1] <= _theorem1_bound(m, d)
        # closed form of the error: λ̄_0²(I−P)Σ(I−P) + λ̄_0λ̄_1[(I−P)ΣP + PΣ(I−P)], so ‖·‖ ≤ (λ̄_0² + 2λ̄_0λ̄_1)‖Σ‖
        l0, l1 = m.lam[0, 600].item(), m.lam[1, 600].item()
        assert cov_err[-1] <= (l0**2 + 2 * l0 * l1) * Sigma.norm().item() * (1 + 1e-9)
    assert jsd[0] > 50 * jsd[1] > 50 * 50 * jsd[2]
    assert cov_err[0] > 5 * cov_err[1] > 25 * cov_err[2]
    cov_q, cov_p = _jump_covariance_error(SubspaceDiffusion((600,)), Sigma, n)
    assert _sym_kl_bound(cov_p, cov_q) > 100 * jsd[1]


def test_jump_adds_noise_in_the_detail_subspace_only():
    """Monte Carlo: jump(0) has covariance σ̄²(I − P) (N = 20000, tolerance 0.03 absolute per entry),
    and jump(x) − jump(0) = Dᵀx with the same noise."""
    m = DVDP((600,))
    g = torch.Generator().manual_seed(6)
    z = m.jump(torch.zeros(20000, 1, 2, 2, dtype=torch.float64), 0, g).reshape(20000, 16)
    P = _matrix(lambda e: up(down(e)), 16, (1, 4, 4))
    expect = m.sig[0, 600] ** 2 * (torch.eye(16, dtype=torch.float64) - P)
    assert (z.T @ z / 20000 - expect).abs().max() < 0.03
    x = torch.randn(3, 1, 2, 2, generator=g, dtype=torch.float64)
    a = m.jump(x, 0, torch.Generator().manual_seed(7))
    b = m.jump(torch.zeros_like(x), 0, torch.Generator().manual_seed(7))
    torch.testing.assert_close(a - b, up(x))


def test_step_coefficients_are_the_ddpm_posterior():
    """For s = t − 1, η = 1, the per-subspace step is x_t/√α_t − β_t/(√α_t σ̄_t) ε + sqrt(β̃_t) z (DDPM eq. 2 with the
    posterior variance), computed here independently from the per-subspace betas."""
    m = DVDP((300, 600))
    for t in (1, 2, 150, 301, 600, 1000):
        a, b, c = m.step_coefficients(t, t - 1, 1.0)
        alpha = (m.lam[:, t] / m.lam[:, t - 1]) ** 2
        beta = 1 - alpha
        torch.testing.assert_close(a, 1 / alpha.sqrt())
        torch.testing.assert_close(b, -beta / (alpha.sqrt() * m.sig[:, t]))
        torch.testing.assert_close(c**2, beta * m.sig[:, t - 1] ** 2 / m.sig[:, t] ** 2)


def test_no_turning_points_is_ddpm():
    """K = 0 reduces to the baseline's linear-schedule DDPM: identical samples from the same random numbers."""
    from diffaccel.methods.baseline import Baseline

    def net(x, t):
        return 0.3 * x + torch.sin(t / 100).view(-1, 1, 1, 1).to(x.dtype)

    base, m = Baseline(N=1000, schedule="linear"), DVDP(())
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        for opts in (dict(sampler="ddpm"), dict(sampler="ddim", steps=17, eta=0.5)):
            # the baseline's DDIM grid is uniform in t: compare on that allocation (DVDP's default is log-snr)
            a = m.sample(net, 2, (1, 4, 4), generator=torch.Generator().manual_seed(8), progress=False,
                         step_allocation="uniform", **opts)
            b = base.sample(net, 2, (1, 4, 4), generator=torch.Generator().manual_seed(8), progress=False, **opts)
            torch.testing.assert_close(a, b)
    finally:
        torch.set_default_dtype(old)


def _predicted_variances(m, s2, sampler, steps, eta):
    """Per-subspace variance of the sampler's output for Gaussian data with the exact epsilon, by a scalar recursion:
    each step maps a component of variance v to (a + b·e)² v + c² (e = the oracle's epsilon gain), each jump gives
    the new detail subspace variance σ̄² and leaves the coarser subspaces unchanged (Dᵀ is an isometry)."""
    K = m.K
    v = torch.ones(K + 1, dtype=torch.float64)
    for pos, times in enumerate(m.time_grid(sampler, steps)):
        k = K - pos
        for t, s in zip(times[:-1], times[1:]):
            a, b, c = m.step_coefficients(t, s, eta)
            e = m.sig[:, t] / (m.lam[:, t] ** 2 * s2 + m.sig[:, t] ** 2)
            v = (a + b * e) ** 2 * v + c**2
        if k > 0:
            v[k - 1] = m.sig[k - 1, m.turning_points[k - 1]] ** 2
    return v


@pytest.mark.parametrize("opts", [dict(sampler="ddpm", steps=0, eta=1.0), dict(sampler="ddim", steps=40, eta=1.0),
                                  dict(sampler="ddim", steps=40, eta=0.0)])
def test_sampler_with_exact_epsilon_on_gaussian_data(opts):
    """Data x0 ~ N(0, Σ), Σ = Σ_i s_i² Π_i (isotropic in each subspace), whose exact epsilon is per subspace
    ε̂ = σ̄ x/(λ̄² s_i² + σ̄²). Sampling 8×8 images from 2×2 noise (K = 2, T = 250, turning points 75, 150) with it:
    the per-subspace output variances match the scalar recursion above (N = 600 draws, tolerance 5 standard errors
    sqrt(2/(N d_i))), and for the paper's T = 1000, turning points 300, 600 the recursion lands within 10% of s_i²
    for DDPM (the residual is DDPM's own discretisation, larger in the fast-fading detail subspaces: the posterior
    variance omits Var[x0 | x_t])."""
    torch.manual_seed(0)
    m = DVDP((75, 150), T=250)
    s2 = torch.tensor([0.1, 0.3, 1.5], dtype=torch.float64)  # fine detail, middle detail, coarse

    def oracle(x, t):
        k = {8: 0, 4: 1, 2: 2}[x.shape[-1]]
        ti = int(t[0])
        assert (t == ti).all() and int(m.stage(t[:1].long())) == k
        lam, sig = m.lam[:, ti], m.sig[:, ti]
        return apply_per_subspace(x, k, sig / (lam**2 * s2 + sig**2))

    N = 600
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only add overhead
    try:
        x = m.sample(oracle, N, (1, 8, 8), generator=torch.Generator().manual_seed(9), progress=False, **opts)
    finally:
        torch.set_num_threads(threads)
    assert x.shape == (N, 1, 8, 8)
    predicted = _predicted_variances(m, s2, **opts)
    for i, comp in enumerate(subspace_components(x.double(), 0, 2)):
        d_i = subspace_dim(8, 0, i, 2)
        var = (comp**2).sum((1, 2, 3)).mean() / d_i
        assert abs(var / predicted[i] - 1) < 5 * math.sqrt(2 / (N * d_i)), (i, var, predicted[i])
    if opts["sampler"] == "ddpm":
        predicted = _predicted_variances(DVDP((300, 600)), s2, **opts)
        assert ((predicted / s2 - 1).abs() < 0.1).all(), predicted


def test_ddim_grid_hits_every_turning_point():
    m = DVDP((300, 600))
    grid = m.time_grid("ddim", 20)
    assert [g[0] for g in grid] == [1000, 600, 300] and [g[-1] for g in grid] == [600, 300, 0]
    assert sum(len(g) - 1 for g in grid) == 20 == m.nfe(sampler="ddim", steps=20)
    assert m.nfe(sampler="ddpm") == 1000
    assert m.relative_cost("ddpm") == pytest.approx(300 + 300 / 4 + 400 / 16)
    assert sum(len(g) - 1 for g in m.time_grid("ddim", 3)) == 3


# --- errors and configuration ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,match", [
    (dict(turning_points=(600, 300)), "strictly increasing"),
    (dict(turning_points=(300, 300)), "strictly increasing"),
    (dict(turning_points=(0,)), "between 0 and T"),
    (dict(turning_points=(1000,)), "between 0 and T"),
    (dict(turning_points=(50,), T=40), "between 0 and T"),
    (dict(lambda_at_turn=0.0), "lambda-at-turn"),
    (dict(lambda_at_turn=1.5), "lambda-at-turn"),
])
def test_bad_configuration_errors(kwargs, match):
    with pytest.raises(UserError, match=match):
        DVDP(**kwargs)


def test_too_many_turning_points_for_the_image_size():
    m = DVDP((200, 400, 600, 800))
    with pytest.raises(UserError, match="divisible by 16"):
        m.loss(lambda x, t: x, torch.zeros(2, 1, 8, 8))
    with pytest.raises(UserError, match="divisible by 16"):
        m.sample(lambda x, t: x, 1, (1, 8, 8), progress=False)
    with pytest.raises(UserError, match="too many turning points"):
        DVDP((300, 600)).build_networks({"preset": "tiny"}, (1, 4, 4))
    with pytest.raises(UserError, match="steps"):
        DVDP((300, 600)).sample(lambda x, t: x, 1, (1, 8, 8), sampler="ddim", steps=2, progress=False)
    with pytest.raises(UserError, match="one stage"):
        DVDP((600,)).q_sample(torch.zeros(2, 1, 8, 8), torch.tensor([10, 700]))


def test_command_line_flags():
    parser = argparse.ArgumentParser()
    group = parser.add_argument_group("method")
    DVDP.add_arguments(group)
    SubspaceDiffusion.add_arguments(group)  # shared flags are added once
    args = parser.parse_args(["--turning-points", "300,600", "--lambda-at-turn", "0.001"])
    m = DVDP.from_args(args)
    assert m.turning_points == (300, 600) and m.lambda_at_turn == 1e-3
    assert SubspaceDiffusion.from_args(args).turning_points == (300, 600)
    assert DVDP.from_args(parser.parse_args([])).turning_points == (600,)
    assert SubspaceDiffusion.from_args(parser.parse_args([])).jump_kind == "fitted"
    assert SubspaceDiffusion.from_args(parser.parse_args(["--subspace-jump", "noise"])).jump_kind == "noise"
    assert SubspaceDiffusion.from_args(parser.parse_args(["--subspace-networks", "per-stage"])).networks == "per-stage"
    with pytest.raises(SystemExit):
        parser.parse_args(["--subspace-jump", "both"])
    assert build_method("dvdp", m.config()).config() == m.config()
    with pytest.raises(SystemExit):
        parser.parse_args(["--turning-points", "3x"])


# --- end to end ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["dvdp"])  # subspace diffusion runs the same code path
def test_tiny_run_trains_checkpoints_resumes_and_samples_from_low_resolution_noise(tmp_path, name):
    """8×8 digits, tiny UNet, one turning point: train 2 steps, checkpoint, resume to 4, reload the run and sample
    full-resolution 8×8 images whose first network call sees 4×4 noise."""
    from diffaccel.methods import method_class
    from diffaccel.runs import load_run, read_metrics
    from diffaccel.train import TrainConfig, train

    method = method_class(name)(turning_points=(25,), T=50)
    cfg = TrainConfig(data="digits", net={"preset": "tiny"}, batch_size=8, steps=2, checkpoint_every=2, log_every=1,
                      out=str(tmp_path / "run"), sample_n=4, sample_options={"sampler": "ddim", "steps": 3},
                      device="cpu")
    train(cfg, method, progress=False, log=lambda *_: None)
    cfg.steps = 4
    run = train(cfg, method_class(name)(turning_points=(25,), T=50), resume=True, progress=False, log=lambda *_: None)
    assert [r["step"] for r in read_metrics(run) if "loss" in r] == [1, 2, 3, 4]
    loaded, nets = load_run(run)
    assert loaded.name == name and loaded.config() == method.config()
    sizes = []
    net = nets["net"]

    def recording(x, t):
        sizes.append(x.shape[-1])
        return net(x, t)

    for opts in (dict(sampler="ddim", steps=3), dict(sampler="ddpm"), dict(sampler="ddim", steps=3, clip_x0=True)):
        sizes.clear()
        images = loaded.sample(recording, 3, (1, 8, 8), generator=torch.Generator().manual_seed(0), progress=False,
                               **opts)
        assert images.shape == (3, 1, 8, 8) and torch.isfinite(images).all()
        assert sizes[0] == 4 and sizes[-1] == 8 and len(sizes) == loaded.nfe(**opts)


@pytest.mark.slow  # seven tiny training runs and their evaluations: tens of seconds on a loaded 2-core machine
@pytest.mark.parametrize("name", ["dvdp", "dvdp-64"])
def test_benchmark_quick_runs_on_the_harness_with_speed_ratios(tmp_path, name):
    from diffaccel.bench import benchmark_function

    summary = benchmark_function(name)(tmp_path / "out", quick=True, seeds=1)
    labels = [r["model"] for r in summary["rows"]]
    expected = ["DDPM", "DVDP T1=25", "subspace T1=25"] if name == "dvdp" else ["DDPM", "DVDP T={15,30}"]
    assert list(dict.fromkeys(labels)) == expected
    assert {r["sampler"] for r in summary["rows"] if r["model"] != expected[1]} == {"DDIM-3", "DDPM"}
    assert {r["sampler"] for r in summary["rows"] if r["model"] == expected[1]} == {"DDIM-3", "DDIM-3 uniform", "DDPM"}
    speed = {e["model"]: e for e in summary["extra"]["speed"]}
    assert speed["DDPM"]["train speed-up vs DDPM"] == 1.0 and speed["DDPM"]["sampling speed-up vs DDPM"] == 1.0
    for e in speed.values():
        assert e["train s/step"] > 0 and e["sample s/image"] > 0
    dvdp = speed[expected[1]]
    assert dvdp["full-res NFE"] < speed["DDPM"]["full-res NFE"]  # lower-resolution stages cost less per call
    for f in ("results.json", "results.md", "results.png", "schedule.png"):
        assert (tmp_path / "out" / f).is_file()
    assert "Speed" in (tmp_path / "out" / "results.md").read_text()


def test_log_snr_allocation_gives_every_stage_a_step_and_sums_to_nfe():
    from diffaccel.methods.dvdp import DVDP, SubspaceDiffusion

    for m in (DVDP(turning_points=(300, 600)), DVDP(turning_points=(600,)), SubspaceDiffusion(turning_points=(300, 600))):
        for steps in (m.K + 1, 5, 10, 20, 50, 200, 1000):
            counts = m.stage_counts(steps, "log-snr")
            assert sum(counts) == steps and min(counts) >= 1
            grid = m.time_grid("ddim", steps, "log-snr")
            assert [len(g) - 1 for g in grid] == counts[::-1]
            for k, times in zip(range(m.K, -1, -1), grid):
                assert times[0] == m._bounds[k + 1] and times[-1] == m._bounds[k]
                assert all(b < a for a, b in zip(times, times[1:]))
    # DVDP's fine subspace spans a wider log-SNR range in stage 0 than t's share: it gets more steps there
    m = DVDP(turning_points=(300, 600))
    assert m.stage_counts(20, "log-snr")[0] > m.stage_counts(20, "uniform")[0]
    # inside a stage the log-SNR of its finest subspace is evenly spaced up to rounding to integer times (coarse
    # only at the last few times, t <= 3, where one time step moves the log-SNR by more than a gap)
    times = torch.tensor(m.time_grid("ddim", 50, "log-snr")[-1][:-1])
    gaps = m.log_snr(0, times).diff().abs()[:-3]
    assert (gaps / gaps.mean() - 1).abs().max() < 0.15


def test_stage_steps_are_honoured_and_validated():
    from diffaccel.methods.dvdp import DVDP

    m = DVDP(turning_points=(300, 600))
    grid = m.time_grid("ddim", 0, stage_steps=(7, 2, 3))
    assert [len(g) - 1 for g in grid] == [3, 2, 7]
    assert m.nfe(stage_steps=(7, 2, 3)) == 12
    for bad in ((7, 2), (0, 2, 3), (301, 1, 1)):
        with pytest.raises(UserError):
            m.time_grid("ddim", 0, stage_steps=bad)
    with pytest.raises(UserError):
        m.stage_counts(10, "cosine")


def test_subspace_jump_restores_the_forward_marginal_of_the_dropped_component():
    """Jing et al.'s jump on data whose detail subspace is isotropic with variance v: the jump's output covariance
    (exact, from the code's linear maps) equals the forward marginal q(x_{T_1}^0) once the injected variance is
    ᾱv + (1 − ᾱ); with noise alone (v = 0 in the jump) the detail band is short by ᾱv per dimension."""
    d, n, v = 16, 4, 0.3
    g = torch.Generator().manual_seed(11)
    Dm = _matrix(down, d, (1, n, n))
    U = _matrix(up, d // 4, (1, n // 2, n // 2))
    P = U @ Dm
    B = torch.randn(d // 4, d // 4, generator=g, dtype=torch.float64)
    Sigma = U @ (B @ B.T / 4 + 0.1 * torch.eye(d // 4, dtype=torch.float64)) @ U.T + v * (torch.eye(d, dtype=torch.float64) - P)
    m = SubspaceDiffusion((600,), jump="fitted")
    samples = torch.distributions.MultivariateNormal(torch.zeros(d, dtype=torch.float64), Sigma).sample(
        (4000,)).view(4000, 1, n, n)
    assert abs(m.fit_detail_variance(samples)[0] - v) < 5 * v * (2 / (4000 * 12)) ** 0.5
    m.detail_variance = (v,)
    cov_q, _ = _jump_covariance_error(m, Sigma, n)
    jumped = _matrix(lambda e: m.jump(e, 0, torch.Generator().manual_seed(1))
                     - m.jump(torch.zeros_like(e), 0, torch.Generator().manual_seed(1)), d // 4, (1, n // 2, n // 2))
    torch.testing.assert_close(jumped, U)                              # the deterministic part of the jump is Dᵀ
    T1 = 600
    ab = m.lam[0, T1].item() ** 2
    I = torch.eye(d, dtype=torch.float64)
    cov_jump = U @ (Dm @ cov_q @ Dm.T) @ U.T + (ab * v + m.sig[0, T1].item() ** 2) * (I - P)
    torch.testing.assert_close(cov_jump, cov_q, rtol=0, atol=1e-12)
    # Monte Carlo on the jump itself: the injected detail noise has variance ᾱv + 1 − ᾱ (20k draws, 5 % tolerance).
    z = m.jump(torch.zeros(20000, 1, 2, 2, dtype=torch.float64), 0, torch.Generator().manual_seed(3)).flatten(1)
    detail_var = (z @ (I - P)).pow(2).sum(1).mean() / 12
    assert abs(detail_var / (ab * v + 1 - ab) - 1) < 0.05
    old = SubspaceDiffusion((600,))                                    # no detail variance: noise only
    z0 = old.jump(torch.zeros(20000, 1, 2, 2, dtype=torch.float64), 0, torch.Generator().manual_seed(3)).flatten(1)
    assert abs((z0 @ (I - P)).pow(2).sum(1).mean() / 12 / (1 - ab) - 1) < 0.05


def test_subspace_detail_variance_refused_when_malformed():
    for bad in ((0.1,), (-1.0, 0.1), (float("nan"), 0.1), ("x", 0.1)):
        with pytest.raises(UserError, match="detail_variance"):
            SubspaceDiffusion((300, 600), jump="fitted", detail_variance=bad)
    with pytest.raises(UserError, match="jump"):
        SubspaceDiffusion((600,), jump="both")
    with pytest.raises(UserError, match="only by the fitted"):
        SubspaceDiffusion((600,), jump="noise", detail_variance=(0.1,))
    with pytest.raises(UserError, match="train first"):    # fitted, but never fitted: refused, not noise-only
        SubspaceDiffusion((600,), jump="fitted").jump(torch.zeros(1, 1, 2, 2), 0)
    with pytest.raises(UserError, match="n>=2"):
        SubspaceDiffusion((600,), jump="fitted").fit_detail_variance(torch.zeros(1, 1, 4, 4))


def test_subspace_fits_detail_variance_when_training_starts_and_keeps_it_in_its_config(tmp_path):
    """The trainer's prepare hook fits v from the training images; the run's config carries it, so reloading
    (sampling, export) and resuming rebuild the same jump. Two turning points on 8×8 digits: two values, each the
    per-dimension variance of the data's detail component at its level, recomputed here with reshapes."""
    from diffaccel.data import load_dataset
    from diffaccel.runs import load_run
    from diffaccel.train import TrainConfig, train

    data = load_dataset("digits")
    x = data.to_model_space(data.images).double()
    expected = []
    for _ in range(2):
        n, c, h, w = x.shape
        blocks = x.view(n, c, h // 2, 2, w // 2, 2)
        detail = blocks - blocks.mean((3, 5), keepdim=True)
        expected.append(float(detail.var(0).sum() / (c * h * w * 3 / 4)))
        x = 2 * blocks.mean((3, 5))
    method = SubspaceDiffusion(turning_points=(20, 35), T=50, jump="fitted")
    cfg = TrainConfig(data="digits", net={"preset": "tiny"}, batch_size=8, steps=1, checkpoint_every=1, log_every=1,
                      out=str(tmp_path / "run"), device="cpu")
    run = train(cfg, method, progress=False, log=lambda *_: None)
    assert method.detail_variance == pytest.approx(expected, rel=1e-9)
    loaded, _ = load_run(run)
    assert loaded.config() == method.config() and loaded.config()["jump"] == "fitted"
    assert loaded.jump_std(0) ** 2 == pytest.approx(loaded.sig[0, 20].item() ** 2
                                                    + loaded.lam[0, 20].item() ** 2 * expected[0])
    cfg.steps = 2
    train(cfg, build_method("subspace", loaded.config()), resume=True, progress=False, log=lambda *_: None)
    # a config written before the fitted jump existed rebuilds to the noise-only jump it was sampled with
    old = build_method("subspace", {"turning_points": [20, 35], "T": 50})
    assert old.config() == {"turning_points": [20, 35], "T": 50} and old.jump_kind == "noise"
    assert old.jump_std(0) == pytest.approx(old.sig[0, 20].item())


def test_stage_networks_route_each_time_step_to_its_stage():
    from diffaccel.methods.dvdp import StageNetworks

    calls = []

    def stage_net(k):
        def f(x, t):
            calls.append((k, x.shape[-1], sorted(t.tolist())))
            return x + k
        return f

    class Wrap(torch.nn.Module):
        def __init__(self, f):
            super().__init__()
            self.f = f

        def forward(self, x, t):
            return self.f(x, t)

    nets = StageNetworks([Wrap(stage_net(k)) for k in range(3)], (300, 600))
    out = nets(torch.zeros(4, 1, 2, 2), torch.tensor([1.0, 300.0, 301.0, 1000.0]))
    assert out[:, 0, 0, 0].tolist() == [0, 0, 1, 2]
    assert calls == [(0, 2, [1.0, 300.0]), (1, 2, [301.0]), (2, 2, [1000.0])]
    with pytest.raises(UserError, match="stage networks"):
        StageNetworks([Wrap(stage_net(0))], (300,))


def test_subspace_per_stage_networks_train_resume_sample_and_refuse_export(tmp_path):
    """--subspace-networks per-stage: one UNet per stage, each built for its stage's resolution (8×8, then 4×4);
    the loss sends each stage's images to its own network only; a tiny run trains, resumes, reloads and samples,
    and export to diffusers is refused with one line."""
    from diffaccel.export import export_run
    from diffaccel.methods.dvdp import StageNetworks
    from diffaccel.runs import load_run
    from diffaccel.train import TrainConfig, train

    method = SubspaceDiffusion(turning_points=(25,), T=50, jump="fitted", networks="per-stage")
    nets = method.build_networks({"preset": "tiny"}, (1, 8, 8))
    assert isinstance(nets["net"], StageNetworks)
    s0, s1 = nets["net"].stages
    assert s0.unet.config.sample_size == 8 and s1.unet.config.sample_size == 4
    seen = {0: [], 1: []}
    for k, stage in enumerate((s0, s1)):
        stage.register_forward_hook(lambda mod, inp, out, k=k: seen[k].append((inp[0].shape[-1], inp[1].max().item())))
    torch.manual_seed(0)
    method.loss(nets["net"], torch.zeros(16, 1, 8, 8))
    assert seen[0] and seen[1]
    assert all(size == 8 and t <= 25 for size, t in seen[0]) and all(size == 4 and t > 25 for size, t in seen[1])
    cfg = TrainConfig(data="digits", net={"preset": "tiny"}, batch_size=8, steps=1, checkpoint_every=1, log_every=1,
                      out=str(tmp_path / "run"), device="cpu")
    train(cfg, method, progress=False, log=lambda *_: None)
    cfg.steps = 2
    train(cfg, build_method("subspace", method.config()), resume=True, progress=False, log=lambda *_: None)
    loaded, loaded_nets = load_run(tmp_path / "run")
    assert loaded.config()["networks"] == "per-stage" and isinstance(loaded_nets["net"], StageNetworks)
    images = loaded.sample(loaded_nets["net"], 2, (1, 8, 8), generator=torch.Generator().manual_seed(0),
                           sampler="ddim", steps=3, progress=False)
    assert images.shape == (2, 1, 8, 8) and torch.isfinite(images).all()
    with pytest.raises(UserError, match="UNet2DModel"):
        export_run(tmp_path / "run", tmp_path / "export")
    with pytest.raises(UserError, match="networks"):
        SubspaceDiffusion((600,), networks="many")
