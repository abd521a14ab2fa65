"""`diffaccel bench kl`: the KL paper's central comparison (Fig. 2 / Tables 1-2), side by side in one run.

Five models, same UNet, same data, same optimiser, same seed, DDIM(S=20, eta=1) sampling, FID[effnet] at
regular step intervals: Baseline-b16 (N=1000), Baseline-b128, KL-8d-b16 (1st), KL-8d-b16 (2nd) and
KL-8d4-b16 (partial). Reported per model: best FID, the first evaluated step at which each model reaches
Baseline-b16's best FID, seconds per optimisation step and peak training memory (measured separately in a
fresh process per model so that one model's allocations never count for another's).
"""

from __future__ import annotations

import functools
import json
import math
import multiprocessing as mp
import os
import platform
import resource
import shutil
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

# One entry per compared model: (label, method name, method kwargs, batch size).
MODELS = [
    ("KL-8d-b16 (1st)", "kl", {"M": 8, "N": 20}, 16),
    ("KL-8d4-b16 (partial)", "kl", {"M": 8, "N": 20, "partial": 4}, 16),
    ("Baseline-b128", "baseline", {"N": 1000}, 128),
    ("KL-8d-b16 (2nd)", "kl", {"M": 8, "N": 20, "variant": "2nd"}, 16),
    ("Baseline-b16", "baseline", {"N": 1000}, 16),
]
REFERENCE = "Baseline-b16"


@dataclass
class Settings:
    """Benchmark size. The defaults are the committed run (about 95 minutes on an idle 2-core CPU)."""

    data: str = "mnist5k"
    resolution: int = 16
    net: dict = field(default_factory=lambda: {"preset": "tiny", "overrides": {
        "block_out_channels": [8, 16], "norm_num_groups": 4}})
    steps: int = 8000
    eval_every: int = 1000
    n_samples: int = 2000
    sample_steps: int = 20
    eta: float = 1.0
    # x0 clipped to [-1, 1] inside every DDIM step, for every model alike (diffusers' DDIMScheduler default)
    clip_x0: bool = True
    lr: float = 1e-3
    ema_decay: float = 0.995
    seed: int = 0
    probe_steps: int = 8
    workers: int = 2
    sample_batch: int = 250

    @classmethod
    def quick(cls) -> "Settings":
        return cls(data="digits", resolution=8, net={"preset": "tiny", "overrides": {"block_out_channels": [8, 16],
                                                                       "norm_num_groups": 4}},
                   steps=2, eval_every=2, n_samples=8, sample_steps=2, probe_steps=2, workers=1, sample_batch=8)


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in label.lower()).strip("-").replace("--", "-")


def _method(name: str, kwargs: dict):
    from diffaccel.methods import build_method

    return build_method(name, kwargs)


@functools.lru_cache(maxsize=2)
def _load(data: str, resolution: int, limit: int | None):
    from diffaccel.data import load_dataset

    return load_dataset(data, resolution=resolution, limit=limit)


def _dataset(s: Settings, quick: bool):
    return _load(s.data, s.resolution, 256 if quick else None)


def _sample(method, net, n: int, shape, s: Settings) -> torch.Tensor:
    """n samples in chunks from one seeded generator, so every evaluation of every model sees the same x_T."""
    g = torch.Generator().manual_seed(s.seed + 12345)
    chunks = [method.sample(net, min(s.sample_batch, n - i), shape, generator=g, device="cpu", sampler="ddim",
                            steps=s.sample_steps, eta=s.eta, clip_x0=s.clip_x0,
                            progress=False) for i in range(0, n, s.sample_batch)]
    return torch.cat(chunks).clamp(-1, 1)


def _train_one(job: tuple) -> dict:
    """Worker: train one model with FID evaluations; returns its metrics records."""
    label, method_name, kwargs, batch, s, run_dir, quick = job
    torch.set_num_threads(1)
    from diffaccel.evaluate import score_images
    from diffaccel.runs import read_metrics
    from diffaccel.train import TrainConfig, train

    dataset = _dataset(s, quick)
    real = dataset.images
    method = _method(method_name, kwargs)

    def evaluate(step, method, ema_nets):
        t0 = time.perf_counter()
        fake = _sample(method, ema_nets[method.sampling_network], s.n_samples, dataset.shape, s)
        t_sample = time.perf_counter() - t0
        scores = score_images(real, fake, extractor="effnet", device="cpu")
        return {**scores, "sample_sec": t_sample}

    if Path(run_dir).exists():
        shutil.rmtree(run_dir)
    cfg = TrainConfig(data=s.data, resolution=s.resolution, net=s.net, batch_size=batch, lr=s.lr, steps=s.steps,
                      ema_decay=s.ema_decay, seed=s.seed, out=str(run_dir), log_every=min(25, s.steps),
                      checkpoint_every=s.steps, keep_checkpoints=1, sample_n=64,
                      sample_options={"sampler": "ddim", "steps": s.sample_steps, "eta": s.eta,
                                      "clip_x0": s.clip_x0},
                      eval_every=s.eval_every, device="cpu")
    t0 = time.perf_counter()
    train(cfg, method, callback=evaluate, dataset=dataset, progress=False, log=lambda *_: None)
    return {"label": label, "records": read_metrics(run_dir), "wall_sec": time.perf_counter() - t0}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _probe_one(job: tuple) -> dict:
    """Worker (fresh process per model): seconds per optimisation step and peak memory of training.

    CPU: peak resident set (getrusage high-water mark) minus the resident set before the first step;
    CUDA: torch.cuda.max_memory_allocated during the steps."""
    label, method_name, kwargs, batch, s, device, quick = job
    torch.set_num_threads(1)
    torch.manual_seed(s.seed)
    # cost does not depend on pixel values: a random batch of the data's shape spares loading the data set
    # (the bundled sets are grey-scale; any other set is loaded for its shape)
    shape = (1, s.resolution, s.resolution) if s.data in ("mnist5k", "digits") else _dataset(s, quick).shape
    method = _method(method_name, kwargs)
    net = method.build_networks(s.net, shape)["net"].to(device).train()
    opt = torch.optim.AdamW(net.parameters(), lr=s.lr)
    x0 = (torch.rand((batch, *shape), generator=torch.Generator().manual_seed(s.seed)) * 2 - 1).to(device)
    cuda = str(device).startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    else:
        before = _rss_bytes()
    times = []
    for _ in range(s.probe_steps):
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        loss = method.loss(net, x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    if cuda:
        peak = torch.cuda.max_memory_allocated(device) - before
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    warm = times[len(times) // 2:] or times
    return {"label": label, "sec_per_step": statistics.median(warm), "peak_mem_mb": max(peak, 0) / 2**20,
            "memory_kind": "cuda max_memory_allocated" if cuda else "CPU peak RSS increase"}


def _run_jobs(train_jobs: list, probe_jobs: list, workers: int) -> tuple[list, list]:
    """Training runs first, then the cost probes, on ``workers`` processes; every job gets a fresh process
    (``max_tasks_per_child=1``) so that a probe's peak memory is its own. One worker: all in this process."""
    if workers <= 1:
        return [_train_one(j) for j in train_jobs], [_probe_one(j) for j in probe_jobs]
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), max_tasks_per_child=1) as pool:
        trains = [pool.submit(_train_one, j) for j in train_jobs]
        probes = [pool.submit(_probe_one, j) for j in probe_jobs]
        return [f.result() for f in trains], [f.result() for f in probes]


def summarize(train_results: list[dict], probes: list[dict]) -> tuple[dict, list[dict]]:
    """Per-model curves, best FID, steps to reach the reference's best FID, cost per step."""
    key = "fid[effnet]"
    probe = {p["label"]: p for p in probes}
    models = {}
    for r in train_results:
        evals = [rec for rec in r["records"] if key in rec]
        curve = [(int(rec["step"]), float(rec[key])) for rec in evals]
        best_step, best = min(curve, key=lambda c: c[1]) if curve else (None, math.nan)
        models[r["label"]] = {"curve": curve, "best_fid": best, "best_step": best_step,
                              "final": evals[-1] if evals else {},
                              "train_sec_per_step_median": statistics.median(
                                  [rec["sec_per_step"] for rec in r["records"] if "sec_per_step" in rec] or [math.nan]),
                              "wall_sec": r["wall_sec"], **{k: v for k, v in probe.get(r["label"], {}).items()
                                                            if k != "label"}}
    ref = models[REFERENCE]
    target, ref_step = ref["best_fid"], ref["best_step"]
    ref_sec = ref.get("sec_per_step", math.nan)
    rows = []
    for label, m in models.items():
        reach = next((step for step, fid in m["curve"] if fid <= target), None)
        m["steps_to_reference_best"] = reach
        m["steps_ratio_vs_reference"] = reach / ref_step if reach and ref_step else None
        final = m["final"]
        rows.append({"model": label, "best FID[effnet]": round(m["best_fid"], 2),
                     "at step": m["best_step"],
                     f"first step with FID ≤ {REFERENCE} best ({target:.2f})": reach if reach else "not reached",
                     "steps ratio": round(m["steps_ratio_vs_reference"], 2) if m["steps_ratio_vs_reference"]
                     else "-",
                     "final precision": round(final.get("precision[effnet]", math.nan), 3),
                     "final recall": round(final.get("recall[effnet]", math.nan), 3),
                     "s/step": round(m.get("sec_per_step", math.nan), 3),
                     "s/step ÷ baseline-b16": round(m.get("sec_per_step", math.nan) / ref_sec, 2),
                     "peak train memory (MB)": round(m.get("peak_mem_mb", math.nan), 1)})
    return models, rows


def _plot(models: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    for label, m in models.items():
        if m["curve"]:
            steps, fids = zip(*m["curve"])
            ax.plot(steps, fids, marker="o", label=label, linestyle="--" if "Baseline" in label else "-")
    ax.axhline(models[REFERENCE]["best_fid"], color="grey", linewidth=0.8, linestyle=":")
    ax.set_xlabel("optimisation steps")
    ax.set_ylabel("FID [effnet] (lower is better)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _markdown(rows: list[dict]) -> str:
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _machine() -> dict:
    try:
        from diffaccel.bench.harness import machine_info

        return machine_info()
    except ImportError:
        return {"python": platform.python_version(), "torch": torch.__version__, "cpu_count": os.cpu_count(),
                "platform": platform.platform(), "load_average": os.getloadavg()}


def run(out_dir: Path, quick: bool = False, settings: Settings | None = None, runs_dir: Path | None = None,
        models: list[str] | None = None) -> dict:
    """Train the five models (in ``settings.workers`` processes), probe their cost, write the results.

    ``models`` restricts the comparison to some labels of MODELS (the reference is always included)."""
    s = settings or (Settings.quick() if quick else Settings())
    chosen = [m for m in MODELS if models is None or m[0] in models or m[0] == REFERENCE]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs_dir = Path(runs_dir) if runs_dir else out_dir / "runs"
    t0 = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    jobs = [(label, name, kw, b, s, runs_dir / _slug(label), quick) for label, name, kw, b in chosen]
    probe_jobs = [(label, name, kw, b, s, device, quick) for label, name, kw, b in chosen]
    train_results, probes = _run_jobs(jobs, probe_jobs, s.workers)
    return write_report(out_dir, runs_dir, s, train_results, probes, quick=quick, device=device,
                        wall_sec=time.perf_counter() - t0)


def write_report(out_dir: Path, runs_dir: Path, s: Settings, train_results: list[dict] | None = None,
                 probes: list[dict] | None = None, quick: bool = False, device: str = "cpu",
                 wall_sec: float | None = None, note: str = "") -> dict:
    """Write results.json / results.md / fid_vs_steps.png / sample grids from the training results, or, when
    ``train_results`` is None, from the runs' metrics.jsonl as they stand (an interrupted benchmark)."""
    from diffaccel.runs import read_metrics

    out_dir, runs_dir = Path(out_dir), Path(runs_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if train_results is None:
        train_results = [{"label": label, "records": read_metrics(runs_dir / _slug(label)), "wall_sec": None}
                         for label, *_ in MODELS if (runs_dir / _slug(label) / "metrics.jsonl").exists()]
    models, rows = summarize(train_results, probes or [])
    for label in models:
        grid = runs_dir / _slug(label) / "samples.png"
        if grid.exists():
            shutil.copy(grid, out_dir / f"samples_{_slug(label)}.png")
    size = (f"{s.data} at {s.resolution}×{s.resolution}, UNet {s.net}, {s.steps} steps, lr {s.lr}, "
            f"EMA {s.ema_decay}, FID[effnet] on {s.n_samples} DDIM(S={s.sample_steps}, η={s.eta}"
            f"{', x0 clipped' if s.clip_x0 else ''}) samples "
            f"every {s.eval_every} steps")
    results = {"benchmark": "kl", "quick": quick, "settings": s.__dict__, "size": size, "reference": REFERENCE,
               "models": models, "table": rows, "machine": {**_machine(), "load_average": os.getloadavg()},
               "device": device, "wall_sec": wall_sec, "note": note}
    (out_dir / "results.json").write_text(json.dumps(results, indent=1, default=str))
    (out_dir / "results.md").write_text(f"# KL diffusion vs baseline\n\n{size}.{(' ' + note) if note else ''}\n\n"
                                        + _markdown(rows))
    _plot(models, out_dir / "fid_vs_steps.png", f"KL vs baseline: {s.data} {s.resolution}², {s.n_samples} samples")
    return results


if __name__ == "__main__":  # python -m diffaccel.bench.kl OUT_DIR [--quick]
    import sys

    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    run(Path(args[0] if args else "benchmarks/results/kl"), quick="--quick" in sys.argv)
