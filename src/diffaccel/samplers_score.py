"""Samplers for any score model ``score_fn(x, sigma) -> ∇_x log p_sigma(x)`` of a VE (SMLD/NCSN) process.

``sigma`` is passed as a float tensor ``[B]``. Every sampler accepts an optional ``Preconditioner`` (PDS): score
and drift terms are multiplied by M·Mᵀ, noise (and the initial sample) by M, as the PDS reference does, and a
step-size safeguard (docs/pds.md) keeps every preconditioned step from overshooting where the vanilla one does
not. Written by hand because no installed library offers score-based PC / annealed-Langevin sampling with a
pluggable preconditioner.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from tqdm.auto import tqdm

from diffaccel.errors import UserError

ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

PREDICTORS = ("reverse-diffusion", "ancestral", "none")


def ve_sigmas(sigma_min: float, sigma_max: float, n: int) -> torch.Tensor:
    """The n noise levels of the discretised VE SDE, geometric and descending: sigma_max, …, sigma_min."""
    if n < 1:
        raise UserError(f"the number of sampling iterations must be >= 1, got {n}")
    if not 0 < sigma_min < sigma_max:
        raise UserError(f"need 0 < sigma_min < sigma_max, got {sigma_min} and {sigma_max}")
    if n == 1:
        return torch.tensor([sigma_max], dtype=torch.float64)
    return torch.exp(torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=torch.float64))


def safeguard_bound(sigma: float, step: float) -> float:
    """The largest ‖M‖₂ allowed for a step x + h·M·Mᵀ·s(x, σ) + noise: b = √max(1, 2σ²/h − 1).

    Any score of a VE marginal has 0 ≤ −∇s ≤ I/σ² (−∇s = (I − Cov[x₀|x]/σ²)/σ²), so the vanilla step's linear
    gain I − h·(−∇s) lies in [1 − h/σ², 1], and the preconditioned one's in [1 − h·‖M‖²/σ², 1]. ‖M‖ ≤ b keeps
    the latter's magnitude within the vanilla's worst one, |1 − h/σ²|: in no direction does PDS amplify an error
    more than the vanilla step does (for the predictor, 1 − Δ/σ_i² = σ_{i+1}²/σ_i²). Where the vanilla step
    itself overshoots (h ≥ σ²), b = 1: PDS is held to the vanilla step. Derivation in docs/pds.md.
    """
    return math.inf if step <= 0 else math.sqrt(max(1.0, 2.0 * sigma * sigma / step - 1.0))


def _gram(pre, v):
    return v if pre is None else pre.apply_gram(v)


def _apply(pre, v):
    return v if pre is None else pre.apply(v)


def _noise(pre, shape, generator, device, dtype):
    return _apply(pre, torch.randn(shape, generator=generator, device=device, dtype=dtype))


class _Guard:
    """The safeguard of one sampling run: the preconditioner limited for a step, and a log of where it acted."""

    def __init__(self, pre, enabled: bool, log: list | None):
        self.pre, self.enabled, self.log = pre, enabled and pre is not None, log

    def __call__(self, sigma: float, step: float, level: int, kind: str):
        if not self.enabled:
            return self.pre
        bound = safeguard_bound(sigma, step)
        limited = self.pre.limited(bound)
        if limited is not self.pre and self.log is not None:
            self.log.append({"level": level, "step": kind, "sigma": sigma, "h": step, "bound": bound,
                             "norm": self.pre.norm_bound()})
        return limited


def _flat_norm_mean(v: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of per-sample Euclidean norms (the reference corrector's step-size statistic)."""
    return v.reshape(v.shape[0], -1).norm(dim=-1).mean()


def check_pc_options(predictor: str, corrector_steps: int, snr: float) -> None:
    """Refuse impossible PC settings before any work starts."""
    if predictor not in PREDICTORS:
        raise UserError(f"unknown predictor {predictor!r}; choose one of {', '.join(PREDICTORS)}")
    if int(corrector_steps) != corrector_steps or corrector_steps < 0:
        raise UserError(f"the number of corrector steps must be an integer >= 0, got {corrector_steps}")
    if predictor == "none" and corrector_steps == 0:
        raise UserError("predictor 'none' with 0 corrector steps would not sample at all")
    if corrector_steps > 0 and not (snr > 0 and math.isfinite(snr)):
        raise UserError(f"the corrector's snr must be a finite number > 0, got {snr}")


def pc_nfe(steps: int, predictor: str = "reverse-diffusion", corrector_steps: int = 1) -> int:
    """Network calls per image of ``pc_sampler``: one per corrector step and one per predictor step, per level."""
    return steps * (corrector_steps + (predictor != "none"))


@torch.no_grad()
def pc_sampler(score_fn: ScoreFn, shape: tuple[int, ...], sigmas: torch.Tensor, *, snr: float = 0.16,
               corrector_steps: int = 1, predictor: str = "reverse-diffusion", preconditioner=None,
               safeguard: bool = True, safeguard_log: list | None = None, denoise: bool = True,
               generator: torch.Generator | None = None, device=None, dtype=torch.float32,
               progress: bool = False) -> torch.Tensor:
    """Predictor–corrector sampling (Song et al. 2021): Langevin corrector, then a predictor, at every level.

    For each level σ_i (descending) with σ_{i+1} the next one (0 after the last), Δ = σ_i² − σ_{i+1}²:
      corrector (``corrector_steps`` times; 0 = predictor only): g = M·Mᵀ·s(x, σ_i), z = M·ξ,
                 ε = 2·(snr·‖z‖/‖g‖)² (norms averaged over the batch), x ← x + ε·g + √(2ε)·z;
      predictor  x̄ = x + Δ·M·Mᵀ·s(x, σ_i), then
                 ``reverse-diffusion``: x ← x̄ + √Δ·M·ξ (Euler–Maruyama step of the reverse SDE);
                 ``ancestral``: x ← x̄ + σ_{i+1}·√(Δ/σ_i²)·M·ξ (the posterior's standard deviation, NCSN/SMLD
                 ancestral sampling, score_sde's AncestralSamplingPredictor);
                 ``none``: no predictor (corrector-only sampling).
    Starts from x = σ_max·M·ξ and returns the last noise-free x̄ when ``denoise``. With a preconditioner and
    ``safeguard`` (default), each predictor step uses M limited to ‖M‖₂ ≤ √max(1, 2σ_i²/Δ − 1)
    (``safeguard_bound``; it never acts for σ_i/σ_{i+1} ≤ 2.13 with α = 5 filters, and always at the final step
    onto σ = 0, which it makes the vanilla denoising step); the steps where it acts are appended to
    ``safeguard_log`` if given. The corrector's adaptive step is not limited.
    NFE = len(sigmas)·(corrector_steps + (predictor != "none")).
    """
    check_pc_options(predictor, corrector_steps, snr)
    pre = preconditioner
    guard = _Guard(pre, safeguard, safeguard_log)
    x = sigmas[0].item() * _noise(pre, shape, generator, device, dtype)
    sig = sigmas.to(device=x.device, dtype=torch.float64)
    x_mean = x
    for i in tqdm(range(len(sig)), desc="pc", disable=not progress, leave=False):
        sigma = sig[i]
        sigma_vec = torch.full((shape[0],), sigma.item(), device=x.device, dtype=dtype)
        for _ in range(corrector_steps):
            grad = _gram(pre, score_fn(x, sigma_vec))
            noise = _noise(pre, shape, generator, x.device, dtype)
            # not safeguarded: ε adapts to the preconditioned score itself (docs/pds.md, "Step-size safeguard")
            step = 2.0 * (snr * _flat_norm_mean(noise) / _flat_norm_mean(grad)) ** 2
            x_mean = x + step * grad
            x = x_mean + (2.0 * step).sqrt() * noise
        if predictor == "none":
            continue
        next_sigma = sig[i + 1] if i + 1 < len(sig) else torch.zeros((), dtype=torch.float64, device=x.device)
        var = (sigma ** 2 - next_sigma ** 2).to(dtype)
        std = var.sqrt() if predictor == "reverse-diffusion" else (next_sigma / sigma).to(dtype) * var.sqrt()
        step_pre = guard(sigma.item(), var.item(), i, predictor) if guard.enabled else pre
        x_mean = x + var * _gram(step_pre, score_fn(x, sigma_vec))
        x = x_mean + std * _noise(step_pre, shape, generator, x.device, dtype)
    return x_mean if denoise else x


@torch.no_grad()
def ald_sampler(score_fn: ScoreFn, shape: tuple[int, ...], sigmas: torch.Tensor, *, steps_each: int = 1,
                step_lr: float = 2e-5, preconditioner=None, safeguard: bool = True,
                safeguard_log: list | None = None, denoise: bool = True,
                generator: torch.Generator | None = None, device=None, dtype=torch.float32,
                progress: bool = False) -> torch.Tensor:
    """Annealed Langevin dynamics (NCSN, Song & Ermon 2019, Algorithm 1), optionally preconditioned.

    For each level σ_i, ``steps_each`` times: α_i = step_lr·σ_i²/σ_L², x ← x + (α_i/2)·M·Mᵀ·s(x, σ_i) + √α_i·M·ξ.
    Starts from sigma_max·M·ξ. ``denoise`` adds the final Tweedie step x + σ_L²·s(x, σ_L) of NCSNv2 (not
    preconditioned: it is a posterior mean, not a Langevin step). The safeguard limits M for the steps of size
    h = α_i/2 as in ``pc_sampler``.
    NFE = len(sigmas)·steps_each + denoise.
    """
    if int(steps_each) != steps_each or steps_each < 1:
        raise UserError(f"annealed Langevin needs >= 1 step per noise level, got {steps_each}")
    if not (step_lr > 0 and math.isfinite(step_lr)):
        raise UserError(f"annealed Langevin's step_lr must be a finite number > 0, got {step_lr}")
    pre = preconditioner
    guard = _Guard(pre, safeguard, safeguard_log)
    x = sigmas[0].item() * _noise(pre, shape, generator, device, dtype)
    sig = sigmas.to(device=x.device, dtype=torch.float64)
    sigma_last = sig[-1]
    for i in tqdm(range(len(sig)), desc="ald", disable=not progress, leave=False):
        sigma_vec = torch.full((shape[0],), sig[i].item(), device=x.device, dtype=dtype)
        alpha = (step_lr * (sig[i] / sigma_last) ** 2).to(dtype)
        step_pre = guard(sig[i].item(), 0.5 * alpha.item(), i, "langevin") if guard.enabled else pre
        for _ in range(steps_each):
            grad = _gram(step_pre, score_fn(x, sigma_vec))
            x = x + 0.5 * alpha * grad + alpha.sqrt() * _noise(step_pre, shape, generator, x.device, dtype)
    if denoise:
        sigma_vec = torch.full((shape[0],), sigma_last.item(), device=x.device, dtype=dtype)
        x = x + (sigma_last ** 2).to(dtype) * score_fn(x, sigma_vec)
    return x
