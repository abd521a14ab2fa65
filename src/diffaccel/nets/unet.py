"""The standard denoising UNet: diffusers' UNet2DModel behind the ``net(x, t)`` convention."""

from __future__ import annotations

import torch
from diffusers import UNet2DModel
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from torch import nn

from diffaccel.errors import UserError

# Named sizes: ``tiny`` for tests, ``mini`` for the few-minute CPU demo, ``small`` for benchmarks. ``ddpm-cifar10`` is the 35.7M-parameter network of Ho et al. (2020) for 32×32 images.
PRESETS: dict[str, dict] = {
    "tiny": dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
                 down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D")),
    "mini": dict(block_out_channels=(16, 32, 64), layers_per_block=1, norm_num_groups=8,
                 down_block_types=("DownBlock2D",) * 3, up_block_types=("UpBlock2D",) * 3),
    "small": dict(block_out_channels=(32, 64, 128), layers_per_block=1, norm_num_groups=16,
                  down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
                  up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D")),
    "ddpm-cifar10": dict(block_out_channels=(128, 256, 256, 256), layers_per_block=2, norm_num_groups=32,
                         dropout=0.1,
                         down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                         up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D")),
}


class DiffusersAdapter(nn.Module):
    """Makes any diffusers UNet (``unet(x, timestep).sample``) a ``net(x, t)`` network."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """``labels``: integer class indices for a UNet built with ``num_class_embeds`` (its learned embedding is
        added to the time embedding); KL diffusion's term-embedding variant passes the basis index there."""
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        return self.unet(x, t, class_labels=labels).sample

    @property
    def config(self):
        return self.unet.config


def build_unet(preset: str, in_channels: int, out_channels: int, sample_size: int, **overrides) -> DiffusersAdapter:
    """A UNet2DModel of a named size; ``overrides`` replace any UNet2DModel argument of the preset.

    One override is ours: ``time_embedding_width``, the number of sinusoidal features of the time input
    (half sines, half cosines). UNet2DModel ties it to ``block_out_channels[0]``; the KL time index spans
    N·M values, and 8 sinusoids (width 16) put far-apart indices close together, so it can be set apart from
    the first level's width. ``time_embedding_dim`` (a UNet2DModel argument) is the MLP width after it.
    """
    if preset not in PRESETS:
        raise UserError(f"unknown network preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    overrides = dict(overrides)
    width = overrides.pop("time_embedding_width", None)
    if width is not None and (not isinstance(width, int) or isinstance(width, bool) or width < 2 or width % 2):
        raise UserError(f"time_embedding_width must be an even integer >= 2, got {width!r}")
    kwargs = {**PRESETS[preset], **overrides}
    if "block_out_channels" in overrides and "down_block_types" not in overrides:
        # keep the preset's block types when only the widths change the number of levels
        levels = len(kwargs["block_out_channels"])
        kwargs["down_block_types"] = tuple(PRESETS[preset]["down_block_types"][:1]) * levels
        kwargs["up_block_types"] = tuple(PRESETS[preset]["up_block_types"][-1:]) * levels
    levels = len(kwargs["block_out_channels"])
    if sample_size % 2 ** (levels - 1):
        raise UserError(f"image size {sample_size} is not divisible by {2 ** (levels - 1)}, "
                        f"which the {levels}-level {preset!r} UNet needs")
    kwargs["block_out_channels"] = tuple(kwargs["block_out_channels"])
    unet = UNet2DModel(sample_size=sample_size, in_channels=in_channels, out_channels=out_channels, **kwargs)
    if width is not None and width != unet.time_proj.num_channels:
        if unet.config.time_embedding_type != "positional":
            raise UserError("time_embedding_width needs time_embedding_type 'positional' (sinusoids)")
        proj = unet.time_proj
        unet.time_proj = Timesteps(width, proj.flip_sin_to_cos, proj.downscale_freq_shift)
        unet.time_embedding = TimestepEmbedding(width, unet.time_embedding.linear_1.out_features)
    return DiffusersAdapter(unet)


def count_parameters(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())
