"""fid-sanity: does FID[effnet] behave as a distance on MNIST-32?

Scores, with one extractor and one seed: real-vs-real (two disjoint halves of mnist5k), real-vs-blurred
(the second half under Gaussian blur of increasing sigma) and real-vs-noise (uniform noise). Expected: the
halves score near 0, FID grows monotonically with blur, noise scores worst. Also times FID[effnet] for 10,000
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


def run(out_dir: Path, quick: bool = False) -> dict:
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
            t0 = time.perf_counter()
            s = score_images(real, fake, real_name="mnist5k-half", **common)
            rows.append({"comparison": label, "blur_sigma": sigma, "n_real": half, "n_fake": len(fake),
                         "FID[effnet]": s["fid[effnet]"], "KID[effnet]": s["kid[effnet]"],
                         "precision[effnet]": s["precision[effnet]"], "recall[effnet]": s["recall[effnet]"],
                         "seconds": time.perf_counter() - t0})
        fids = [r["FID[effnet]"] for r in rows]
        blur_fids = fids[1:1 + len(BLUR_SIGMAS)]
        checks = {"monotone_in_blur": all(a < b for a, b in zip([fids[0]] + blur_fids, blur_fids)),
                  "noise_is_worst": fids[-1] == max(fids),
                  "real_halves_lowest": fids[0] == min(fids)}
        timing = None if quick else _time_fid_10k(data.images, data.images, Path(os.environ.get(
            "DIFFACCEL_CACHE", Path.home() / ".cache" / "diffaccel")) / "fid-sanity-timing")
        results = {"dataset": "mnist5k (MNIST-32)", "extractor": "effnet (EfficientNet-lite0, ImageNet, input 64)",
                   "rows": rows, "checks": checks, "fid_10k_timing": timing}

        def plot(fig):
            ax = fig.add_subplot(111)
            ax.bar([r["comparison"].replace("real vs ", "").replace(" (", "\n(") for r in rows], fids,
                   color=["tab:green"] + ["tab:blue"] * len(BLUR_SIGMAS) + ["tab:red"])
            ax.set_yscale("log")
            ax.set_ylabel("FID[effnet] vs real half (log)")
            ax.set_title(f"FID sanity on MNIST-32 ({half} vs {half} images)")
            ax.tick_params(axis="x", labelsize=8)

        notes = "Checks: " + ", ".join(f"{k} = {v}" for k, v in checks.items())
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
        write_results(out_dir, "fid-sanity", results, rows, plot, notes=notes, started=started)
        return results
    finally:
        torch.set_num_threads(threads)
