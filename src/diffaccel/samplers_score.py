"""Samplers for any score model ``score_fn(x, sigma) -> ∇_x log p_sigma(x)`` of a VE (SMLD/NCSN) process.

``sigma`` is passed as a float tensor ``[B]``. Both samplers accept an optional ``Preconditioner`` (PDS): score
and drift terms are multiplied by M·Mᵀ, noise (and the initial sample) by M, as the PDS reference does.
Written by hand because no installed library offers score-based PC / annealed-Langevin sampling with a
pluggable preconditioner.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from tqdm.auto import tqdm

from diffaccel.errors import UserError

ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def ve_sigmas(sigma_min: float, sigma_max: float, n: int) -> torch.Tensor:
    """The n noise levels of the discretised VE SDE, geometric and descending: sigma_max, …, sigma_min."""
    if n < 1:
        raise UserError(f"the number of sampling iterations must be >= 1, got {n}")
    if not 0 < sigma_min < sigma_max:
        raise UserError(f"need 0 < sigma_min < sigma_max, got {sigma_min} and {sigma_max}")
    if n == 1:
        return torch.tensor([sigma_max], dtype=torch.float64)
    return torch.exp(torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=torch.float64))


def _gram(pre, v):
    return v if pre is None else pre.apply_gram(v)


def _noise(pre, shape, generator, device, dtype):
    z = torch.randn(shape, generator=generator, device=device, dtype=dtype)
    return z if pre is None else pre.apply(z)


def _flat_norm_mean(v: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of per-sample Euclidean norms (the reference corrector's step-size statistic)."""
    return v.reshape(v.shape[0], -1).norm(dim=-1).mean()


@torch.no_grad()
def pc_sampler(score_fn: ScoreFn, shape: tuple[int, ...], sigmas: torch.Tensor, *, snr: float = 0.16,
               corrector_steps: int = 1, preconditioner=None, denoise: bool = True,
               generator: torch.Generator | None = None, device=None, dtype=torch.float32,
               progress: bool = False) -> torch.Tensor:
    """Predictor–corrector sampling (Song et al. 2021): Langevin corrector, then reverse-diffusion predictor.

    For each level sigma_i (descending) with sigma_{i+1} the next one (0 after the last):
      corrector: g = M·Mᵀ·s(x, σ_i), z = M·ξ, ε = 2·(snr·‖z‖/‖g‖)² (norms averaged over the batch),
                 x ← x + ε·g + √(2ε)·z;
      predictor: x̄ = x + (σ_i² − σ_{i+1}²)·M·Mᵀ·s(x, σ_i), x ← x̄ + √(σ_i² − σ_{i+1}²)·M·ξ.
    Starts from x = sigma_max·M·ξ and returns the last noise-free x̄ when ``denoise``.
    NFE = len(sigmas)·(corrector_steps + 1).
    """
    pre = preconditioner
    x = sigmas[0].item() * _noise(pre, shape, generator, device, dtype)
    sig = sigmas.to(device=x.device, dtype=torch.float64)
    x_mean = x
    for i in tqdm(range(len(sig)), desc="pc", disable=not progress, leave=False):
        sigma = sig[i]
        sigma_vec = torch.full((shape[0],), sigma.item(), device=x.device, dtype=dtype)
        for _ in range(corrector_steps):
            grad = _gram(pre, score_fn(x, sigma_vec))
            noise = _noise(pre, shape, generator, x.device, dtype)
            step = 2.0 * (snr * _flat_norm_mean(noise) / _flat_norm_mean(grad)) ** 2
            x_mean = x + step * grad
            x = x_mean + (2.0 * step).sqrt() * noise
        next_sigma = sig[i + 1] if i + 1 < len(sig) else torch.zeros((), dtype=torch.float64, device=x.device)
        var = (sigma ** 2 - next_sigma ** 2).to(dtype)
        x_mean = x + var * _gram(pre, score_fn(x, sigma_vec))
        x = x_mean + var.sqrt() * _noise(pre, shape, generator, x.device, dtype)
    return x_mean if denoise else x


@torch.no_grad()
def ald_sampler(score_fn: ScoreFn, shape: tuple[int, ...], sigmas: torch.Tensor, *, steps_each: int = 1,
                step_lr: float = 2e-5, preconditioner=None, denoise: bool = True,
                generator: torch.Generator | None = None, device=None, dtype=torch.float32,
                progress: bool = False) -> torch.Tensor:
    """Annealed Langevin dynamics (NCSN, Song & Ermon 2019, Algorithm 1), optionally preconditioned.

    For each level σ_i, ``steps_each`` times: α_i = step_lr·σ_i²/σ_L², x ← x + (α_i/2)·M·Mᵀ·s(x, σ_i) + √α_i·M·ξ.
    Starts from sigma_max·M·ξ. ``denoise`` adds the final Tweedie step x + σ_L²·s(x, σ_L) of NCSNv2 (not
    preconditioned: it is a posterior mean, not a Langevin step).
    NFE = len(sigmas)·steps_each + denoise.
    """
    pre = preconditioner
    x = sigmas[0].item() * _noise(pre, shape, generator, device, dtype)
    sig = sigmas.to(device=x.device, dtype=torch.float64)
    sigma_last = sig[-1]
    for i in tqdm(range(len(sig)), desc="ald", disable=not progress, leave=False):
        sigma_vec = torch.full((shape[0],), sig[i].item(), device=x.device, dtype=dtype)
        alpha = (step_lr * (sig[i] / sigma_last) ** 2).to(dtype)
        for _ in range(steps_each):
            grad = _gram(pre, score_fn(x, sigma_vec))
            x = x + 0.5 * alpha * grad + alpha.sqrt() * _noise(pre, shape, generator, x.device, dtype)
    if denoise:
        sigma_vec = torch.full((shape[0],), sigma_last.item(), device=x.device, dtype=dtype)
        x = x + (sigma_last ** 2).to(dtype) * score_fn(x, sigma_vec)
    return x
