"""Scoring samples against real data: FID, KID, precision/recall on the features of a named extractor.

- :func:`score_images` — two image sets in, ``{"fid[effnet]": ..., ...}`` out (used by every benchmark).
- :func:`evaluate_run` — ``diffaccel eval RUN_DIR``: sample a trained run, save PNGs, time it, score it.
- :func:`training_evaluator` — ``--eval-every``: a callback scoring the EMA networks during training.

Reference features are cached on disk per (dataset content, extractor, input size) under
``$DIFFACCEL_CACHE`` or ``~/.cache/diffaccel``, so the real set is featurised once.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from pathlib import Path

import torch

from diffaccel.errors import UserError
from diffaccel.metrics.features import cached_extractor, extract_features
from diffaccel.metrics.fid import fid_from_features
from diffaccel.metrics.kid import kid_from_features
from diffaccel.metrics.precision_recall import precision_recall_from_features

DEFAULT_BATCH_SIZE = 250


def cache_dir(path: str | Path | None = None) -> Path:
    """Where reference features are cached: ``path``, else $DIFFACCEL_CACHE, else ~/.cache/diffaccel."""
    if path is not None:
        return Path(path)
    return Path(os.environ.get("DIFFACCEL_CACHE", Path.home() / ".cache" / "diffaccel"))


def _content_hash(images: torch.Tensor) -> str:
    h = hashlib.sha1()
    h.update(f"{tuple(images.shape)}|{images.dtype}".encode())
    h.update(images.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _check_images(images, what: str) -> torch.Tensor:
    if not isinstance(images, torch.Tensor):
        raise UserError(f"{what} images must be a torch tensor [N, C, H, W], got {type(images).__name__}")
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise UserError(f"{what} images must be [N, C, H, W] with C = 1 or 3, got shape {tuple(images.shape)}")
    if images.dtype != torch.uint8:
        if not images.is_floating_point():
            raise UserError(f"{what} images must be uint8 or float in [-1, 1], got {images.dtype}")
        if not torch.isfinite(images).all():
            raise UserError(f"{what} images contain NaN or infinite values")
        lo, hi = float(images.min()), float(images.max())
        if lo < -1.01 or hi > 1.01:
            raise UserError(f"{what} images must be in [-1, 1], got values in [{lo:.3g}, {hi:.3g}]")
    return images


def features_of(images: torch.Tensor, extractor: str = "effnet", device=None, batch_size: int = DEFAULT_BATCH_SIZE,
                cache: bool | str | Path = False, progress: bool = True, desc: str = "features",
                weights_path: str | Path | None = None) -> torch.Tensor:
    """Features of ``images`` (uint8 or float [-1, 1], ``[N, C, H, W]``); with ``cache`` (True or a folder),
    read from / written to the feature cache, keyed by the images' content and the extractor's spec."""
    images = _check_images(images, "input")
    device = str(torch.device(device) if device is not None else _default_device())
    net = cached_extractor(extractor, device, int(images.shape[-1]), None,
                           str(weights_path) if weights_path else None)
    path = None
    if cache:
        folder = cache_dir(None if cache is True else cache) / "features"
        path = folder / f"{net.spec()}-{_content_hash(images)}.pt"
        if path.is_file():
            try:
                return torch.load(path, weights_only=True)
            except Exception:  # a corrupt cache entry is recomputed, never trusted
                path.unlink(missing_ok=True)
    feats = extract_features(net, images, batch_size=batch_size, progress=progress, desc=desc)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save(feats, tmp)
        os.replace(tmp, path)  # atomic: concurrent scorers never read half a file
    return feats


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def scores_from_features(real: torch.Tensor, fake: torch.Tensor, extractor: str = "effnet",
                         kid_subsets: int = 20, kid_subset_size: int = 1000, pr_k: int = 3,
                         pr_max_samples: int | None = 10000) -> dict:
    """All metrics from two feature sets; keys name the extractor (``fid[effnet]``)."""
    fid = fid_from_features(real, fake)
    kid, kid_std = kid_from_features(real, fake, subsets=kid_subsets, subset_size=kid_subset_size)
    precision, recall = precision_recall_from_features(real, fake, k=pr_k, max_samples=pr_max_samples)
    tag = f"[{extractor}]"
    return {f"fid{tag}": fid, f"kid{tag}": kid, f"kid_std{tag}": kid_std,
            f"precision{tag}": precision, f"recall{tag}": recall}


def score_images(real: torch.Tensor, fake: torch.Tensor, extractor: str = "effnet", device=None,
                 batch_size: int = DEFAULT_BATCH_SIZE, *, cache: bool | str | Path = True, progress: bool = False,
                 weights_path: str | Path | None = None, **metric_options) -> dict:
    """FID, KID (mean and std over subsets) and improved precision/recall (k=3) of ``fake`` against ``real``.

    Images are ``[N, C, H, W]``, float in [-1, 1] or uint8; the two sets may differ in size. Returns
    ``{"fid[effnet]", "kid[effnet]", "kid_std[effnet]", "precision[effnet]", "recall[effnet]"}`` (the extractor's
    name in brackets). The real set's features are cached on disk (``cache``: True, False or a folder) so
    repeated scoring against the same data featurises only the fake set. ``metric_options`` go to
    :func:`scores_from_features` (kid_subsets, kid_subset_size, pr_k, pr_max_samples).
    """
    real = _check_images(real, "real")
    fake = _check_images(fake, "fake")
    if real.shape[-2:] != fake.shape[-2:]:
        raise UserError(f"real and fake images differ in size: {tuple(real.shape[1:])} vs {tuple(fake.shape[1:])}")
    if len(real) < 2 or len(fake) < 2:
        raise UserError(f"need at least 2 images in each set, got {len(real)} real and {len(fake)} fake")
    common = dict(extractor=extractor, device=device, batch_size=batch_size, progress=progress,
                  weights_path=weights_path)
    real_f = features_of(real, cache=cache, desc="real features", **common)
    fake_f = features_of(fake, cache=False, desc="fake features", **common)
    return scores_from_features(real_f, fake_f, extractor, **metric_options)
