"""Denoising-diffusion-GAN networks: an NCSN++-style generator with AdaGN and a time-conditioned discriminator.

Hand-written because no library ships them: diffusers' UNet has no per-sample normalisation driven by a
latent z. Generator: G(x_t, t, z) -> x_0 prediction in [-1, 1] (tanh). Every GroupNorm is adaptive
("AdaGN"): its scale and shift come from a mapping network of z, PixelNorm -> dense(nz -> z_dim) -> SiLU ->
n_mlp x (dense -> SiLU). Discriminator: D(x_{t-1}, x_t, t) -> one logit per sample.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import get_timestep_embedding
from torch import nn

from diffaccel.errors import UserError

GENERATOR_PRESETS: dict[str, dict] = {
    "tiny": dict(ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), nz=16, z_dim=32, n_mlp=2,
                 t_dim=64, groups=8),
    "small": dict(ch=48, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(), nz=32, z_dim=128, n_mlp=3,
                  t_dim=128, groups=16),
    "ddgan-cifar10": dict(ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,), nz=100,
                          z_dim=256, n_mlp=4, t_dim=512, groups=32),
}

DISCRIMINATOR_PRESETS: dict[str, dict] = {
    "tiny": dict(ch=16, ch_mult=(1, 2), t_dim=32),
    "small": dict(ch=48, ch_mult=(1, 2, 2), t_dim=64),
    "ddgan-cifar10": dict(ch=64, ch_mult=(2, 4, 8, 8), t_dim=128),
}


def _preset(table: dict, name: str, what: str) -> dict:
    if name not in table:
        raise UserError(f"unknown {what} preset {name!r}; choose one of: {', '.join(table)}")
    return dict(table[name])


class PixelNorm(nn.Module):
    """x / RMS(x) over features (StyleGAN): makes the mapping network see z on the unit sphere."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z * torch.rsqrt(z.pow(2).mean(dim=1, keepdim=True) + 1e-8)


class ZMapping(nn.Module):
    """PixelNorm -> dense(nz -> z_dim) -> SiLU -> n_mlp x (dense -> SiLU)."""

    def __init__(self, nz: int, z_dim: int, n_mlp: int):
        super().__init__()
        layers: list[nn.Module] = [PixelNorm(), nn.Linear(nz, z_dim), nn.SiLU()]
        for _ in range(n_mlp):
            layers += [nn.Linear(z_dim, z_dim), nn.SiLU()]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class AdaGN(nn.Module):
    """GroupNorm whose per-sample scale and shift are a linear function of the mapped z."""

    def __init__(self, channels: int, z_dim: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(math.gcd(groups, channels), channels, affine=False, eps=1e-6)
        self.style = nn.Linear(z_dim, 2 * channels)
        # start as a plain GroupNorm: scale 1, shift 0 (the weights keep their random init, so z acts at once)
        nn.init.zeros_(self.style.bias)
        self.style.bias.data[:channels] = 1.0

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        scale, shift = self.style(w)[:, :, None, None].chunk(2, dim=1)
        return scale * self.norm(x) + shift


class ResBlock(nn.Module):
    """BigGAN/NCSN++ residual block with AdaGN, time embedding added after the first conv, skip rescaled by 1/√2."""

    def __init__(self, c_in: int, c_out: int, t_dim: int, z_dim: int, groups: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = AdaGN(c_in, z_dim, groups)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.temb = nn.Linear(t_dim, c_out)
        self.norm2 = AdaGN(c_out, z_dim, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x, temb, w):
        h = self.conv1(F.silu(self.norm1(x, w)))
        h = h + self.temb(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h, w))))
        return (self.skip(x) + h) / math.sqrt(2.0)


class AttnBlock(nn.Module):
    """Single-head self-attention over pixels, AdaGN-normalised like the rest of the generator."""

    def __init__(self, channels: int, z_dim: int, groups: int):
        super().__init__()
        self.norm = AdaGN(channels, z_dim, groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x, temb, w):
        b, c, h, wd = x.shape
        q, k, v = self.qkv(self.norm(x, w)).reshape(b, 3, c, h * wd).transpose(-1, -2).unbind(1)
        out = F.scaled_dot_product_attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)).squeeze(1)
        return (x + self.proj(out.transpose(-1, -2).reshape(b, c, h, wd))) / math.sqrt(2.0)


def _time_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    return get_timestep_embedding(t.float().reshape(-1), dim, flip_sin_to_cos=True, downscale_freq_shift=0)


class DDGANGenerator(nn.Module):
    """G(x_t, t, z) -> predicted x_0. ``t`` is the step index (float [B]); ``z`` is [B, nz].

    ``output="tanh"`` bounds x_0 to [-1, 1] (pixels); ``"identity"`` leaves it free (unit-std latents, whose
    range is not [-1, 1]: a tanh there would squash the tails the decoder needs).
    """

    def __init__(self, in_channels: int, resolution: int, ch: int, ch_mult: tuple[int, ...], num_res_blocks: int,
                 attn_resolutions: tuple[int, ...], nz: int, z_dim: int, n_mlp: int, t_dim: int, groups: int,
                 dropout: float = 0.0, output: str = "tanh"):
        super().__init__()
        if output not in ("tanh", "identity"):
            raise UserError(f"generator output must be tanh or identity, got {output!r}")
        self.output = output
        levels = len(ch_mult)
        if resolution % (2 ** (levels - 1)) != 0:
            raise UserError(f"generator with {levels} levels needs a resolution divisible by {2 ** (levels - 1)}, "
                            f"got {resolution}")
        self.nz, self.in_channels, self.t_dim = nz, in_channels, t_dim
        self.mapping = ZMapping(nz, z_dim, n_mlp)
        self.t_mlp = nn.Sequential(nn.Linear(t_dim, t_dim), nn.SiLU(), nn.Linear(t_dim, t_dim))
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)

        def block(c_in, c_out, res):
            blocks = nn.ModuleList([ResBlock(c_in, c_out, t_dim, z_dim, groups, dropout)])
            if res in attn_resolutions:
                blocks.append(AttnBlock(c_out, z_dim, groups))
            return blocks

        self.down = nn.ModuleList()
        skip_channels = [ch]
        c, res = ch, resolution
        for i, mult in enumerate(ch_mult):
            for _ in range(num_res_blocks):
                self.down.append(block(c, ch * mult, res))
                c = ch * mult
                skip_channels.append(c)
            if i < levels - 1:
                self.down.append(nn.ModuleList([nn.AvgPool2d(2)]))
                res //= 2
                skip_channels.append(c)
        self.mid = nn.ModuleList([ResBlock(c, c, t_dim, z_dim, groups, dropout), AttnBlock(c, z_dim, groups),
                                  ResBlock(c, c, t_dim, z_dim, groups, dropout)])
        self.up = nn.ModuleList()
        for i, mult in reversed(list(enumerate(ch_mult))):
            for _ in range(num_res_blocks + 1):
                self.up.append(block(c + skip_channels.pop(), ch * mult, res))
                c = ch * mult
            if i > 0:
                self.up.append(nn.ModuleList([nn.Upsample(scale_factor=2, mode="nearest")]))
                res *= 2
        self.norm_out = AdaGN(c, z_dim, groups)
        self.conv_out = nn.Conv2d(c, in_channels, 3, padding=1)

    @staticmethod
    def _run(blocks, h, temb, w):
        for layer in blocks:
            h = layer(h, temb, w) if isinstance(layer, (ResBlock, AttnBlock)) else layer(h)
        return h

    def forward(self, x: torch.Tensor, t: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        if z is None:
            z = torch.randn(x.shape[0], self.nz, device=x.device, dtype=x.dtype)
        w = self.mapping(z)
        temb = self.t_mlp(_time_embedding(t.to(x.device), self.t_dim).to(x.dtype))
        h = self.conv_in(x)
        skips = [h]
        for blocks in self.down:
            h = self._run(blocks, h, temb, w)
            skips.append(h)
        h = self._run(self.mid, h, temb, w)
        for blocks in self.up:
            if isinstance(blocks[0], ResBlock):
                h = torch.cat([h, skips.pop()], dim=1)
            h = self._run(blocks, h, temb, w)
        out = self.conv_out(F.silu(self.norm_out(h, w)))
        return torch.tanh(out) if self.output == "tanh" else out


def minibatch_std(x: torch.Tensor, group: int = 4) -> torch.Tensor:
    """Append the mean (over features) std across a group of samples as one extra channel (StyleGAN)."""
    b, c, h, w = x.shape
    g = math.gcd(group, b)
    y = x.reshape(g, -1, c, h, w)
    y = (y.var(dim=0, unbiased=False) + 1e-8).sqrt().mean(dim=(1, 2, 3))  # [b / g]
    y = y.repeat(g).reshape(b, 1, 1, 1).expand(b, 1, h, w)
    return torch.cat([x, y], dim=1)


class DownBlock(nn.Module):
    """Discriminator residual block: two 3x3 convs (time embedding added between), 2x average-pool down."""

    def __init__(self, c_in: int, c_out: int, t_dim: int, down: bool = True):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.temb = nn.Linear(t_dim, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1, bias=False)
        self.down = down

    def forward(self, x, temb):
        h = self.conv1(F.leaky_relu(x, 0.2))
        h = h + self.temb(temb)[:, :, None, None]
        h = self.conv2(F.leaky_relu(h, 0.2))
        h = (self.skip(x) + h) / math.sqrt(2.0)
        # stop halving at 2x2 so small latents (e.g. 4x4) still fit the same preset
        return F.avg_pool2d(h, 2) if self.down and h.shape[-1] >= 4 else h


class DDGANDiscriminator(nn.Module):
    """D(x_{t-1}, x_t, t) -> logit [B]; the pair is concatenated along channels."""

    def __init__(self, in_channels: int, ch: int, ch_mult: tuple[int, ...], t_dim: int):
        super().__init__()
        self.t_dim = t_dim
        self.t_mlp = nn.Sequential(nn.Linear(t_dim, t_dim), nn.LeakyReLU(0.2), nn.Linear(t_dim, t_dim),
                                   nn.LeakyReLU(0.2))
        self.conv_in = nn.Conv2d(2 * in_channels, ch, 1)
        blocks, c = [], ch
        for mult in ch_mult:
            blocks.append(DownBlock(c, ch * mult, t_dim))
            c = ch * mult
        self.blocks = nn.ModuleList(blocks)
        self.conv_out = nn.Conv2d(c + 1, c, 3, padding=1)
        self.fc = nn.Linear(c, 1)

    def forward(self, x_prev: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        temb = self.t_mlp(_time_embedding(t.to(x_t.device), self.t_dim).to(x_t.dtype))
        h = self.conv_in(torch.cat([x_prev, x_t], dim=1))
        for blk in self.blocks:
            h = blk(h, temb)
        h = F.leaky_relu(self.conv_out(minibatch_std(h)), 0.2)
        return self.fc(h.sum(dim=(2, 3))).squeeze(1)


def build_generator(preset: str, in_channels: int, resolution: int, **overrides) -> DDGANGenerator:
    cfg = _preset(GENERATOR_PRESETS, preset, "DDGAN generator")
    cfg.update(overrides)
    return DDGANGenerator(in_channels, resolution, **cfg)


def build_discriminator(preset: str, in_channels: int, **overrides) -> DDGANDiscriminator:
    cfg = _preset(DISCRIMINATOR_PRESETS, preset, "DDGAN discriminator")
    cfg.update(overrides)
    return DDGANDiscriminator(in_channels, **cfg)
