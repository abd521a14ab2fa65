"""`diffaccel bench pds`: PDS vs vanilla PC sampling of one VE score model at full and reduced iterations.

One VE score model (score-ve: σ_min = 0.01, σ_max = max pairwise distance of the training images) is trained on
MNIST (mnist5k resized to 16×16 to fit a shared 2-core CPU), then sampled with the predictor–corrector sampler
(reverse-diffusion predictor + Langevin corrector, snr 0.16) at N = full, N/4, N/10, N/20 iterations, each with
and without PDS (frequency filter from 200 training images, α = 5, no space filter: the paper's setting for
NCSN++ on datasets without a fixed layout). Same starting noise seed for every configuration.
Reported: FID[effnet] against real images, seconds per image, NFE, and the PDS overhead per iteration
(preconditioner time / network time on the same batch).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch


@dataclass
class Settings:
    """Benchmark size. The defaults are the committed run (about an hour on a shared 2-core CPU)."""

    data: str = "mnist5k"
    resolution: int = 16
    net: dict = field(default_factory=lambda: {"preset": "tiny", "overrides": {
        "block_out_channels": [16, 32], "norm_num_groups": 8}})
    train_steps: int = 2000
    batch_size: int = 64
    lr: float = 1e-3
    ema_decay: float = 0.995
    num_scales: int = 100
    fractions: tuple = (1, 4, 10, 20)
    snr: float = 0.16
    pds_alpha: float = 5.0
    pds_images: int = 200
    n_samples: int = 256
    n_real: int = 2000
    sample_batch: int = 256
    timing_repeats: int = 5
    seed: int = 0
    run_dir: str = "runs/bench-pds"

    @classmethod
    def quick(cls) -> "Settings":
        return cls(data="digits", resolution=8, net={"preset": "tiny", "overrides": {
            "block_out_channels": [16, 32], "norm_num_groups": 8}}, train_steps=2, batch_size=8, num_scales=8,
            fractions=(1, 4), n_samples=8, n_real=32, sample_batch=8, timing_repeats=1, pds_images=32, run_dir="")


def _train(s: Settings):
    """Train the score model, or reuse the latest valid checkpoint of an existing run directory (so that the
    benchmark can be re-run, or sampled from a run stopped early, without training again).
    Returns (method, net, run_dir, train_seconds or None, trained_steps)."""
    import tempfile

    from diffaccel.checkpoint import latest_valid
    from diffaccel.data import load_dataset
    from diffaccel.methods.score_ve import ScoreVE, sigma_max_from_data
    from diffaccel.runs import load_run
    from diffaccel.train import TrainConfig, train

    run_dir = Path(s.run_dir) if s.run_dir else Path(tempfile.mkdtemp(prefix="diffaccel-pds-")) / "run"
    if (run_dir / "config.yaml").is_file():
        ckpt = latest_valid(run_dir / "checkpoints", log=lambda *_: None)
        if ckpt is not None:
            method, nets = load_run(run_dir, "cpu", checkpoint=ckpt)
            return method, nets["net"], run_dir, None, int(ckpt.name.split("_")[-1])
    cfg = TrainConfig(data=s.data, resolution=s.resolution, net=s.net, batch_size=s.batch_size, lr=s.lr,
                      steps=s.train_steps, ema_decay=s.ema_decay, seed=s.seed, out=str(run_dir),
                      log_every=max(1, s.train_steps // 20), checkpoint_every=max(1, s.train_steps // 4),
                      device="cpu")
    dataset = load_dataset(s.data, s.resolution)
    method = ScoreVE(sigma_max=sigma_max_from_data(dataset.images), num_scales=s.num_scales, data=s.data,
                     resolution=s.resolution)
    started = time.time()
    train(cfg, method, dataset=dataset, progress=False)
    seconds = time.time() - started
    method, nets = load_run(run_dir, "cpu")
    return method, nets["net"], run_dir, seconds, s.train_steps


@dataclass
class _Setup:
    """What both PDS benchmarks start from: the trained model and a fixed random order of the data set."""

    settings: Settings
    out_dir: Path
    method: object
    net: torch.nn.Module
    run_dir: Path
    dataset: object
    order: torch.Tensor  # bundled sets such as mnist5k are sorted by class, so a prefix is not representative
    train_seconds: float | None
    trained_steps: int

    def images(self, start: int, stop: int) -> torch.Tensor:
        """Images ``order[start:stop]`` in [-1, 1]: the reference set, the filter's images, the held-out set."""
        return self.dataset.to_model_space(self.dataset.images[self.order[start:stop]])


def _setup(out_dir: Path, quick: bool, overrides: dict) -> _Setup:
    from diffaccel.data import load_dataset

    torch.set_num_threads(1)
    s = Settings.quick() if quick else Settings()
    s = Settings(**{**asdict(s), **overrides})
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    method, net, run_dir, train_seconds, trained_steps = _train(s)
    dataset = load_dataset(s.data, s.resolution)
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(s.seed))
    return _Setup(s, out_dir, method, net.eval(), run_dir, dataset, order, train_seconds, trained_steps)


def _pc_samples(setup: _Setup, steps: int, preconditioner) -> tuple[torch.Tensor, float]:
    """``n_samples`` PC samples from the same noise seed for every configuration; returns (samples, seconds)."""
    s = setup.settings
    g = torch.Generator().manual_seed(s.seed + 1)
    chunks, seconds = [], 0.0
    for start in range(0, s.n_samples, s.sample_batch):
        t0 = time.perf_counter()
        chunks.append(setup.method.sample(setup.net, min(s.sample_batch, s.n_samples - start),
                                          setup.dataset.shape, generator=g, device="cpu", sampler="pc",
                                          steps=steps, snr=s.snr, preconditioner=preconditioner, progress=False))
        seconds += time.perf_counter() - t0
    return torch.cat(chunks), seconds


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    best = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best.append(time.perf_counter() - t0)
    return sorted(best)[len(best) // 2]  # median


def run(out_dir: Path, quick: bool = False, **overrides) -> dict:
    """Run the benchmark; ``overrides`` replace fields of :class:`Settings` (e.g. ``n_samples=512``)."""
    from diffaccel.bench.harness import write_results
    from diffaccel.data import save_grid
    from diffaccel.evaluate import score_images
    from diffaccel.methods.pds import build_preconditioner

    started = time.time()
    setup = _setup(out_dir, quick, overrides)
    s, out_dir, method, net = setup.settings, setup.out_dir, setup.method, setup.net
    image_shape = setup.dataset.shape
    real = setup.images(0, s.n_real)
    pre = build_preconditioner(setup.images(0, s.pds_images), alpha=s.pds_alpha)

    # --- PDS overhead per iteration: one PC iteration = 2 network calls + 2 (M·Mᵀ) + 2 (M) applications
    x = torch.randn(s.sample_batch, *image_shape)
    sigma = torch.full((s.sample_batch,), 1.0)
    with torch.no_grad():
        t_net = _time(lambda: method.score(net, x, sigma), s.timing_repeats)
    t_pre = _time(lambda: (pre.apply_gram(x), pre.apply(x)), s.timing_repeats)
    overhead = {"network_seconds_per_call": t_net, "pds_seconds_per_call": t_pre,
                "pds_overhead_fraction": t_pre / t_net, "batch": s.sample_batch}

    rows, configs = [], []
    for frac in s.fractions:
        steps = max(1, s.num_scales // frac)
        for use_pds in (False, True):
            fake, seconds = _pc_samples(setup, steps, pre if use_pds else None)
            tag = f"N{steps}_{'pds' if use_pds else 'vanilla'}"
            save_grid(fake[:64], out_dir / f"samples_{tag}.png", nrow=8)
            scores = score_images(real, fake, "effnet", device="cpu", cache=True, progress=False)
            row = {"iterations": steps, "fraction": f"N/{frac}" if frac > 1 else "N", "pds": use_pds,
                   "nfe": method.nfe(sampler="pc", steps=steps), "fid[effnet]": scores["fid[effnet]"],
                   "kid[effnet]": scores["kid[effnet]"], "precision[effnet]": scores["precision[effnet]"],
                   "recall[effnet]": scores["recall[effnet]"], "seconds_per_image": seconds / s.n_samples}
            rows.append(row)
            configs.append({**row, **scores})
            print(json.dumps(row), flush=True)

    # scale of the metric: held-out real images scored like the samples (the best a model could reach here)
    held_out = setup.images(s.n_real, s.n_real + s.n_samples)
    floor = score_images(real, held_out, "effnet", device="cpu", cache=True, progress=False)["fid[effnet]"] \
        if len(held_out) >= 2 else None

    by = {(r["iterations"], r["pds"]): r for r in rows}
    ratios = {f"N={k[0]}": by[(k[0], False)]["fid[effnet]"] / by[(k[0], True)]["fid[effnet]"]
              for k in by if k[1] is False}
    results = {"settings": asdict(s), "sigma_min": method.sigma_min, "sigma_max": method.sigma_max,
               "sigma_max_rule": "max pairwise Euclidean distance of the training images in [0, 1]",
               "train_seconds": setup.train_seconds, "trained_steps": setup.trained_steps,
               "run_dir": str(setup.run_dir), "overhead": overhead,
               "fid_ratio_vanilla_over_pds": ratios, "fid_real_held_out": floor, "configs": configs, "quick": quick}

    def plot(fig):
        ax1, ax2 = fig.subplots(1, 2)
        for use_pds, style in ((False, "o-"), (True, "s-")):
            pts = sorted((r["iterations"], r["fid[effnet]"], r["seconds_per_image"]) for r in rows
                         if r["pds"] == use_pds)
            label = "PDS" if use_pds else "vanilla PC"
            ax1.plot([p[0] for p in pts], [p[1] for p in pts], style, label=label)
            ax2.plot([p[0] for p in pts], [p[2] for p in pts], style, label=label)
        for ax, ylabel in ((ax1, "FID[effnet] (lower is better)"), (ax2, "seconds per image (CPU)")):
            ax.set_xscale("log")
            ax.set_xlabel("PC iterations N")
            ax.set_ylabel(ylabel)
            ax.legend()
        ax1.set_yscale("log")
        ax1.set_title(f"score-ve on {s.data} {s.resolution}², {s.n_samples} samples")

    notes = (f"score-ve (σ_min = 0.01, σ_max = {method.sigma_max:.3f} = max pairwise distance of the training images "
             f"in [0, 1]) trained {setup.trained_steps} steps at batch {s.batch_size} on {s.data} at {s.resolution}² "
             f"({'reused run' if setup.train_seconds is None else f'{setup.train_seconds:.0f} s'}); PC sampler, snr {s.snr}, "
             f"{s.n_samples} samples per row, FID[effnet] against {s.n_real} real images. "
             f"FID[effnet] of {s.n_samples} held-out real images: {floor}. "
             f"PDS: frequency filter from {s.pds_images} training images, α = {s.pds_alpha}, no space filter. "
             f"PDS overhead per iteration: {100 * overhead['pds_overhead_fraction']:.2f} % of the network's time "
             f"(batch {s.sample_batch}).")
    write_results(out_dir, "pds", results, rows, plot, notes=notes, started=started)
    return results


SWEEP_SLUGS = {"none": "none", "data α=5": "data_a5", "data α=2": "data_a2", "data α=5 + space": "data_a5_space",
               "radial r=0.2H λ=1.6": "radial"}


def run_filter_sweep(out_dir: Path, quick: bool = False, iterations: tuple = (25, 10), **overrides) -> dict:
    """`diffaccel bench pds-filters`: which preconditioner rescues the reduced-iteration PC sampler?

    Same model and protocol as :func:`run` (reuses its run directory); variants: no PDS, the data filter of eq. 22
    with α = 5 and α = 2 (stronger: R ∈ [1, 2]), α = 5 plus the space filter, and the radial filter of eq. 20 with
    the paper's MNIST/NCSN setting r = 0.2·H, λ = 1.6.
    """
    from diffaccel.bench.harness import write_results
    from diffaccel.data import save_grid
    from diffaccel.evaluate import score_images
    from diffaccel.methods.pds import Preconditioner, build_preconditioner, radial_filter

    started = time.time()
    if quick:
        iterations = (2,)
    setup = _setup(out_dir, quick, overrides)
    s, out_dir, method, trained_steps = setup.settings, setup.out_dir, setup.method, setup.trained_steps
    shape = setup.dataset.shape
    real = setup.images(0, s.n_real)
    filt_images = setup.images(0, s.pds_images)
    variants = {
        "none": None,
        "data α=5": build_preconditioner(filt_images, alpha=5.0),
        "data α=2": build_preconditioner(filt_images, alpha=2.0),
        "data α=5 + space": build_preconditioner(filt_images, alpha=5.0, use_space=True),
        "radial r=0.2H λ=1.6": Preconditioner(radial_filter(shape, 0.2 * shape[1], 1.6)),
    }
    rows = []
    for steps in iterations:
        for name, pre in variants.items():
            fake, seconds = _pc_samples(setup, steps, pre)
            slug = SWEEP_SLUGS[name]
            save_grid(fake[:64], out_dir / f"sweep_N{steps}_{slug}.png", nrow=8)
            fid = score_images(real, fake, "effnet", device="cpu", cache=True, progress=False)["fid[effnet]"]
            row = {"iterations": steps, "preconditioner": name, "fid[effnet]": fid,
                   "seconds_per_image": seconds / s.n_samples}
            rows.append(row)
            print(json.dumps(row), flush=True)
    results = {"settings": asdict(s), "trained_steps": trained_steps, "sigma_max": method.sigma_max,
               "iterations": list(iterations), "rows": rows, "quick": quick}
    notes = (f"Model and protocol of `bench pds` (trained {trained_steps} steps); {s.n_samples} samples per row, "
             f"FID[effnet] against {s.n_real} real images, same noise seed for every row.")
    write_results(out_dir, "pds-filters", results, rows, None, notes=notes, started=started)
    return results
