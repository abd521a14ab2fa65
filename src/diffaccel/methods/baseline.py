"""Baseline denoising diffusion: epsilon prediction on a discrete grid (KL paper eq. 7, Ho et al. 2020)."""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

from diffaccel.errors import UserError
from diffaccel.methods.base import Method
from diffaccel.methods.latent import LatentSpace, add_autoencoder_argument, check_autoencoder_run
from diffaccel.methods.pds import EpsilonPDS
from diffaccel.samplers import epsilon_nfe, sample_epsilon
from diffaccel.schedules import discrete_schedule


NOISE_VARIANCES = ("unit", "kl", "kl-h")


class Baseline(LatentSpace, EpsilonPDS, Method):
    """x_k = sqrt(alpha_bar_k) x0 + sqrt(1 - alpha_bar_k) z, k ~ U{1..N}; loss ‖z − net(x_k, k)‖² (mean over pixels).

    With ``autoencoder`` set, x0 is the unit-std latent of that autoencoder run (latent diffusion) and every sample
    is decoded: the same DDPM/DDIM in the space LDDGAN works in, so a benchmark can tell "latent" from "GAN".

    ``noise_variance="kl"`` draws z ~ N(0, v(t_k)) with v(t) = Σ_{m≤M} phi_m(t)²/t, the variance of the noise
    Z' (eq. 16) that KL diffusion with M = ``kl_terms`` terms trains on (an ablation: KL-1st is noise prediction
    of Z'); ``"kl-h"`` uses v(t) = Σ_m h_m(t)²/sigma(t)² of the exact expansion (eq. 12) instead. The default
    "unit" is the ordinary z ~ N(0, I).
    """

    name = "baseline"

    def __init__(self, N: int = 1000, schedule: str = "vp", noise_variance: str = "unit", kl_terms: int = 8,
                 autoencoder: str | None = None):
        if N < 1:
            raise UserError(f"--time-steps must be >= 1, got {N}")
        if noise_variance not in NOISE_VARIANCES:
            raise UserError(f"--noise-variance must be one of {', '.join(NOISE_VARIANCES)}, got {noise_variance!r}")
        if int(kl_terms) != kl_terms or kl_terms < 1:
            raise UserError(f"--kl-terms (M) must be a positive integer, got {kl_terms}")
        if noise_variance != "unit" and schedule != "vp":
            raise UserError(f"--noise-variance {noise_variance} needs the continuous VP schedule (--schedule vp): h_m(t) is "
                            "derived for it")
        self.N, self.schedule = int(N), schedule
        self.noise_variance, self.kl_terms = noise_variance, int(kl_terms)
        self.alpha_bars = discrete_schedule(schedule, self.N)  # float64 [N+1]
        self.variance = None if noise_variance == "unit" else self._variance_table()
        self.autoencoder_run = check_autoencoder_run(autoencoder) if autoencoder else None

    def _variance_table(self) -> torch.Tensor:
        """v(t_k) for k = 0..N (float64); k = 0 is never drawn and set to 1."""
        from diffaccel.methods.kl import h, phi
        from diffaccel.schedules import VPSchedule

        sched = VPSchedule()
        t = torch.arange(1, self.N + 1, dtype=torch.float64) / self.N
        if self.noise_variance == "kl":
            v = phi(t, self.kl_terms).square().sum(-1) / t
        else:
            v = h(t, self.kl_terms, sched).square().sum(-1) / sched.sigma(t).square()
        return torch.cat([torch.ones(1, dtype=torch.float64), v])

    def config(self) -> dict:
        cfg = {"N": self.N, "schedule": self.schedule}
        if self.latent:  # pixel configs stay as they were
            cfg["autoencoder"] = self.autoencoder_run
        if self.noise_variance != "unit":  # runs saved before the option rebuild unchanged
            cfg.update(noise_variance=self.noise_variance, kl_terms=self.kl_terms)
        return cfg

    @staticmethod
    def add_arguments(group: argparse._ArgumentGroup) -> None:
        group.add_argument("--time-steps", type=int, default=None,
                           help="time discretisation N of t_k = k/N (default: 1000 for baseline, 20 for kl)")
        group.add_argument("--schedule", choices=["vp", "linear", "cosine"], default="vp",
                           help="noise schedule: continuous VP beta(t)=0.1+19.9t (KL paper), DDPM linear or cosine")
        group.add_argument("--noise-variance", choices=NOISE_VARIANCES, default="unit",
                           help="baseline: training noise N(0, I) (unit) or N(0, v(t)) with the variance of KL "
                                "diffusion's noise for --kl-terms M: v = Σ_m phi_m²/t (kl) or Σ_m h_m²/sigma² "
                                "(kl-h); an ablation, VP schedule only")
        add_autoencoder_argument(group)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "Baseline":
        noise = getattr(args, "noise_variance", "unit")
        kwargs = {"noise_variance": noise, "kl_terms": getattr(args, "kl_terms", 8)} if noise != "unit" else {}
        return cls(N=1000 if args.time_steps is None else args.time_steps, schedule=args.schedule,
                   autoencoder=args.autoencoder, **kwargs)

    def initialize(self, nets: dict[str, nn.Module], init_from) -> None:
        """Start from a pretrained diffusers epsilon model (UNet2DModel or DDPM/DDIM pipeline folder)."""
        from diffaccel.pretrained import check_schedule, is_diffusers_folder, load_pretrained_epsilon, \
            load_unet_weights

        if not is_diffusers_folder(init_from):
            raise UserError(f"baseline --init-from takes a diffusers UNet2DModel or DDPM/DDIM pipeline folder; "
                            f"{init_from} is neither")
        pre = load_pretrained_epsilon(init_from)
        check_schedule(pre, self.alpha_bars, f"the baseline's {self.schedule!r} schedule")
        load_unet_weights(nets["net"], pre)

    def noised(self, x0: torch.Tensor, k: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        ab = self.alpha_bars.to(x0.device)[k].to(x0.dtype).view(-1, *([1] * (x0.ndim - 1)))
        return ab.sqrt() * x0 + (1 - ab).sqrt() * noise

    def draw_noise(self, x0: torch.Tensor, k: torch.Tensor, generator=None) -> torch.Tensor:
        """The training noise at indices ``k``: N(0, I), or N(0, v(t_k)) with ``noise_variance="kl"``."""
        noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
        if self.variance is None:
            return noise
        v = self.variance.to(x0.device)[k].to(x0.dtype).view(-1, *([1] * (x0.ndim - 1)))
        return v.sqrt() * noise

    def loss(self, net: nn.Module, x0: torch.Tensor) -> torch.Tensor:
        k = torch.randint(1, self.N + 1, (x0.shape[0],), device=x0.device)
        noise = self.draw_noise(x0, k)
        return F.mse_loss(net(self.noised(x0, k, noise), k.to(x0.dtype)), noise)

    def sample(self, net: nn.Module, n: int, image_shape, *, generator=None, device=None, sampler: str = "ddim",
               steps: int = 20, eta: float = 1.0, progress: bool = True, clip_x0: bool = False, pds: bool = False,
               **pds_options) -> torch.Tensor:
        self.check_latent_options(clip_x0=clip_x0)
        pre = self.pds_preconditioner(image_shape, pds, **pds_options)
        x = sample_epsilon(net, (n, *self.data_shape(image_shape)), self.alpha_bars, sampler=sampler, steps=steps,
                           eta=eta, generator=generator, device=device, progress=progress, preconditioner=pre,
                           clip_x0=clip_x0)
        return self.decode(x).clamp(-1, 1) if self.latent else x

    def sampler_options(self, args: argparse.Namespace) -> dict:
        options = super().sampler_options(args)
        self.check_latent_options(clip_x0=bool(options.get("clip_x0")))
        return options

    def nfe(self, sampler: str = "ddim", steps: int = 20, **_) -> int:
        return epsilon_nfe(len(self.alpha_bars), sampler, steps)
