"""Stationary Gaussian image data: N(m, C) with C circulant, i.e. diagonal in the 2-D DFT.

C·v = F⁻¹[λ ⊙ F v] with λ_k ≥ 0 and λ(k) = λ(−k), so the law is real. Fitted to images, λ_k is their mean
power spectrum around the mean image, E|F(x − m)|²_k / (H·W) — the data spectrum the PDS frequency filter is
built from, so this is the testbed on which R acts one frequency at a time. Every operation is one FFT, so
32×32 images and thousands of samples cost milliseconds per call, where a dense 1024×1024 covariance would not.

  VE score (y = x₀ + σξ):        ∇log p_σ(y) = −F⁻¹[F(y − m) / (λ + σ²)]
  VP epsilon (x = √a x₀ + √(1−a) ε): E[ε | x] = √(1−a)·F⁻¹[F(x − √a m) / (aλ + 1 − a)]
Written by hand: no library ships these closed forms.
"""

from __future__ import annotations

import torch
from torch import nn


def _filter(v: torch.Tensor, spectrum: torch.Tensor) -> torch.Tensor:
    """F⁻¹[spectrum ⊙ F v] over the last two axes; real because the spectrum is even."""
    return torch.fft.ifft2(torch.fft.fft2(v) * spectrum).real


class StationaryGaussian:
    """Images [C, H, W] with law N(mean, F⁻¹ diag(lam) F); ``lam`` [C, H, W] in the unshifted DFT layout."""

    def __init__(self, mean: torch.Tensor, lam: torch.Tensor):
        self.mean, self.lam = mean.double(), lam.double().clamp(min=0)

    @classmethod
    def fit(cls, images: torch.Tensor) -> "StationaryGaussian":
        """Mean image and mean power spectrum of ``images`` [n, C, H, W]."""
        x = images.double()
        mean = x.mean(0)
        h, w = x.shape[-2:]
        lam = (torch.fft.fft2(x - mean).abs() ** 2).mean(0) / (h * w)
        return cls(mean, lam)

    def covariance(self) -> torch.Tensor:
        """The dense covariance [D, D] (for checks on small images)."""
        d = self.mean.numel()
        basis = torch.eye(d, dtype=torch.float64).view(d, *self.mean.shape)
        return _filter(basis, self.lam).reshape(d, d)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        z = torch.randn((n, *self.mean.shape), generator=generator, dtype=torch.float64)
        return self.mean + _filter(z, self.lam.sqrt())

    def ve_score(self, y: torch.Tensor, sigma) -> torch.Tensor:
        """Exact score of the data convolved with N(0, σ²I); σ a scalar or [B]."""
        sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, *([1] * self.mean.ndim))
        return _filter(y.double() - self.mean, -1.0 / (self.lam + sigma ** 2)).to(y.dtype)

    def power_ratio(self, samples: torch.Tensor) -> torch.Tensor:
        """Per frequency, the samples' power around the target mean over the target's: 1 everywhere when exact.
        The mean's error is included (it shows at the DC term)."""
        h, w = samples.shape[-2:]
        power = (torch.fft.fft2(samples.double() - self.mean).abs() ** 2).mean(0) / (h * w)
        return power / self.lam.clamp(min=1e-12)

    def vp_epsilon(self, alpha_bars: torch.Tensor) -> "StationaryVPEpsilon":
        return StationaryVPEpsilon(self, alpha_bars)


class StationaryVPEpsilon(nn.Module):
    """``net(x, k)``: the exact E[ε | x_k] of a VP grid ``alpha_bars`` for ``StationaryGaussian`` data."""

    def __init__(self, data: StationaryGaussian, alpha_bars: torch.Tensor):
        super().__init__()
        self.data, self.alpha_bars = data, alpha_bars.double()

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = self.alpha_bars[t.round().long()].reshape(-1, *([1] * self.data.mean.ndim))
        eps = (1 - a).sqrt() * _filter(x.double() - a.sqrt() * self.data.mean, 1.0 / (a * self.data.lam + 1 - a))
        return eps.to(x.dtype)
