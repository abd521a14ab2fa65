"""VQGAN-like autoencoder on ``diffusers.VQModel`` (the quantiser sits in the decoder) and a patch discriminator.

``encode`` returns the continuous pre-quantisation latent; ``decode`` quantises it and decodes, so a diffusion
model run on the latents never has to produce codebook entries exactly (LDDGAN §4.2). ``latent_shift`` and
``latent_scale`` (buffers, set from data) map latents into about [-1, 1]: scaled = (latent - shift) * scale.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers import VQModel
from torch import nn

from diffaccel.errors import UserError

AUTOENCODER_PRESETS: dict[str, dict] = {
    "tiny": dict(channels=16, layers_per_block=1, num_vq_embeddings=64, groups=8),
    "small": dict(channels=64, layers_per_block=1, num_vq_embeddings=256, groups=16),
    "base": dict(channels=128, layers_per_block=2, num_vq_embeddings=1024, groups=32),
}
FACTORS = (1, 2, 4, 8)


class Autoencoder(nn.Module):
    """Encoder/decoder pair with downsampling factor ``factor`` and ``latent_channels`` latent channels."""

    def __init__(self, in_channels: int, resolution: int, factor: int = 4, latent_channels: int = 4,
                 channels: int = 64, layers_per_block: int = 1, num_vq_embeddings: int = 256, groups: int = 16):
        super().__init__()
        if factor not in FACTORS:
            raise UserError(f"autoencoder factor f must be one of {FACTORS}, got {factor}")
        if resolution % factor:
            raise UserError(f"image resolution {resolution} is not divisible by the autoencoder factor {factor}")
        if latent_channels < 1:
            raise UserError(f"latent channels must be >= 1, got {latent_channels}")
        levels = int(math.log2(factor)) + 1  # diffusers halves between consecutive blocks
        widths = tuple(channels * min(2 ** i, 4) for i in range(levels))
        self.vq = VQModel(in_channels=in_channels, out_channels=in_channels,
                          down_block_types=("DownEncoderBlock2D",) * levels,
                          up_block_types=("UpDecoderBlock2D",) * levels, block_out_channels=widths,
                          layers_per_block=layers_per_block, latent_channels=latent_channels,
                          num_vq_embeddings=num_vq_embeddings, norm_num_groups=groups, sample_size=resolution,
                          vq_embed_dim=latent_channels)
        self.factor, self.latent_channels, self.resolution = factor, latent_channels, resolution
        self.register_buffer("latent_shift", torch.zeros(latent_channels))
        self.register_buffer("latent_scale", torch.ones(()))

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        r = self.resolution // self.factor
        return (self.latent_channels, r, r)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.vq.encode(x).latents

    def decode(self, latents: torch.Tensor, quantize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(image, commitment + codebook loss); the quantiser runs first, as in VQGAN's decoder."""
        out = self.vq.decode(latents, force_not_quantize=not quantize)
        return out.sample, out.commit_loss.mean()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(reconstruction, latent, vq loss)."""
        h = self.encode(x)
        recon, vq_loss = self.decode(h)
        return recon, h, vq_loss

    def encode_scaled(self, x: torch.Tensor) -> torch.Tensor:
        return (self.encode(x) - self.latent_shift.view(1, -1, 1, 1)) * self.latent_scale

    def decode_scaled(self, z: torch.Tensor) -> torch.Tensor:
        return self.decode(z / self.latent_scale + self.latent_shift.view(1, -1, 1, 1))[0]


class PatchDiscriminator(nn.Module):
    """PatchGAN (Isola et al.): strided convs giving one logit per overlapping patch."""

    def __init__(self, in_channels: int, channels: int = 32, layers: int = 2):
        super().__init__()
        mods: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        c = channels
        for _ in range(1, layers):
            mods += [nn.Conv2d(c, 2 * c, 4, 2, 1), nn.GroupNorm(math.gcd(8, 2 * c), 2 * c), nn.LeakyReLU(0.2)]
            c *= 2
        mods += [nn.Conv2d(c, c, 3, 1, 1), nn.GroupNorm(math.gcd(8, c), c), nn.LeakyReLU(0.2),
                 nn.Conv2d(c, 1, 3, 1, 1)]
        self.net = nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def build_autoencoder(preset: str, in_channels: int, resolution: int, factor: int = 4, latent_channels: int = 4,
                      **overrides) -> Autoencoder:
    if preset not in AUTOENCODER_PRESETS:
        raise UserError(f"unknown autoencoder preset {preset!r}; choose one of: {', '.join(AUTOENCODER_PRESETS)}")
    cfg = {**AUTOENCODER_PRESETS[preset], **overrides}
    return Autoencoder(in_channels, resolution, factor, latent_channels, **cfg)


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of [-1, 1] images (peak-to-peak 2)."""
    mse = F.mse_loss(x, y, reduction="none").flatten(1).mean(1)
    return 10 * torch.log10(4.0 / mse.clamp_min(1e-12))
