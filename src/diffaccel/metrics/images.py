"""Image preparation shared by the FID feature extractors (EfficientNet-lite0 and Inception)."""

from __future__ import annotations

import torch

from diffaccel.errors import UserError


def extractor_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] or float [-1, 1] images ``[B, 1 or 3, H, W]`` -> float32 RGB in [-1, 1]."""
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise UserError(f"images must be [B, C, H, W] with C = 1 or 3, got shape {tuple(images.shape)}")
    x = images.float().div_(127.5).sub_(1.0) if images.dtype == torch.uint8 else images.float()
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
