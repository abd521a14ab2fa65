import math

import torch
from diffusers import DDPMScheduler
from scipy.integrate import quad

from diffaccel.schedules import VPSchedule, cosine_schedule, linear_schedule


def test_vp_mu_matches_numerical_integral_of_beta():
    s = VPSchedule()
    for t in (0.01, 0.3, 0.77, 1.0):
        integral, _ = quad(lambda u: 0.1 + 19.9 * u, 0, t)
        assert math.isclose(float(s.mu(torch.tensor(t, dtype=torch.float64))), math.exp(-0.5 * integral), rel_tol=1e-12)


def test_vp_variance_preserving_and_grid():
    s = VPSchedule()
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    torch.testing.assert_close(s.mu(t) ** 2 + s.sigma(t) ** 2, torch.ones_like(t))
    g = s.grid(20)
    assert g.shape == (21,) and g[0] == 1 and torch.all(g[1:] < g[:-1])
    torch.testing.assert_close(g[10], s.alpha_bar(torch.tensor(0.5, dtype=torch.float64)))
    # beta(t) = 0.1 + 19.9 t
    torch.testing.assert_close(s.beta(torch.tensor([0.0, 1.0])), torch.tensor([0.1, 20.0]))


def test_linear_and_cosine_match_diffusers():
    ours = linear_schedule(1000)
    ref = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear").alphas_cumprod.double()
    torch.testing.assert_close(ours[1:], ref, rtol=1e-5, atol=1e-7)
    ours = cosine_schedule(1000)
    ref = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2").alphas_cumprod.double()
    torch.testing.assert_close(ours[1:], ref, rtol=1e-4, atol=1e-6)
