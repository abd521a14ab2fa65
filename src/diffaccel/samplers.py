"""Samplers for any epsilon-predictor ``eps_fn(x, k)`` on an ``alpha_bars`` grid of shape ``[N + 1]``.

``k`` is the integer grid index (as a float tensor ``[B]``), ``alpha_bars[0] == 1``. Written here rather than
taken from diffusers' schedulers because the KL and DVDP methods need the step on their own grids and with
their own epsilon aggregation; ``tests/test_samplers.py`` checks the DDIM step against ``DDIMScheduler``.
"""

from __future__ import annotations

from typing import Callable

import torch
from tqdm.auto import tqdm

from diffaccel.errors import UserError

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def ddim_timesteps(N: int, steps: int) -> list[int]:
    """Evenly spaced grid indices N = k_S > … > k_1 > k_0 = 0 (the 'trailing' spacing of diffusers)."""
    if not 1 <= steps <= N:
        raise UserError(f"sampling steps must be in [1, {N}], got {steps}")
    return [round(i * N / steps) for i in range(steps, -1, -1)]


def clipped_epsilon(x: torch.Tensor, eps: torch.Tensor, ab_t: torch.Tensor) -> torch.Tensor:
    """The epsilon whose predicted x0 is clipped to the data range [-1, 1] (DDPM's ``clip_denoised``)."""
    x0 = ((x - (1 - ab_t).sqrt() * eps) / ab_t.sqrt()).clamp(-1, 1)
    return (x - ab_t.sqrt() * x0) / (1 - ab_t).sqrt()


def ddim_step(x: torch.Tensor, eps: torch.Tensor, ab_t: torch.Tensor, ab_prev: torch.Tensor, eta: float,
              noise: torch.Tensor | None) -> torch.Tensor:
    """One DDIM update (KL paper eq. 23 / Song et al. 2021 eq. 12) from alpha_bar ``ab_t`` to ``ab_prev``."""
    x0 = (x - (1 - ab_t).sqrt() * eps) / ab_t.sqrt()
    var = eta**2 * (1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev)
    out = ab_prev.sqrt() * x0 + (1 - ab_prev - var).clamp(min=0).sqrt() * eps
    if noise is not None and eta > 0:
        out = out + var.sqrt() * noise
    return out


@torch.no_grad()
def ddim(eps_fn: EpsFn, x_T: torch.Tensor, alpha_bars: torch.Tensor, steps: int, eta: float = 1.0,
         generator: torch.Generator | None = None, progress: bool = True, clip_x0: bool = False) -> torch.Tensor:
    """DDIM with ``steps`` network calls; eta = 0 is deterministic, eta = 1 is ancestral sampling.

    ``clip_x0`` clips each predicted x0 to [-1, 1] (not in eq. 23; it helps young models markedly)."""
    N = len(alpha_bars) - 1
    ks = ddim_timesteps(N, steps)
    ab = alpha_bars.to(device=x_T.device, dtype=torch.float64)
    x = x_T
    for k, k_prev in tqdm(list(zip(ks[:-1], ks[1:])), desc="ddim", disable=not progress, leave=False):
        eps = eps_fn(x, torch.full((x.shape[0],), float(k), device=x.device))
        if clip_x0:
            eps = clipped_epsilon(x, eps, ab[k].to(x.dtype))
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype) if eta > 0 else None
        x = ddim_step(x, eps, ab[k].to(x.dtype), ab[k_prev].to(x.dtype), eta, noise)
    return x


@torch.no_grad()
def ddpm(eps_fn: EpsFn, x_T: torch.Tensor, alpha_bars: torch.Tensor, generator: torch.Generator | None = None,
         progress: bool = True, clip_x0: bool = False) -> torch.Tensor:
    """Ancestral sampling through every grid step with the DDPM posterior (Ho et al. 2020, Algorithm 2)."""
    N = len(alpha_bars) - 1
    ab = alpha_bars.to(device=x_T.device, dtype=torch.float64)
    x = x_T
    for k in tqdm(range(N, 0, -1), desc="ddpm", disable=not progress, leave=False):
        eps = eps_fn(x, torch.full((x.shape[0],), float(k), device=x.device))
        if clip_x0:
            eps = clipped_epsilon(x, eps, ab[k].to(x.dtype))
        alpha = (ab[k] / ab[k - 1]).to(x.dtype)
        beta = 1 - alpha
        mean = (x - beta / (1 - ab[k]).to(x.dtype).sqrt() * eps) / alpha.sqrt()
        var = ((1 - ab[k - 1]) / (1 - ab[k]) * beta).to(x.dtype)
        x = mean + var.sqrt() * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return x


def sample_epsilon(eps_fn: EpsFn, shape: tuple[int, ...], alpha_bars: torch.Tensor, *, sampler: str = "ddim",
                   steps: int = 20, eta: float = 1.0, generator: torch.Generator | None = None, device=None,
                   progress: bool = True, preconditioner=None, clip_x0: bool = False) -> torch.Tensor:
    """Draw x_T ~ N(0, I) and run the named epsilon sampler (``preconditioner``: PDS-preconditioned DDIM)."""
    x_T = torch.randn(shape, generator=generator, device=device)
    if preconditioner is not None:
        if sampler != "ddim" or clip_x0:
            raise UserError("--pds on an epsilon model works with --sampler ddim (any eta) and without --clip-x0")
        return preconditioned_ddim(eps_fn, x_T, alpha_bars, steps, eta=eta, generator=generator,
                                   preconditioner=preconditioner.to(x_T.device), progress=progress)
    if sampler == "ddim":
        return ddim(eps_fn, x_T, alpha_bars, steps, eta, generator, progress, clip_x0)
    if sampler == "ddpm":
        return ddpm(eps_fn, x_T, alpha_bars, generator, progress, clip_x0)
    raise UserError(f"unknown sampler {sampler!r} for an epsilon model; choose ddim or ddpm")


def epsilon_nfe(alpha_bars_len: int, sampler: str, steps: int) -> int:
    return alpha_bars_len - 1 if sampler == "ddpm" else steps


# --------------------------------------------------------------------------------------------------------------
# Extension: preconditioned DDIM / DDPM (VP) sampler — derivation in docs/pds.md
# --------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def preconditioned_ddim(eps_fn, x_T: torch.Tensor, alpha_bars: torch.Tensor, steps: int, *, eta: float = 1.0,
                        preconditioner=None, generator: torch.Generator | None = None,
                        progress: bool = False) -> torch.Tensor:
    """DDIM(η) with the stochastic part preconditioned (PDS for VP models; ``preconditioner`` is a
    ``diffaccel.methods.pds.Preconditioner`` or anything with its ``apply`` / ``apply_gram``).

    One step from grid index k to j < k, with ε̂ = eps_fn(x, k), x̂₀ = (x − √(1−ᾱ_k) ε̂)/√ᾱ_k,
    σ = η·√((1−ᾱ_j)/(1−ᾱ_k))·√(1−ᾱ_k/ᾱ_j), c₀ = √(1−ᾱ_j), c = √(1−ᾱ_j−σ²):

        x_j = √ᾱ_j x̂₀ + c₀ ε̂ − (c₀ − c)·M·Mᵀ ε̂ + σ·M z.

    With M = I this is DDIM(η) (η = 1: DDPM ancestral); the deterministic part √ᾱ_j x̂₀ + c₀ ε̂ is the η = 0
    (probability-flow) step and the rest is a Langevin step with step size δ = (c₀ − c)√(1−ᾱ_k) ≈ σ²/2 on the
    score s = −ε̂/√(1−ᾱ_k), which is what preconditioning may change without moving the marginals p_t
    (docs/pds.md). ``x_T`` should be M·z with z ~ N(0, I) to start from the preconditioned prior as PDS does —
    the prior N(0, I) is then replaced by N(0, M·Mᵀ); pass plain z to keep the exact prior.
    """
    indices = ddim_timesteps(alpha_bars.shape[0] - 1, steps)
    alpha_bars = alpha_bars.to(device=x_T.device, dtype=torch.float64)
    x = x_T
    for k, j in tqdm(list(zip(indices[:-1], indices[1:])), disable=not progress, desc="pds-ddim", leave=False):
        ab_k, ab_j = alpha_bars[k].to(x.dtype), alpha_bars[j].to(x.dtype)
        eps = eps_fn(x, torch.full((x.shape[0],), float(k), device=x.device))
        x0 = (x - (1 - ab_k).sqrt() * eps) / ab_k.sqrt()
        var = eta ** 2 * (1 - ab_j) / (1 - ab_k) * (1 - ab_k / ab_j)
        c0 = (1 - ab_j).sqrt()
        c = (1 - ab_j - var).clamp(min=0).sqrt()
        x = ab_j.sqrt() * x0 + c0 * eps
        if eta > 0:  # noise drawn on every step, as diffaccel.samplers.ddim does, so M = I reproduces it
            langevin_drift = eps if preconditioner is None else preconditioner.apply_gram(eps)
            z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            noise = z if preconditioner is None else preconditioner.apply(z)
            x = x - (c0 - c) * langevin_drift + var.sqrt() * noise
    return x
