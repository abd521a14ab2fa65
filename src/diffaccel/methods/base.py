"""The method interface: forward process, losses and reverse process, networks passed in as arguments."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from diffaccel.errors import UserError


@dataclass
class Phase:
    """One optimisation phase: a loss over some of the method's networks, with its own optimiser.

    ``loss_fn(nets, x0, step)`` returns a scalar, or ``(scalar, {name: tensor})`` whose named values (detached,
    e.g. a discriminator's mean logits) the trainer averages over each log interval into metrics.jsonl.
    ``every`` runs the phase only on steps divisible by it. ``optimizer`` is a factory
    ``(params, lr) -> torch.optim.Optimizer``; None means AdamW. ``lr`` replaces the trainer's ``--lr`` for this
    phase (warm-up and schedule still apply). ``clip`` False leaves the phase's gradients unclipped (GAN phases:
    clipping would rescale the R1 steps and change γ's meaning); its gradient norm is still checked and logged.
    """

    name: str
    networks: tuple[str, ...]
    loss_fn: Callable[[dict[str, nn.Module], torch.Tensor, int], torch.Tensor]
    every: int = 1
    optimizer: Callable | None = None
    lr: float | None = None
    clip: bool = True


class Method:
    """Base class. Single-network methods implement ``loss`` and ``sample`` and nothing else."""

    name: str = "method"
    ema_networks: tuple[str, ...] = ("net",)
    sampling_network: str = "net"
    #: ``config()`` entries fitted to the training data when training starts rather than chosen by the user (e.g.
    #: the subspace jump's detail variance): resuming with a freshly built method adopts the saved values
    fitted_settings: tuple[str, ...] = ()

    # --- configuration -------------------------------------------------------------------------------------
    def config(self) -> dict:
        """JSON-able kwargs such that ``type(self)(**self.config())`` rebuilds the method."""
        return {}

    @staticmethod
    def add_arguments(group: argparse._ArgumentGroup) -> None:
        """Add this method's command-line flags to ``group`` (flags are shared by name across methods)."""

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "Method":
        return cls()

    # --- networks and training -----------------------------------------------------------------------------
    def output_channels(self, data_channels: int) -> int:
        """Output channels of the main network (the KL 2nd variant predicts M coefficients at once)."""
        return data_channels

    def build_networks(self, net_cfg: dict, image_shape: tuple[int, int, int]) -> dict[str, nn.Module]:
        from diffaccel.nets.unet import build_unet

        channels, height, _ = image_shape
        return {"net": build_unet(net_cfg.get("preset", "small"), channels, self.output_channels(channels), height,
                                  **net_cfg.get("overrides", {}))}

    def phases(self) -> list[Phase]:
        return [Phase("main", ("net",), lambda nets, x0, step: self.loss(nets["net"], x0))]

    def loss(self, net: nn.Module, x0: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def initialize(self, nets: dict[str, nn.Module], init_from) -> None:
        """Initialise fresh networks from another run (``--init-from RUN``); methods that support it override."""
        from diffaccel.errors import UserError

        raise UserError(f"method {self.name!r} does not support --init-from")

    def adopt_fitted(self, saved: dict) -> None:
        """Take the ``fitted_settings`` of the run being resumed, so they are kept rather than fitted again."""

    def on_train_start(self, total_steps: int) -> None:
        """Called by the trainer before the first step (e.g. Weighted Learning needs the run's length)."""

    def on_log(self, record: dict, log: Callable[[str], None]) -> None:
        """Called with every metrics record the trainer writes (e.g. to watch a discriminator's health)."""

    def prepare(self, dataset, device):
        """Hook run once before training (e.g. cache autoencoder latents); returns the dataset to train on."""
        return dataset

    # --- sampling ------------------------------------------------------------------------------------------
    def sample(self, net: nn.Module, n: int, image_shape: tuple[int, int, int], *,
               generator: torch.Generator | None = None, device=None, **sampler_options) -> torch.Tensor:
        raise NotImplementedError

    def nfe(self, **sampler_options) -> int:
        """Network function evaluations per sampled image."""
        raise NotImplementedError

    @staticmethod
    def add_sample_arguments(group: argparse._ArgumentGroup) -> None:
        """Extra flags of this method for `diffaccel sample` / `eval` (e.g. --pds); shared by name."""

    def sampler_options(self, args: argparse.Namespace) -> dict:
        """Sampler options from the `sample`/`eval` command line (default: the epsilon samplers' flags)."""
        options = {"sampler": args.sampler, "steps": args.steps, "eta": args.eta,
                   "clip_x0": getattr(args, "clip_x0", False) or None}
        if options["sampler"] is not None and options["sampler"] not in ("ddim", "ddpm"):
            raise UserError(f"unknown sampler {options['sampler']!r} for {self.name}; choose ddim or ddpm")
        if options["sampler"] == "ddpm":
            unused = [f for f in ("steps", "eta") if options[f] is not None]
            if unused:  # DDPM takes every step of the schedule with the posterior variance: nothing to set
                raise UserError(" and ".join("--" + f for f in unused) + " not used by --sampler ddpm (it takes "
                                "every step of the schedule, η = 1); use --sampler ddim to choose them")
        return {k: v for k, v in options.items() if v is not None}  # unset flags keep the method's defaults


def add_clip_x0_argument(group: argparse._ArgumentGroup) -> None:
    """``--clip-x0`` for the methods whose DDIM/DDPM samplers take ``clip_x0`` (read by ``Method.sampler_options``)."""
    group.add_argument("--clip-x0", action="store_true",
                       help="DDIM/DDPM: clip each predicted x0 to the data range (DDPM's clip_denoised)")
