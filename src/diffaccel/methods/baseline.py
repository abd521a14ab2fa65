"""Baseline denoising diffusion: epsilon prediction on a discrete grid (KL paper eq. 7, Ho et al. 2020)."""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

from diffaccel.errors import UserError
from diffaccel.methods.base import Method
from diffaccel.methods.pds import EpsilonPDS
from diffaccel.samplers import epsilon_nfe, sample_epsilon
from diffaccel.schedules import discrete_schedule


class Baseline(EpsilonPDS, Method):
    """x_k = sqrt(alpha_bar_k) x0 + sqrt(1 - alpha_bar_k) z, k ~ U{1..N}; loss ‖z − net(x_k, k)‖² (mean over pixels)."""

    name = "baseline"

    def __init__(self, N: int = 1000, schedule: str = "vp"):
        if N < 1:
            raise UserError(f"--time-steps must be >= 1, got {N}")
        self.N, self.schedule = int(N), schedule
        self.alpha_bars = discrete_schedule(schedule, self.N)  # float64 [N+1]

    def config(self) -> dict:
        return {"N": self.N, "schedule": self.schedule}

    @staticmethod
    def add_arguments(group: argparse._ArgumentGroup) -> None:
        group.add_argument("--time-steps", type=int, default=None,
                           help="time discretisation N of t_k = k/N (default: 1000 for baseline, 20 for kl)")
        group.add_argument("--schedule", choices=["vp", "linear", "cosine"], default="vp",
                           help="noise schedule: continuous VP beta(t)=0.1+19.9t (KL paper), DDPM linear or cosine")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "Baseline":
        return cls(N=1000 if args.time_steps is None else args.time_steps, schedule=args.schedule)

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
        pre = self.pds_preconditioner(image_shape, pds, **pds_options)
        return sample_epsilon(net, (n, *image_shape), self.alpha_bars, sampler=sampler, steps=steps, eta=eta,
                              generator=generator, device=device, progress=progress, preconditioner=pre,
                              clip_x0=clip_x0)

    def nfe(self, sampler: str = "ddim", steps: int = 20, **_) -> int:
        return epsilon_nfe(len(self.alpha_bars), sampler, steps)
