"""The standard FID Inception-v3 (TensorFlow's 2015-12-05 graph, as ported by pytorch-fid).

Architecture of torchvision's Inception-v3 with the FID graph's differences: 1008 classes, average pools that
ignore padding (``count_include_pad=False``), and a max pool in the last block's pool branch. Parameter names
match pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` state dict, so that file loads as it is.
Preprocessing as in pytorch-fid: bilinear resize to 299 x 299, then pixels in [-1, 1]; the feature is the
2048-d output of the final average pool.

No package on PyPI ships these weights and they cannot be downloaded at run time here: give the file with
``--inception-weights PATH`` / ``weights_path=``, ``$DIFFACCEL_INCEPTION_WEIGHTS``, or place it in the torch
hub cache (``<torch.hub.get_dir()>/checkpoints/``).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from diffaccel.errors import UserError
from diffaccel.metrics.images import extractor_input

WEIGHTS_FILENAMES = ("pt_inception-2015-12-05-6726825d.pth",)
WEIGHTS_URL_HINT = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + WEIGHTS_FILENAMES[0]


class BasicConv2d(nn.Sequential):
    """conv (no bias) -> batch norm (eps 1e-3) -> ReLU; names ``conv`` / ``bn`` as in the state dict."""

    def __init__(self, cin: int, cout: int, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)
        self.relu = nn.ReLU(inplace=True)


def _avg3(x):
    # TensorFlow's average pool excludes the zero padding from the mean.
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class MixedA(nn.Module):  # 35 x 35 blocks: Mixed_5b, 5c, 5d
    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, 1)
        self.branch5x5_1 = BasicConv2d(cin, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, 1)

    def forward(self, x):
        return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          self.branch_pool(_avg3(x))], 1)


class ReductionB(nn.Module):  # Mixed_6a: 35 -> 17
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([self.branch3x3(x), self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          F.max_pool2d(x, 3, stride=2)], 1)


class MixedC(nn.Module):  # 17 x 17 blocks with factorised 7x7 convolutions: Mixed_6b..6e
    def __init__(self, cin: int, c7: int):
        super().__init__()
        row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
        self.branch1x1 = BasicConv2d(cin, 192, 1)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, **row)
        self.branch7x7_3 = BasicConv2d(c7, 192, **col)
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, **col)
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, **row)
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, **col)
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, **row)
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                      self.branch7x7dbl_5):
            d = layer(d)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(_avg3(x))], 1)


class ReductionD(nn.Module):  # Mixed_7a: 17 -> 8
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x):
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, stride=2)], 1)


class MixedE(nn.Module):  # 8 x 8 blocks with split 3x3 convolutions: Mixed_7b (avg pool), Mixed_7c (max pool)
    def __init__(self, cin: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(cin, 320, 1)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        # The FID graph's last block max-pools here (the other blocks average-pool).
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg3(x)
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(b3), self.branch3x3_2b(b3),
                          self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d), self.branch_pool(pooled)], 1)


def find_weights(weights_path: str | Path | None = None) -> Path:
    """The FID Inception weights file: the given path, $DIFFACCEL_INCEPTION_WEIGHTS, or the torch hub cache."""
    if weights_path is not None:
        path = Path(weights_path).expanduser()
        if not path.is_file():
            raise UserError(f"Inception weights file not found: {path}")
        return path
    env = os.environ.get("DIFFACCEL_INCEPTION_WEIGHTS")
    if env:
        path = Path(env).expanduser()
        if not path.is_file():
            raise UserError(f"$DIFFACCEL_INCEPTION_WEIGHTS points to a missing file: {path}")
        return path
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    for name in WEIGHTS_FILENAMES:
        if (hub / name).is_file():
            return hub / name
    raise UserError(
        "the 'inception' extractor needs the FID Inception-v3 weights (2015-12-05), which no package ships and "
        f"which cannot be downloaded here. Get {WEIGHTS_FILENAMES[0]} (from {WEIGHTS_URL_HINT}) on a machine "
        f"with internet, then pass --inception-weights PATH, set DIFFACCEL_INCEPTION_WEIGHTS=PATH, or copy it "
        f"to {hub}/. Or use the offline default: --extractor effnet.")


class FIDInceptionV3(nn.Module):
    """FID Inception-v3 returning the 2048-d pool features of images in [-1, 1] (1 or 3 channels)."""

    name = "inception"
    num_features = 2048
    input_size = 299

    def __init__(self, weights_path: str | Path | None = None, pretrained: bool = True):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = MixedA(192, 32)
        self.Mixed_5c = MixedA(256, 64)
        self.Mixed_5d = MixedA(288, 64)
        self.Mixed_6a = ReductionB(288)
        self.Mixed_6b = MixedC(768, 128)
        self.Mixed_6c = MixedC(768, 160)
        self.Mixed_6d = MixedC(768, 160)
        self.Mixed_6e = MixedC(768, 192)
        self.Mixed_7a = ReductionD(768)
        self.Mixed_7b = MixedE(1280, max_pool=False)
        self.Mixed_7c = MixedE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)  # unused for features; kept so the state dict loads strictly
        self.weights_file = None
        if pretrained:
            path = find_weights(weights_path)
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
                self.load_state_dict(state)
            except Exception as e:
                raise UserError(f"{path} is not a FID Inception-v3 state dict ({WEIGHTS_FILENAMES[0]}): "
                                f"{str(e).splitlines()[0][:300]}") from None
            self.weights_file = str(path)
        self.eval().requires_grad_(False)

    def spec(self) -> str:
        return "inception-fid-2015-12-05-299" + ("" if self.weights_file else "-random")

    def train(self, mode: bool = True):
        return super().train(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = extractor_input(images)
        # pytorch-fid: bilinear resize of [0, 1] images, then 2x - 1; resizing is linear, so resizing [-1, 1]
        # images directly gives the same input.
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        return x.mean(dim=(2, 3))
