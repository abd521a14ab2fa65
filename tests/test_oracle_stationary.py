"""The stationary (circulant) Gaussian testbed against the dense closed forms and against Monte Carlo."""

import torch

from diffaccel.oracle.gaussian_ve import GaussianVEScore
from diffaccel.oracle.gaussian_vp import GaussianVPEpsilon
from diffaccel.oracle.stationary import StationaryGaussian
from diffaccel.schedules import discrete_schedule


def _data(h=4, w=6, n=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, h, w, generator=g, dtype=torch.float64)
    x = x + 0.5 * torch.roll(x, 1, dims=-1) + 0.3 * torch.roll(x, 1, dims=-2)   # spatially correlated
    return StationaryGaussian.fit(x + 0.5)


def test_covariance_is_circulant_symmetric_and_matches_the_spectrum():
    data = _data()
    cov = data.covariance()
    assert torch.allclose(cov, cov.T, atol=1e-12)
    assert torch.allclose(torch.linalg.eigvalsh(cov).sort().values, data.lam.flatten().sort().values, atol=1e-10)


def test_ve_score_equals_the_dense_gaussian_score():
    data = _data()
    dense = GaussianVEScore(data.mean.flatten(), data.covariance())
    y = torch.randn(5, 1, 4, 6, dtype=torch.float64) * 3
    sigma = torch.tensor([0.01, 0.1, 1.0, 5.0, 50.0], dtype=torch.float64)
    assert torch.allclose(data.ve_score(y, sigma), dense(y, sigma), rtol=1e-8, atol=1e-8)


def test_vp_epsilon_equals_the_dense_gaussian_epsilon():
    data = _data()
    ab = discrete_schedule("vp", 1000)
    dense = GaussianVPEpsilon(data.mean.flatten(), data.covariance(), ab, (1, 4, 6))
    x = torch.randn(4, 1, 4, 6, dtype=torch.float64)
    t = torch.tensor([1.0, 10.0, 500.0, 1000.0])
    assert torch.allclose(data.vp_epsilon(ab)(x, t), dense(x, t), rtol=1e-8, atol=1e-10)


def test_samples_have_the_target_power_spectrum():
    data = _data(h=8, w=8)
    ratio = data.power_ratio(data.sample(20000, torch.Generator().manual_seed(1)))
    # each frequency's power is a mean of 20000 (pairs of) chi-square terms: relative std <= 1/sqrt(10000)
    assert (ratio - 1).abs().max() < 0.06
    damped = data.power_ratio(0.9 * (data.sample(20000, torch.Generator().manual_seed(1)) - data.mean) + data.mean)
    assert (damped - 0.81).abs().max() < 0.06                            # and it sees a damped sample
