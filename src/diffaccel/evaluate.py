"""Scoring samples against real data: FID, KID, precision/recall on the features of a named extractor.

- :func:`score_images` — two image sets in, ``{"fid[effnet]": ..., ...}`` out (used by every benchmark).
- :func:`evaluate_run` — ``diffaccel eval RUN_DIR``: sample a trained run, save PNGs, time it, score it.
- :func:`training_evaluator` — ``--eval-every``: a callback scoring the EMA networks during training.

Reference features are cached on disk per (dataset content, extractor, input size) under
``$DIFFACCEL_CACHE`` or ``~/.cache/diffaccel``, so the real set is featurised once.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from diffaccel.errors import UserError
from diffaccel.metrics.features import cached_extractor, extract_features
from diffaccel.data import cache_dir  # noqa: F401  (part of this module's API)
from diffaccel.metrics.fid import fid_from_features
from diffaccel.metrics.kid import kid_from_features
from diffaccel.metrics.precision_recall import precision_recall_from_features

DEFAULT_BATCH_SIZE = 250


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
                weights_path: str | Path | None = None, name: str = "") -> torch.Tensor:
    """Features of ``images`` (uint8 or float [-1, 1], ``[N, C, H, W]``); with ``cache`` (True or a folder),
    read from / written to the feature cache, keyed by the images' content and the extractor's spec."""
    images = _check_images(images, "input")
    device = str(torch.device(device) if device is not None else _default_device())
    net = cached_extractor(extractor, device, int(images.shape[-1]), None,
                           str(weights_path) if weights_path else None)
    path = None
    if cache:
        folder = cache_dir(None if cache is True else cache) / "features"
        prefix = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:80]
        path = folder / f"{prefix + '-' if prefix else ''}{net.spec()}-{_content_hash(images)}.pt"
        if path.is_file():
            try:
                feats = torch.load(path, weights_only=True)
                if isinstance(feats, torch.Tensor) and feats.shape == (len(images), net.num_features):
                    return feats
            except Exception:
                pass
            path.unlink(missing_ok=True)  # a corrupt cache entry is recomputed, never trusted
    feats = extract_features(net, images, batch_size=batch_size, progress=progress, desc=desc)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        try:
            torch.save(feats, tmp)
            os.replace(tmp, path)  # atomic: concurrent scorers never read half a file
        except (OSError, RuntimeError):  # an unwritable cache only costs the featurisation next time
            tmp.unlink(missing_ok=True)
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
                 weights_path: str | Path | None = None, real_name: str = "", **metric_options) -> dict:
    """FID, KID (mean and std over subsets) and improved precision/recall (k=3) of ``fake`` against ``real``.

    Images are ``[N, C, H, W]``, float in [-1, 1] or uint8; the two sets may differ in size. Returns
    ``{"fid[effnet]", "kid[effnet]", "kid_std[effnet]", "precision[effnet]", "recall[effnet]"}`` (the extractor's
    name in brackets); with ``extractor="digits"`` also ``legible_rate`` and ``class_coverage`` of ``fake``. The real set's features are cached on disk (``cache``: True, False or a folder) so
    repeated scoring against the same data featurises only the fake set. ``metric_options`` go to
    :func:`scores_from_features` (kid_subsets, kid_subset_size, pr_k, pr_max_samples).
    """
    real = _check_images(real, "real")
    fake = _check_images(fake, "fake")
    if real.shape[-2:] != fake.shape[-2:]:
        raise UserError(f"real and fake images differ in size: {tuple(real.shape[1:])} vs {tuple(fake.shape[1:])}")
    need = metric_options.get("pr_k", 3) + 1  # the k-NN radii of precision/recall need k + 1 samples
    if len(real) < need or len(fake) < need:
        raise UserError(f"need at least {need} images in each set, got {len(real)} real and {len(fake)} fake")
    common = dict(extractor=extractor, device=device, batch_size=batch_size, progress=progress,
                  weights_path=weights_path)
    real_f = features_of(real, cache=cache, desc="real features", name=real_name, **common)
    fake_f = features_of(fake, cache=False, desc="fake features", **common)
    scores = scores_from_features(real_f, fake_f, extractor, **metric_options)
    if extractor == "digits":  # the classifier's own judgement of the samples, from the same features
        from diffaccel.metrics.digits import classifier_scores_from_features, load_digits_classifier

        scores.update(classifier_scores_from_features(fake_f, load_digits_classifier(weights_path)))
    return scores


# --------------------------------------------------------------------------------------------------------------
# sampling a trained run


def _resolved_sampler_options(method, options: dict) -> dict:
    """The options actually used: ``method.sample``'s keyword defaults, overridden by the given ones."""
    skip = {"generator", "device", "progress", "net", "n", "image_shape", "self"}
    resolved = {}
    for name, p in inspect.signature(method.sample).parameters.items():
        if name not in skip and p.default is not inspect.Parameter.empty and p.kind in (
                inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD):
            resolved[name] = p.default
    resolved.update(options)
    return resolved


def _sampler_options(method, sampler_args=None, sampler_options: dict | None = None) -> dict:
    opts = dict(method.sampler_options(sampler_args)) if sampler_args is not None else {}
    opts.update(sampler_options or {})
    return {k: v for k, v in opts.items() if v is not None}  # None = "method default"


def generate(method, net, n: int, image_shape, *, batch_size: int = 100, seed: int = 0, device=None,
             progress: bool = True, **sampler_options) -> tuple[torch.Tensor, list[float]]:
    """``n`` samples as uint8 ``[n, C, H, W]`` (as they are saved as PNG) and the wall time of each batch."""
    from diffaccel.data import to_uint8
    from diffaccel.metrics.timing import synchronize

    if n < 1 or batch_size < 1:
        raise UserError(f"--n and --batch-size must be >= 1, got {n} and {batch_size}")
    device = torch.device(device) if device is not None else next(net.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    out, seconds = [], []
    with torch.inference_mode():
        bar = tqdm(total=n, desc="sampling", unit="img", disable=not progress, leave=False)
        for start in range(0, n, batch_size):
            size = min(batch_size, n - start)
            t0 = time.perf_counter()
            x = method.sample(net, size, tuple(image_shape), generator=generator, device=device, progress=False,
                              **sampler_options)
            synchronize(device)
            seconds.append(time.perf_counter() - t0)
            out.append(to_uint8(x.detach().float().cpu()))
            bar.update(size)
        bar.close()
    return torch.cat(out), seconds


def save_pngs(images: torch.Tensor, folder: str | Path, progress: bool = True) -> Path:
    """Save uint8 ``[N, C, H, W]`` images as lossless PNGs ``000000.png``, ``000001.png``, ..."""
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(tqdm(images, desc="saving PNGs", disable=not progress, leave=False)):
        arr = im.permute(1, 2, 0).numpy()
        Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(folder / f"{i:06d}.png", format="PNG")
    return folder


def reference_dataset(config: dict):
    """The images a run was trained on (same spec, resolution, channels and limit), as the FID reference."""
    from diffaccel.data import load_dataset

    train = config["train"]
    return load_dataset(train["data"], train.get("resolution"), train.get("channels"), False,
                        train.get("data_limit"))


def _reference_name(dataset) -> str:
    from diffaccel.data import dataset_key

    name = getattr(dataset, "name", "") or "data"
    try:
        return dataset_key(name, None, None) if "/" not in name else Path(name).name
    except Exception:
        return name


def evaluate_run(run_dir: str | Path, n: int = 10000, sampler_args=None, extractor: str = "effnet", device=None,
                 batch_size: int = 100, seed: int = 0, out: str | Path | None = None,
                 checkpoint: str | Path | None = None, inception_weights: str | Path | None = None, *,
                 sampler_options: dict | None = None, save_images: bool = True, timing_trials: int = 3,
                 progress: bool = True, cache: bool | str | Path = True) -> dict:
    """``diffaccel eval``: sample ``n`` images from a run's EMA network, save them as PNG, score them against
    the run's training data, time batches of 100, and write ``eval.json`` (default ``RUN_DIR/eval.json``).

    Sampler settings come from ``sampler_args`` (the parsed command line, through ``method.sampler_options``)
    and/or the ``sampler_options`` dict; unset ones take the method's defaults, and eval.json records the
    resolved values. Timing: if ``batch_size == 100`` the generation batches after the first are the trials,
    otherwise ``timing_trials`` extra batches of 100 are timed after one warm-up batch.
    """
    from diffaccel.bench.harness import machine_info
    from diffaccel.metrics.timing import summarize, time_batches
    from diffaccel.runs import load_run, read_config, write_atomic

    from diffaccel.validation import check_extractor, check_output_file, check_output_folder

    if n < 4:
        raise UserError(f"--n must be >= 4 to compute precision/recall (k = 3), got {n}")
    if batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {batch_size}")
    run_dir = Path(run_dir)
    config = read_config(run_dir)
    image_shape = tuple(config["image_shape"])
    # every input and output is checked before the first image is sampled: a refusal leaves nothing behind
    weights = inception_weights if extractor == "inception" else None
    check_extractor(extractor, image_shape, weights)
    out = Path(out) if out is not None else run_dir / "eval.json"
    check_output_file(out, "--out")
    if save_images:
        check_output_folder(out.parent / f"{out.stem}_samples", "the samples folder")
    device = _default_device() if device is None or (isinstance(device, str) and device == "auto") \
        else torch.device(device)
    method, nets = load_run(run_dir, device, checkpoint=checkpoint)
    net = nets[method.sampling_network].eval()
    options = _sampler_options(method, sampler_args, sampler_options)
    reference = reference_dataset(config)

    t0 = time.perf_counter()
    images, seconds = generate(method, net, n, image_shape, batch_size=batch_size, seed=seed, device=device,
                               progress=progress, **options)
    sampling_total = time.perf_counter() - t0
    if batch_size == 100 and len(seconds) >= 3 and n % 100 == 0:
        timing = summarize(seconds[1:], 100, warmup=1)
    else:
        gen = torch.Generator(device=device).manual_seed(seed + 1)
        timing = time_batches(lambda b: method.sample(net, b, image_shape, generator=gen, device=device,
                                                      progress=False, **options),
                              batch_size=100, trials=timing_trials, warmup=1, device=device)
    samples_dir = None
    if save_images:
        samples_dir = save_pngs(images, out.parent / f"{out.stem}_samples", progress=progress)

    t1 = time.perf_counter()
    scores = score_images(reference.images, images, extractor=extractor, device=device, cache=cache,
                          progress=progress, weights_path=inception_weights if extractor == "inception" else None,
                          real_name=_reference_name(reference))
    scoring_s = time.perf_counter() - t1
    spec = cached_extractor(extractor, str(device), int(image_shape[-1]), None,
                            str(inception_weights) if extractor == "inception" and inception_weights else None).spec()
    result = {
        "run_dir": str(run_dir), "method": method.name, "checkpoint": str(checkpoint) if checkpoint else "latest",
        "n": n, "seed": seed, "sampler_options": _resolved_sampler_options(method, options),
        "nfe": method.nfe(**options), "extractor": extractor, "extractor_spec": spec,
        "reference": {"data": config["train"]["data"], "n": len(reference), "image_shape": list(image_shape)},
        **scores,
        "seconds_per_image": sampling_total / n, "sampling_seconds": sampling_total,
        "timing_batch_100": timing, "scoring_seconds": scoring_s, "device": str(device),
        "samples_dir": str(samples_dir) if samples_dir else None, "machine": machine_info(),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, json.dumps(result, indent=1, default=str))
    result["eval_json"] = str(out)
    return result


def training_evaluator(dataset, n: int = 1000, extractor: str = "effnet", sampler_options: dict | None = None,
                       *, batch_size: int = 250, seed: int = 0, progress: bool = False):
    """A ``--eval-every`` callback: ``fn(step, method, ema_nets) -> dict`` that samples ``n`` images from the
    EMA sampling network (fixed seed, so points along training are comparable) and scores them against
    ``dataset`` (an ``ImageDataset`` or an image tensor). The reference features are computed at the first
    call and cached. The returned dict (``fid[effnet]``, ``kid[effnet]``, ..., ``nfe``, ``eval_seconds``) is
    logged to metrics.jsonl by the trainer."""
    if n < 4:
        raise UserError(f"--eval-n must be >= 4, got {n}")
    images = dataset.images if hasattr(dataset, "images") else dataset
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise UserError("the evaluation reference must be an image dataset [N, C, H, W]")
    name = _reference_name(dataset) if hasattr(dataset, "name") else ""
    options = {k: v for k, v in (sampler_options or {}).items() if v is not None}

    def evaluate(step: int, method, ema_nets: dict) -> dict:
        t0 = time.perf_counter()
        net = ema_nets[method.sampling_network]
        device = next(net.parameters()).device
        fake, _ = generate(method, net, n, tuple(images.shape[1:]), batch_size=batch_size, seed=seed,
                           device=device, progress=progress, **options)
        scores = score_images(images, fake, extractor=extractor, device=device, progress=progress,
                              real_name=name)
        return {**scores, "nfe": method.nfe(**options), "eval_n": n, "eval_seconds": time.perf_counter() - t0}

    return evaluate
