"""Noise schedules.

Every schedule here ends as an ``alpha_bars`` tensor of shape ``[N + 1]`` on the grid ``t_k = k / N``
with ``alpha_bars[0] == 1`` (clean data), which is what the samplers consume.
"""

from __future__ import annotations

import math

import torch

from diffaccel.errors import UserError


class VPSchedule:
    """Continuous variance-preserving schedule of the KL paper §3.1: beta(t) = beta_min + (beta_max - beta_min) t.

    mu(t) = exp(-1/2 ∫_0^t beta) = exp(-(beta_min t + (beta_max - beta_min) t² / 2) / 2), sigma(t)² = 1 - mu(t)².
    """

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0):
        if not 0 <= beta_min < beta_max:
            raise UserError(f"VP schedule needs 0 <= beta_min < beta_max, got {beta_min}, {beta_max}")
        self.beta_min, self.beta_max = beta_min, beta_max

    def beta(self, t: torch.Tensor) -> torch.Tensor:
        return self.beta_min + (self.beta_max - self.beta_min) * t

    def log_mu(self, t: torch.Tensor) -> torch.Tensor:
        return -0.5 * (self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t**2)

    def mu(self, t: torch.Tensor) -> torch.Tensor:
        return torch.exp(self.log_mu(t))

    def alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        return torch.exp(2 * self.log_mu(t))

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        # -expm1(2 log mu) = 1 - mu² without cancellation near t = 0
        return torch.sqrt(-torch.expm1(2 * self.log_mu(t)))

    def grid(self, N: int) -> torch.Tensor:
        """alpha_bar at t_k = k/N, k = 0..N, in float64."""
        if N < 1:
            raise UserError(f"number of time steps must be >= 1, got {N}")
        return self.alpha_bar(torch.arange(N + 1, dtype=torch.float64) / N)

    def config(self) -> dict:
        return {"beta_min": self.beta_min, "beta_max": self.beta_max}


def _from_betas(betas: torch.Tensor) -> torch.Tensor:
    return torch.cat([torch.ones(1, dtype=torch.float64), torch.cumprod(1 - betas, 0)])


def linear_schedule(N: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """DDPM's linear betas (Ho et al. 2020), scaled so other N keep the same continuous-time process."""
    if N < 1:
        raise UserError(f"number of time steps must be >= 1, got {N}")
    scale = 1000 / N
    betas = torch.linspace(beta_start * scale, beta_end * scale, N, dtype=torch.float64)
    if betas.max() >= 1:
        raise UserError(f"linear schedule with N={N} gives betas >= 1; use more time steps")
    return _from_betas(betas)


def cosine_schedule(N: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Improved-DDPM cosine schedule (Nichol & Dhariwal 2021): alpha_bar(t) = cos²((t + s)/(1 + s)·π/2) / f(0)."""
    if N < 1:
        raise UserError(f"number of time steps must be >= 1, got {N}")
    t = torch.arange(N + 1, dtype=torch.float64) / N
    f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    alpha_bar = f / f[0]
    betas = (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=max_beta)
    return _from_betas(betas)


def discrete_schedule(kind: str, N: int) -> torch.Tensor:
    """alpha_bars ``[N+1]`` for a schedule named on the command line: ``vp``, ``linear`` or ``cosine``."""
    if kind == "vp":
        return VPSchedule().grid(N)
    if kind == "linear":
        return linear_schedule(N)
    if kind == "cosine":
        return cosine_schedule(N)
    raise UserError(f"unknown schedule {kind!r}; choose vp, linear or cosine")
