"""The time-embedding width as a network setting (``time_embedding_width`` in --net-config)."""

import math

import pytest
import torch

from diffaccel.errors import UserError
from diffaccel.nets.unet import build_unet


def test_time_embedding_width_sets_the_number_of_sinusoids_only():
    default = build_unet("tiny", 1, 1, 8, block_out_channels=[8, 16], norm_num_groups=4)
    wide = build_unet("tiny", 1, 1, 8, block_out_channels=[8, 16], norm_num_groups=4, time_embedding_width=64)
    assert default.unet.time_proj.num_channels == 8 and wide.unet.time_proj.num_channels == 64
    assert wide.unet.time_embedding.linear_1.in_features == 64
    # the MLP after the sinusoids keeps its width (time_embedding_dim), so every block is unchanged
    assert wide.unet.time_embedding.linear_2.out_features == default.unet.time_embedding.linear_2.out_features
    changed = {k for k, v in wide.state_dict().items() if v.shape != default.state_dict()[k].shape}
    assert changed == {"unet.time_embedding.linear_1.weight"}
    # the sinusoids: 32 sines then 32 cosines (flip_sin_to_cos of the preset puts cosines first) of t·f_j,
    # f_j = exp(−ln(10⁴)·j/32)
    t = torch.tensor([3.0])
    emb = wide.unet.time_proj(t)[0]
    f = torch.exp(-math.log(10000) * torch.arange(32) / 32)
    halves = {tuple(torch.sin(3 * f).round(decimals=5).tolist()), tuple(torch.cos(3 * f).round(decimals=5).tolist())}
    assert {tuple(emb[:32].round(decimals=5).tolist()), tuple(emb[32:].round(decimals=5).tolist())} == halves
    x = torch.randn(2, 1, 8, 8)
    assert wide(x, torch.tensor([1.0, 100.0])).shape == x.shape
    for bad in (3, 0, 2.5, True):
        with pytest.raises(UserError, match="time_embedding_width"):
            build_unet("tiny", 1, 1, 8, time_embedding_width=bad)
