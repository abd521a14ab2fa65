import pytest
import torch

from diffaccel.errors import UserError
from diffaccel.oracle.gaussian_ve import GaussianVEScore


def _gaussian(d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    return torch.randn(d, generator=g, dtype=torch.float64), a @ a.T / d + 0.05 * torch.eye(d, dtype=torch.float64)


def test_score_is_the_gradient_of_the_noised_log_density():
    # independent computation: autograd of N(m, S + sigma^2 I).log_prob
    mean, cov = _gaussian()
    oracle = GaussianVEScore(mean, cov)
    y = torch.randn(5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.01, 0.3, 1.0, 5.0, 50.0], dtype=torch.float64)
    yy = y.clone().requires_grad_(True)
    logp = sum(torch.distributions.MultivariateNormal(mean, cov + s ** 2 * torch.eye(6, dtype=torch.float64))
               .log_prob(yy[i]) for i, s in enumerate(sigma))
    (grad,) = torch.autograd.grad(logp, yy)
    assert torch.allclose(oracle(y, sigma), grad, rtol=1e-9, atol=1e-12)


def test_tweedie_denoiser_matches_monte_carlo_posterior_mean():
    # E[x0 | y] = y + sigma^2 score(y): regress x0 on y from joint samples (linear-Gaussian, so exact in the limit)
    mean, cov = _gaussian(d=3, seed=2)
    oracle = GaussianVEScore(mean, cov)
    g = torch.Generator().manual_seed(3)
    n, sigma = 200_000, 0.7
    x0 = oracle.sample(n, generator=g)
    y = x0 + sigma * torch.randn(n, 3, generator=g, dtype=torch.float64)
    design = torch.cat([y, torch.ones(n, 1, dtype=torch.float64)], 1)
    coef = torch.linalg.lstsq(design, x0).solution
    probe = torch.randn(4, 3, generator=g, dtype=torch.float64)
    mc = torch.cat([probe, torch.ones(4, 1, dtype=torch.float64)], 1) @ coef
    exact = probe + sigma ** 2 * oracle(probe, sigma)
    assert torch.allclose(mc, exact, atol=0.02)   # MC error of the regression ~ 1/sqrt(n) per coefficient


def test_fit_and_validation():
    mean, cov = _gaussian(d=4)
    x = GaussianVEScore(mean, cov).sample(50_000, generator=torch.Generator().manual_seed(0))
    fitted = GaussianVEScore.fit(x.view(-1, 1, 2, 2))
    assert torch.allclose(fitted.mean, mean, atol=0.02)
    with pytest.raises(UserError, match="covariance must be"):
        GaussianVEScore(mean, cov[:3, :3])
