"""Latent space as a setting: a method that trains and samples in the scaled latent space of an autoencoder run.

Latent diffusion's convention (Rombach et al. 2022): the training set is encoded once, the latents are shifted and
scaled to unit standard deviation by factors stored with the autoencoder, and every sample is decoded back to an
image. A method mixes this in and sets ``self.autoencoder_run`` (None: pixel space, nothing changes).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

from diffaccel.errors import UserError


def add_autoencoder_argument(group: argparse._ArgumentGroup) -> None:
    if "--autoencoder" not in group._option_string_actions:  # shared by every method that can run on latents
        group.add_argument("--autoencoder", default=None,
                           help="run directory of a trained autoencoder (`train --method autoencoder`): train and "
                                "sample in its unit-std latent space (lddgan: required; baseline, kl, dvdp, "
                                "subspace, score-ve: optional)")


def check_autoencoder_run(autoencoder: str) -> str:
    if not Path(autoencoder).is_dir():
        raise UserError(f"--autoencoder {autoencoder}: no such run directory")
    return str(autoencoder)


class LatentSpace:
    """Mixin for :class:`~diffaccel.methods.base.Method`: encode, train on and decode latents when
    ``autoencoder_run`` is set; behave as in pixel space when it is None."""

    autoencoder_run: str | None = None

    @property
    def latent(self) -> bool:
        return self.autoencoder_run is not None

    def autoencoder(self, device="cpu") -> nn.Module:
        """The frozen EMA autoencoder with its latent shift/scale, loaded once per device."""
        from diffaccel.methods.autoencoder import load_autoencoder

        cache = self.__dict__.setdefault("_autoencoders", {})
        key = str(torch.device(device))
        if key not in cache:
            cache[key] = load_autoencoder(self.autoencoder_run, device)
        return cache[key]

    def data_shape(self, image_shape: tuple[int, int, int]) -> tuple[int, int, int]:
        """Shape the diffusion runs on: the latent's in latent space, else the image's."""
        return self.autoencoder("cpu").latent_shape if self.latent else tuple(image_shape)

    def build_networks(self, net_cfg: dict, image_shape: tuple[int, int, int]) -> dict[str, nn.Module]:
        # the trainer passes the prepared (latent) shape, a loaded run its image shape: both mean the latent here
        return super().build_networks(net_cfg, self.data_shape(image_shape))

    def prepare(self, dataset, device):
        """Encode the training set once (cached on disk in the autoencoder run) and train on its latents."""
        if not self.latent:
            return dataset
        from diffaccel.methods.autoencoder import cached_latents

        return cached_latents(self.autoencoder_run, self.autoencoder(device), dataset, device)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        return self.autoencoder(x.device).decode_scaled(x) if self.latent else x

    @torch.no_grad()
    def to_diffusion_space(self, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
        """Images in [-1, 1] as the diffusion sees them: unchanged in pixel space, else their scaled latents
        (what a PDS filter of a latent run is computed from: the latents' own spectrum)."""
        if not self.latent:
            return images
        ae = self.autoencoder("cpu")
        return torch.cat([ae.encode_scaled(images[i:i + batch].float()) for i in range(0, len(images), batch)])

    def check_latent_options(self, clip_x0: bool = False) -> None:
        """Sampler options that only make sense on pixels, refused in latent space before any work."""
        if self.latent and clip_x0:
            raise UserError(f"--clip-x0 clips the predicted x0 to the pixel range [-1, 1]; a latent {self.name}'s "
                            "x0 is a unit-std latent (its decoded image is clipped anyway): drop --clip-x0")
