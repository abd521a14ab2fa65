"""fid-sanity: do FID[effnet] and FID[digits] behave as distances on MNIST-32?

Scores, with both extractors side by side and one seed: real-vs-real (two disjoint halves of mnist5k: the
floor), real-vs-blurred (the second half under Gaussian blur of increasing sigma) and real-vs-noise (uniform
noise), plus the digits classifier's legible rate and class coverage of each set. Expected: the halves score
lowest, FID grows monotonically with blur, noise scores worst. Also times FID[effnet] for 10,000
MNIST-32 images (the 5,000 digits and their mirror images) on this machine, with the reference features cold
(computed) and warm (cached).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from diffaccel.bench.harness import write_results
from diffaccel.data import load_dataset
from diffaccel.evaluate import features_of, score_images
from diffaccel.metrics.fid import fid_from_features
from diffaccel.metrics.kid import kid_from_features
from diffaccel.metrics.precision_recall import precision_recall_from_features

BLUR_SIGMAS = (0.5, 1.0, 2.0)
EXTRACTORS = ("effnet", "digits")


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of float images [N, C, H, W] (reflect padding, kernel radius 3 sigma)."""
    radius = max(1, int(round(3 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    k = k / k.sum()
    c = images.shape[1]
    out = F.pad(images, (radius, radius, radius, radius), mode="reflect")
    out = F.conv2d(out, k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(out, k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


def _time_fid_10k(images: torch.Tensor, reference: torch.Tensor, cache: Path) -> dict:
    """Wall time of FID[effnet] for 10,000 images against the mnist5k reference: cold, then warm cache."""
    fake = torch.cat([images, images.flip(-1)])[:10000]
    shutil.rmtree(cache, ignore_errors=True)  # cold means cold
    features_of(fake[:8], progress=False)  # build the extractor (weights load) outside the timed region
    # Wall time depends on what else runs on the machine; process CPU time (all threads) does much less, and
    # CPU time / threads is what the same work takes on an otherwise idle machine with that many cores.
    t0, c0 = time.perf_counter(), time.process_time()
    ref = features_of(reference, cache=cache, progress=False, name="mnist5k")
    fake_f = features_of(fake, progress=False)
    fid_cold = fid_from_features(ref, fake_f)
    cold, cold_cpu = time.perf_counter() - t0, time.process_time() - c0
    load_before_warm = os.getloadavg()[0]
    t0, c0 = time.perf_counter(), time.process_time()
    ref = features_of(reference, cache=cache, progress=False, name="mnist5k")
    fake_f = features_of(fake, progress=False)
    fid_warm = fid_from_features(ref, fake_f)
    warm, warm_cpu = time.perf_counter() - t0, time.process_time() - c0
    t0 = time.perf_counter()
    kid_from_features(ref, fake_f)
    precision_recall_from_features(ref, fake_f)
    kid_pr = time.perf_counter() - t0
    return {"n_fake": len(fake), "n_reference": len(reference), "seconds_cold_cache": cold,
            "seconds_warm_cache": warm, "cpu_seconds_cold_cache": cold_cpu,
            "cpu_seconds_warm_cache": warm_cpu, "load_average_1min_before_warm": load_before_warm, "seconds_kid_and_precision_recall_extra": kid_pr, "fid": fid_warm, "fid_cold_equals_warm": abs(fid_cold - fid_warm) < 1e-6,
            "images_per_second_warm": len(fake) / warm, "torch_threads": torch.get_num_threads(),
            "load_average_1min_after": os.getloadavg()[0]}


def run(out_dir: Path, quick: bool = False, timing: bool = True) -> dict:
    """``timing=False`` skips the 10k-image FID timing (run it on an otherwise idle machine only)."""
    started = time.time()
    threads = torch.get_num_threads()
    torch.set_num_threads(min(2, os.cpu_count() or 1))  # the 2-core figure the docs state
    try:
        data = load_dataset("mnist5k")
        g = torch.Generator().manual_seed(0)
        images = data.images[torch.randperm(len(data), generator=g)]
        if quick:
            images = images[:400]
        half = len(images) // 2
        real, other = images[:half], images[half:2 * half]
        other_f = other.float() / 127.5 - 1
        cache = out_dir / ".cache" if quick else None  # quick runs leave the user's cache alone
        common = dict(cache=cache if cache is not None else True, progress=not quick)

        cases = [("real vs real (other half)", None, other_f)]
        cases += [(f"real vs blurred (sigma {s})", s, gaussian_blur(other_f, s).clamp(-1, 1)) for s in BLUR_SIGMAS]
        noise = torch.rand(half, *images.shape[1:], generator=g) * 2 - 1
        cases.append(("real vs uniform noise", None, noise))
        rows = []
        for label, sigma, fake in cases:
            row = {"comparison": label, "blur_sigma": sigma, "n_real": half, "n_fake": len(fake)}
            for extractor in EXTRACTORS:
                t0 = time.perf_counter()
                s = score_images(real, fake, extractor=extractor, real_name="mnist5k-half", **common)
                row.update({f"FID[{extractor}]": s[f"fid[{extractor}]"], f"KID[{extractor}]": s[f"kid[{extractor}]"],
                            f"precision[{extractor}]": s[f"precision[{extractor}]"],
                            f"recall[{extractor}]": s[f"recall[{extractor}]"],
                            f"seconds[{extractor}]": time.perf_counter() - t0})
                if extractor == "digits":
                    row.update({"legible rate": s["legible_rate"], "class coverage": s["class_coverage"]})
            rows.append(row)
        checks = {}
        for extractor in EXTRACTORS:
            fids = [r[f"FID[{extractor}]"] for r in rows]
            blur_fids = fids[1:1 + len(BLUR_SIGMAS)]
            checks[extractor] = {"monotone_in_blur": all(a < b for a, b in zip([fids[0]] + blur_fids, blur_fids)),
                                 "noise_is_worst": fids[-1] == max(fids), "real_halves_lowest": fids[0] == min(fids),
                                 "floor (real vs real)": fids[0],
                                 "noise / floor": fids[-1] / fids[0] if fids[0] > 0 else None}
        timing = None if quick or not timing else _time_fid_10k(data.images, data.images, Path(os.environ.get(
            "DIFFACCEL_CACHE", Path.home() / ".cache" / "diffaccel")) / "fid-sanity-timing")
        results = {"dataset": "mnist5k (MNIST-32)",
                   "extractors": {"effnet": "EfficientNet-lite0, ImageNet, input 64",
                                  "digits": "the digits classifier trained on mnist5k (diffaccel.metrics.digits)"},
                   "rows": rows, "checks": checks, "fid_10k_timing": timing}

        def plot(fig):
            labels = [r["comparison"].replace("real vs ", "").replace(" (", "\n(") for r in rows]
            colors = ["tab:green"] + ["tab:blue"] * len(BLUR_SIGMAS) + ["tab:red"]
            for i, extractor in enumerate(EXTRACTORS):
                ax = fig.add_subplot(1, len(EXTRACTORS), i + 1)
                ax.bar(labels, [r[f"FID[{extractor}]"] for r in rows], color=colors)
                ax.set_yscale("log")
                ax.set_ylabel(f"FID[{extractor}] vs real half (log)")
                ax.set_title(f"{extractor}, {half} vs {half} images", fontsize=9)
                ax.tick_params(axis="x", labelsize=7)

        notes = "Checks: " + "; ".join(f"{e}: " + ", ".join(f"{k} = {v:.4g}" if isinstance(v, float) else f"{k} = {v}"
                                                              for k, v in c.items()) for e, c in checks.items())
        notes += ("\n\nThe real-vs-real row is each metric's floor at these sizes; legible rate and class coverage "
                  "are the digits classifier's judgement of the compared set (real digits score its ceiling).")
        if timing:
            notes += (f"\n\nFID[effnet] of {timing['n_fake']} MNIST-32 images against the {timing['n_reference']}"
                      f"-image reference, {timing['torch_threads']} threads: wall time "
                      f"{timing['seconds_cold_cache']:.0f} s with the reference featurised, "
                      f"{timing['seconds_warm_cache']:.0f} s with it cached, on a shared machine (1-min load "
                      f"average {timing['load_average_1min_before_warm']:.1f} before, "
                      f"{timing['load_average_1min_after']:.1f} after, on 2 cores); process CPU time "
                      f"{timing['cpu_seconds_cold_cache']:.0f} s / {timing['cpu_seconds_warm_cache']:.0f} s "
                      f"(all threads), i.e. about {timing['cpu_seconds_warm_cache'] / timing['torch_threads']:.0f} s "
                      f"of wall time on an idle machine with {timing['torch_threads']} cores (cache warm).")
        write_results(out_dir, "fid-sanity", results, rows, plot, notes=notes, started=started, figsize=(11, 4.5))
        return results
    finally:
        torch.set_num_threads(threads)
