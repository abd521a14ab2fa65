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


class Baseline(LatentSpace, EpsilonPDS, Method):
    """x_k = sqrt(alpha_bar_k) x0 + sqrt(1 - alpha_bar_k) z, k ~ U{1..N}; loss ‖z − net(x_k, k)‖² (mean over pixels).

    With ``autoencoder`` set, x0 is the unit-std latent of that autoencoder run (latent diffusion) and every sample
    is decoded: the same DDPM/DDIM in the space LDDGAN works in, so a benchmark can tell "latent" from "GAN"."""

    name = "baseline"
    composition_notes = {"latent+pds": "the PDS filter comes from the pixel statistics of the training images; a "
                                       "latent filter is not built yet"}

    def __init__(self, N: int = 1000, schedule: str = "vp", autoencoder: str | None = None):
        if N < 1:
            raise UserError(f"--time-steps must be >= 1, got {N}")
        self.N, self.schedule = int(N), schedule
        self.alpha_bars = discrete_schedule(schedule, self.N)  # float64 [N+1]
        self.autoencoder_run = check_autoencoder_run(autoencoder) if autoencoder else None

    def config(self) -> dict:
        latent = {"autoencoder": self.autoencoder_run} if self.latent else {}  # pixel configs stay as they were
        return {"N": self.N, "schedule": self.schedule, **latent}

    @staticmethod
    def add_arguments(group: argparse._ArgumentGroup) -> None:
        group.add_argument("--time-steps", type=int, default=None,
                           help="time discretisation N of t_k = k/N (default: 1000 for baseline, 20 for kl)")
        group.add_argument("--schedule", choices=["vp", "linear", "cosine"], default="vp",
                           help="noise schedule: continuous VP beta(t)=0.1+19.9t (KL paper), DDPM linear or cosine")
        add_autoencoder_argument(group)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "Baseline":
        return cls(N=1000 if args.time_steps is None else args.time_steps, schedule=args.schedule,
                   autoencoder=args.autoencoder)

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

    def loss(self, net: nn.Module, x0: torch.Tensor) -> torch.Tensor:
        k = torch.randint(1, self.N + 1, (x0.shape[0],), device=x0.device)
        noise = torch.randn_like(x0)
        return F.mse_loss(net(self.noised(x0, k, noise), k.to(x0.dtype)), noise)

    def sample(self, net: nn.Module, n: int, image_shape, *, generator=None, device=None, sampler: str = "ddim",
               steps: int = 20, eta: float = 1.0, progress: bool = True, clip_x0: bool = False, pds: bool = False,
               **pds_options) -> torch.Tensor:
        self.check_latent_options(clip_x0=clip_x0, pds=pds)
        pre = self.pds_preconditioner(image_shape, pds, **pds_options)
        x = sample_epsilon(net, (n, *self.data_shape(image_shape)), self.alpha_bars, sampler=sampler, steps=steps,
                           eta=eta, generator=generator, device=device, progress=progress, preconditioner=pre,
                           clip_x0=clip_x0)
        return self.decode(x).clamp(-1, 1) if self.latent else x

    def check_latent_options(self, clip_x0: bool = False, pds: bool = False) -> None:
        """Sampler options that only make sense on pixels, refused in latent space before any work."""
        if self.latent and clip_x0:
            raise UserError("--clip-x0 clips the predicted x0 to the pixel range [-1, 1]; a latent baseline's x0 "
                            "is a unit-std latent (its decoded image is clipped anyway): drop --clip-x0")
        if self.latent and pds:
            raise UserError("--pds builds its filter from the pixel statistics of the training images, which do not "
                            "describe latents: PDS is not defined for a latent baseline")

    def sampler_options(self, args: argparse.Namespace) -> dict:
        options = super().sampler_options(args)
        self.check_latent_options(clip_x0=bool(options.get("clip_x0")), pds=bool(options.get("pds")))
        return options

    def nfe(self, sampler: str = "ddim", steps: int = 20, **_) -> int:
        return epsilon_nfe(len(self.alpha_bars), sampler, steps)
