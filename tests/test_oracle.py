import torch

from diffaccel.oracle.gaussian_vp import GaussianVPEpsilon
from diffaccel.schedules import linear_schedule


def test_exact_epsilon_matches_monte_carlo_regression():
    # eps and x_k are jointly Gaussian, so the least-squares regression of eps on (x_k, 1) over many draws
    # is the posterior mean: it must match the closed form to Monte-Carlo error.
    g = torch.Generator().manual_seed(0)
    d, n = 3, 200_000
    a_mat = torch.randn(d, d, generator=g, dtype=torch.float64)
    cov, mean = a_mat @ a_mat.T * 0.3, torch.tensor([0.5, -0.2, 0.1], dtype=torch.float64)
    alpha_bars = linear_schedule(100).double()
    net = GaussianVPEpsilon(mean, cov, alpha_bars, (d,))
    k = 40
    x0 = mean + torch.randn(n, d, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(cov).T
    eps = torch.randn(n, d, generator=g, dtype=torch.float64)
    ab = alpha_bars[k]
    xk = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
    design = torch.cat([xk, torch.ones(n, 1, dtype=torch.float64)], 1)
    coef = torch.linalg.lstsq(design, eps).solution
    probe = torch.randn(16, d, generator=g, dtype=torch.float64)
    mc = torch.cat([probe, torch.ones(16, 1, dtype=torch.float64)], 1) @ coef
    exact = net(probe, torch.full((16,), float(k)))
    assert (mc - exact).abs().max() < 0.02


def test_ddpm_with_exact_epsilon_reproduces_target_covariance():
    from diffaccel.samplers import ddpm

    g = torch.Generator().manual_seed(1)
    d, n = 4, 8000
    a_mat = torch.randn(d, d, generator=g, dtype=torch.float64)
    cov = a_mat @ a_mat.T * 0.1 + 0.01 * torch.eye(d, dtype=torch.float64)
    mean = torch.zeros(d, dtype=torch.float64)
    alpha_bars = linear_schedule(1000).double()
    net = GaussianVPEpsilon(mean, cov, alpha_bars, (d,))
    x = ddpm(net, torch.randn(n, d, generator=g, dtype=torch.float64), alpha_bars, generator=g, progress=False)
    emp = torch.cov(x.T)
    # sampling error of a covariance entry is about sqrt((S_ii S_jj + S_ij^2) / n); allow 5 of those
    tol = 5 * ((cov.diag()[:, None] * cov.diag()[None, :] + cov**2) / n).sqrt()
    assert ((emp - cov).abs() < tol + 1e-3).all()


def test_band_metrics_see_a_damped_high_band():
    from diffaccel.oracle.bands import band_metrics, dct_basis

    g = torch.Generator().manual_seed(2)
    h = w = 4
    basis, band = dct_basis(h, w)
    assert torch.allclose(basis @ basis.T, torch.eye(h * w, dtype=torch.float64), atol=1e-10)
    lam = torch.rand(h * w, generator=g, dtype=torch.float64) + 0.5
    cov, mean = basis.T @ torch.diag(lam) @ basis, torch.zeros(h * w, dtype=torch.float64)
    coeffs = torch.randn(20000, h * w, generator=g, dtype=torch.float64) * lam.sqrt()
    exact = band_metrics(coeffs @ basis, mean, cov, h, w)
    coeffs[:, band == 2] *= 0.5                    # produced high-band variance = 0.25 of the target's
    damped = band_metrics(coeffs @ basis, mean, cov, h, w)
    for name in ("low", "mid", "high"):
        assert abs(exact[name]["var_ratio"] - 1) < 0.05 and exact[name]["frechet"] < 0.02
    assert abs(damped["high"]["var_ratio"] - 0.25) < 0.02
    # W2^2 of two diagonal Gaussians: sum (sqrt(lam) - sqrt(lam/4))^2 = sum lam / 4
    assert abs(damped["high"]["frechet"] - lam[band == 2].sum() / 4) < 0.05 * lam[band == 2].sum()


def _tiny_gaussian(d, g, scale=0.3):
    a_mat = torch.randn(d, d, generator=g, dtype=torch.float64)
    return torch.randn(d, generator=g, dtype=torch.float64) * 0.3, a_mat @ a_mat.T * scale / d + 0.01 * torch.eye(
        d, dtype=torch.float64)


def test_dvdp_exact_epsilon_matches_monte_carlo_regression():
    # in every stage eps and x_t^k are jointly Gaussian: the least-squares regression of the forward process's
    # own noise on (x_t^k, 1) is the posterior mean, for DVDP's schedules and subspace diffusion's shared one
    from diffaccel.methods.dvdp import DVDP, SubspaceDiffusion
    from diffaccel.oracle.dvdp_exact import DVDPExactEpsilon

    g = torch.Generator().manual_seed(3)
    shape, n = (1, 4, 4), 100_000
    mean, cov = _tiny_gaussian(16, g)
    x0 = (mean + torch.randn(n, 16, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(cov).T).view(n, *shape)
    for method in (DVDP(turning_points=(300, 600)), SubspaceDiffusion(turning_points=(500,))):
        net = DVDPExactEpsilon(method, mean, cov, shape)
        for t in (150, 450, 900):
            h = 4 // 2 ** int(method.stage(torch.tensor([t])))
            noise = torch.randn(n, 1, h, h, generator=g, dtype=torch.float64)
            xt = method.q_sample(x0, torch.full((n,), t), noise=noise)
            design = torch.cat([xt.flatten(1), torch.ones(n, 1, dtype=torch.float64)], 1)
            coef = torch.linalg.lstsq(design, noise.flatten(1)).solution
            mc = design[:8] @ coef
            exact = net(xt[:8], torch.full((8,), float(t))).flatten(1)
            assert (mc - exact).abs().max() < 0.03, (method.name, t, (mc - exact).abs().max())


def test_dvdp_sampler_with_exact_epsilon_reproduces_turning_point_covariance():
    # DVDP's own DDPM sampler, unchanged, driven by the exact eps: the state it holds when it enters each stage
    # (after the jump at T_k, at stage k-1's resolution) must have the forward marginal's covariance there,
    # computed independently as J cov Jᵀ + N Nᵀ from q_sample applied to unit images (x_t is linear in x0, noise).
    from diffaccel.methods.dvdp import DVDP
    from diffaccel.oracle.dvdp_exact import DVDPExactEpsilon

    g = torch.Generator().manual_seed(4)
    shape, n = (1, 4, 4), 6000
    mean, cov = _tiny_gaussian(16, g)
    method = DVDP(turning_points=(300, 600))
    exact = DVDPExactEpsilon(method, mean, cov, shape)
    seen = {}

    def net(x, t):
        step = int(t[0])
        if step in method.turning_points:
            seen.setdefault(step, x.clone())
        return exact(x, t)

    x = method.sample(net, n, shape, generator=g, sampler="ddpm", progress=False).double()
    seen[0] = x.view(n, *shape)
    assert sorted(seen) == [0, 300, 600]
    eye = torch.eye(16, dtype=torch.float64).view(16, *shape)
    for step, xs in seen.items():
        t = torch.full((16,), step) if step else torch.zeros(16, dtype=torch.long)
        if step == 0:
            emp, target = torch.cov(xs.flatten(1).T), cov
        else:
            d = xs[0].numel()
            zero_noise = torch.zeros(16, *xs.shape[1:], dtype=torch.float64)
            jac = method.q_sample(eye, t, noise=zero_noise).flatten(1).T                    # [d, 16]
            unit = torch.eye(d, dtype=torch.float64).view(d, *xs.shape[1:])
            noise_map = method.q_sample(torch.zeros(d, *shape, dtype=torch.float64), torch.full((d,), step),
                                        noise=unit).flatten(1).T                              # [d, d]
            target = jac @ cov @ jac.T + noise_map @ noise_map.T
            emp = torch.cov(xs.flatten(1).T.double())
        tol = 5 * ((target.diag()[:, None] * target.diag()[None, :] + target**2) / n).sqrt()
        assert ((emp - target).abs() < tol + 1e-3).all(), (step, (emp - target).abs().max())


def _dvdp_final_cov_error(method, exact, shape, n, g, steps, preconditioners=None):
    x = method.sample(exact, n, shape, generator=g, steps=steps, eta=1.0, preconditioners=preconditioners,
                      progress=False).double()
    return x.flatten(1).T.cov()


def test_dvdp_pds_with_identity_filters_is_the_plain_sampler_and_with_data_filters_keeps_the_target():
    """Preconditioned DVDP DDIM (eta = 1) driven by the exact epsilon: M = I reproduces the plain sampler (to
    float rounding); with the data's own stage filters (values in [1, 1.25]) the samples still have the target covariance
    within Monte-Carlo tolerance at 200 steps (preconditioning changes the path, not the marginals)."""
    from diffaccel.methods.dvdp import DVDP
    from diffaccel.methods.pds import Preconditioner, build_preconditioner
    from diffaccel.oracle.dvdp_exact import DVDPExactEpsilon

    g = torch.Generator().manual_seed(5)
    shape, n = (1, 4, 4), 6000
    mean, cov = _tiny_gaussian(16, g)
    method = DVDP(turning_points=(300, 600))
    exact = DVDPExactEpsilon(method, mean, cov, shape)
    identity = [Preconditioner(freq=torch.ones(1, 4 // 2**k, 4 // 2**k)) for k in range(3)]
    plain = method.sample(exact, 50, shape, generator=torch.Generator().manual_seed(1), steps=20, progress=False)
    same = method.sample(exact, 50, shape, generator=torch.Generator().manual_seed(1), steps=20,
                         preconditioners=identity, progress=False)
    torch.testing.assert_close(plain, same, rtol=1e-5, atol=1e-5)  # the same step, summed in another order

    data = mean + (torch.linalg.cholesky(cov) @ torch.randn(16, 500, generator=g, dtype=torch.float64)).T
    images = data.view(500, *shape).float()
    filters = [build_preconditioner(torch.nn.functional.avg_pool2d(images, 2**k) if k else images)
               for k in range(3)]
    assert filters[0].freq.max() > 1.1  # a real preconditioner, not the identity
    emp = _dvdp_final_cov_error(method, exact, shape, n, g, 200, filters)
    tol = 5 * ((cov.diag()[:, None] * cov.diag()[None, :] + cov**2) / n).sqrt()
    assert ((emp - cov).abs() < tol + 2e-3).all(), (emp - cov).abs().max()
    preconditioned = method.sample(exact, 50, shape, generator=torch.Generator().manual_seed(1), steps=20,
                                   preconditioners=filters, progress=False)
    assert not torch.allclose(preconditioned, plain)  # the filters do act
