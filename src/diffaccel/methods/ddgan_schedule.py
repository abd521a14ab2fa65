"""The few-step (T <= 8) schedule of denoising diffusion GANs and its Gaussian posterior q(x_{t-1} | x_t, x_0).

The continuous VP process beta(s) = beta_min + (beta_max - beta_min) s is sampled at T + 1 times
s_i = i/T·(1 - 1e-3) + 1e-3 (the 1e-3 offset keeps the first step away from s = 0), giving
var(s) = 1 - exp(-½ s² (beta_max - beta_min) - s beta_min). The discrete chain is normalised at s_0
(alpha_bar_0 = 1 exactly, x_0 is clean data), so beta_t = 1 - alpha(s_t)/alpha(s_{t-1}) for t = 1..T.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffaccel.errors import UserError

MAX_STEPS = 8  # the method is meant for few steps; larger T works but is not what DDGAN is for


@dataclass(frozen=True)
class DDGANSchedule:
    """All tensors are float64 of shape [T + 1], indexed by the step t = 0..T (entry 0 is the clean end).

    ``betas[t]`` and the posterior coefficients are meaningful for t >= 1 (entry 0 holds beta 0 / zeros).
    The posterior q(x_{t-1} | x_t, x_0) = N(coef_x0[t]·x_0 + coef_xt[t]·x_t, posterior_var[t]).
    """

    T: int
    times: torch.Tensor
    betas: torch.Tensor
    alpha_bars: torch.Tensor
    coef_x0: torch.Tensor
    coef_xt: torch.Tensor
    posterior_var: torch.Tensor

    @property
    def sqrt_alpha_bars(self) -> torch.Tensor:
        return self.alpha_bars.sqrt()

    @property
    def sigmas(self) -> torch.Tensor:
        """Marginal noise std of x_t given x_0."""
        return (1 - self.alpha_bars).sqrt()

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) noise, t an integer tensor [B]."""
        return _bc(self.sqrt_alpha_bars, t, x0) * x0 + _bc(self.sigmas, t, x0) * noise

    def q_step(self, x_prev: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """One forward step: x_t = sqrt(1 - beta_t) x_{t-1} + sqrt(beta_t) noise."""
        beta = _bc(self.betas, t, x_prev)
        return (1 - beta).sqrt() * x_prev + beta.sqrt() * noise

    def q_pair(self, x0: torch.Tensor, t: torch.Tensor, generator: torch.Generator | None = None):
        """A real pair (x_{t-1}, x_t) for t in 1..T, drawn jointly from the forward chain."""
        n1 = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        n2 = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        x_prev = self.q_sample(x0, t - 1, n1)
        return x_prev, self.q_step(x_prev, t, n2)

    def posterior_mean(self, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return _bc(self.coef_x0, t, x0) * x0 + _bc(self.coef_xt, t, x0) * xt

    def posterior_sample(self, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor,
                         generator: torch.Generator | None = None) -> torch.Tensor:
        """x_{t-1} ~ q(x_{t-1} | x_t, x_0); the step to t - 1 = 0 returns the mean (its variance is 0)."""
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        std = _bc(self.posterior_var, t, x0).sqrt()
        return self.posterior_mean(x0, xt, t) + std * noise

    def to(self, device) -> "DDGANSchedule":
        """Float32 copies on ``device`` for use inside training/sampling loops."""
        conv = {k: (v.to(device=device, dtype=torch.float32) if torch.is_tensor(v) else v)
                for k, v in self.__dict__.items()}
        return DDGANSchedule(**conv)


def _bc(values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """values[t] broadcast to the shape of ``like`` (batch first)."""
    v = values.to(device=like.device, dtype=like.dtype)[t.long()]
    return v.view(-1, *([1] * (like.dim() - 1)))


def ddgan_schedule(T: int, beta_min: float = 0.1, beta_max: float = 20.0) -> DDGANSchedule:
    """The DDGAN few-step schedule (see the module docstring); T = 4 gives sqrt(alpha_bar) =
    1, 0.72232, 0.28049, 0.05856, 0.00657."""
    if not isinstance(T, int) or T < 1:
        raise UserError(f"--steps-T (the number of diffusion steps T) must be an integer >= 1, got {T!r}")
    if T > MAX_STEPS:
        raise UserError(f"DDGAN uses few steps: T must be <= {MAX_STEPS}, got {T}")
    if not 0 <= beta_min < beta_max:
        raise UserError(f"DDGAN schedule needs 0 <= beta_min < beta_max, got {beta_min}, {beta_max}")
    eps = 1e-3
    s = torch.arange(T + 1, dtype=torch.float64) / T * (1 - eps) + eps
    log_alpha = -0.5 * s**2 * (beta_max - beta_min) - s * beta_min  # log(1 - var(s))
    alpha_bars = torch.exp(log_alpha - log_alpha[0])
    betas = torch.zeros(T + 1, dtype=torch.float64)
    betas[1:] = 1 - alpha_bars[1:] / alpha_bars[:-1]
    # posterior of x_{t-1} given x_t and x_0 (standard DDPM algebra), t = 1..T
    ab_prev = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bars[:-1]])
    coef_x0 = torch.zeros_like(betas)
    coef_xt = torch.zeros_like(betas)
    post_var = torch.zeros_like(betas)
    one_minus = 1 - alpha_bars[1:]
    coef_x0[1:] = betas[1:] * ab_prev[1:].sqrt() / one_minus
    coef_xt[1:] = (1 - ab_prev[1:]) * (1 - betas[1:]).sqrt() / one_minus
    post_var[1:] = betas[1:] * (1 - ab_prev[1:]) / one_minus
    return DDGANSchedule(T=T, times=s, betas=betas, alpha_bars=alpha_bars, coef_x0=coef_x0, coef_xt=coef_xt,
                         posterior_var=post_var)
