import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from diffaccel.errors import UserError
from diffaccel.samplers import ddim, ddim_step, ddim_timesteps, ddpm
from diffaccel.schedules import VPSchedule


def _eps(x, k):  # a smooth deterministic "network"
    return torch.tanh(x) * (k.view(-1, 1, 1, 1) / 1000)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_step_matches_diffusers(eta):
    N, S = 1000, 20
    ab = VPSchedule().grid(N)
    betas = 1 - ab[1:] / ab[:-1]
    sched = DDIMScheduler(num_train_timesteps=N, trained_betas=betas.numpy(), timestep_spacing="trailing",
                          set_alpha_to_one=True, clip_sample=False, prediction_type="epsilon")
    sched.set_timesteps(S)
    ks = ddim_timesteps(N, S)
    assert [int(j) + 1 for j in sched.timesteps] == ks[:-1]
    x = torch.randn(2, 1, 4, 4, dtype=torch.float64)
    for k, k_prev in zip(ks[:-1], ks[1:]):
        eps = _eps(x, torch.full((2,), float(k), dtype=torch.float64))
        noise = torch.randn_like(x)
        ref = sched.step(eps, k - 1, x, eta=eta, variance_noise=noise).prev_sample
        ours = ddim_step(x, eps, ab[k], ab[k_prev], eta, noise)
        # diffusers keeps its alpha_bars in float32, hence the tolerance
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
        x = ours


def test_ddpm_equals_ddim_eta1_on_the_full_grid():
    ab = VPSchedule().grid(50)
    x_T = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    a = ddpm(_eps, x_T, ab, generator=torch.Generator().manual_seed(1), progress=False)
    b = ddim(_eps, x_T, ab, steps=50, eta=1.0, generator=torch.Generator().manual_seed(1), progress=False)
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_ddim_recovers_data_with_oracle_epsilon():
    """With the exact epsilon of a point mass at x0, deterministic DDIM lands on x0."""
    ab = VPSchedule().grid(1000)
    x0 = torch.full((2, 1, 4, 4), 0.3, dtype=torch.float64)

    def oracle(x, k):
        a = ab[k.long()].view(-1, 1, 1, 1)
        return (x - a.sqrt() * x0) / (1 - a).sqrt()

    out = ddim(oracle, torch.randn_like(x0), ab, steps=10, eta=0.0, progress=False)
    torch.testing.assert_close(out, x0)


def test_bad_steps():
    with pytest.raises(UserError):
        ddim_timesteps(20, 30)
    assert ddim_timesteps(20, 20) == list(range(20, -1, -1))
    assert np.all(np.diff(ddim_timesteps(1000, 7)) < 0)


def test_clip_x0_keeps_the_final_sample_in_the_data_range():
    """With clipping the last DDIM step (alpha_bar_prev = 1) returns the clipped x0 prediction exactly."""
    ab = VPSchedule().grid(100)

    def wild(x, k):  # predicts x0 = 3·x, far outside [-1, 1]
        a = ab[k.long()].view(-1, 1, 1, 1).to(x.dtype)
        return (x - a.sqrt() * 3 * x) / (1 - a).sqrt()

    x_T = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    clipped = ddim(wild, x_T, ab, steps=5, eta=0.0, progress=False, clip_x0=True)
    free = ddim(wild, x_T, ab, steps=5, eta=0.0, progress=False)
    assert clipped.abs().max() <= 1 + 1e-9 and free.abs().max() > 1.5
