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

from diffaccel.bench.runner import run_benchmark
from diffaccel.bench.specs import Benchmark, ModelSpec, SamplerSpec


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


# --- the shared-harness benchmark (`diffaccel bench pds`) ------------------------------------------------------
# One score-VE model (num_scales = 1000, MNIST-32) sampled by PC at N iterations; with num_scales = 1000 the
# sampler's N levels are a geometric grid from sigma_max to sigma_min, so the per-step ratio is
# (sigma_max / sigma_min)^(1 / (N - 1)). Sweep rows (snr for vanilla, alpha for PDS) run on a small sample at
# the sweep's N; `_extra` reports the best of each sweep and the sigma ratio of every row.
ITERATIONS = (1000, 200, 100, 50)
SNR_GRID = (0.08, 0.12, 0.16, 0.24, 0.32, 0.48, 0.64)  # vanilla's best lay at the top of the earlier 0.08-0.32
ALPHA_GRID = (2.0, 3.0, 5.0, 10.0)
VE_REFERENCE, VP_REFERENCE = "ScoreVE-1000", "Baseline-1000"
EXACT_N, EXACT_N_QUICK = 2000, 16           # exact-score samples per row (full / quick)
# the `mini` UNet: a PC-1000 sample costs 2,000 network calls, so the network's cost sets the benchmark's length
HARNESS_NET = {"preset": "mini"}
# KL's second variant (eq. 25): one network call per training step, so it trains at the baseline's cost
KL_MODEL, KL_CONFIG = "KL-2nd", {"M": 8, "N": 20, "variant": "2nd"}
HARNESS_QUICK_NET = {"preset": "tiny", "overrides": {"block_out_channels": [8, 16], "norm_num_groups": 4}}


def _pc(label: str, steps: int, n: int | None, **options) -> SamplerSpec:
    return SamplerSpec(label, {"sampler": "pc", "steps": steps, **options}, n=n, final_only=True)


def ve_samplers(iterations=ITERATIONS, sweep_at: int = 100, sweep_n: int | None = 100,
                n_full: int | None = 250, n_few: int | None = 300) -> tuple[SamplerSpec, ...]:
    """Vanilla PC and ancestral sampling at every N of ``iterations``, with PDS (α = 5) below the full N (the
    goals compare PDS at few steps with vanilla at full N), and the snr / α sweeps at ``sweep_at``."""
    rows = []
    for N in iterations:
        full = N == max(iterations)
        n = n_full if full else n_few
        rows += [_pc(f"PC-{N}", N, n, snr=0.16), _pc(f"Ancestral-{N}", N, n, predictor="ancestral", corrector_steps=0)]
        if not full:
            rows += [_pc(f"PC-{N} PDS a=5", N, n, snr=0.16, pds=True, pds_alpha=5.0),
                     _pc(f"Ancestral-{N} PDS a=5", N, n, predictor="ancestral", corrector_steps=0, pds=True,
                         pds_alpha=5.0)]
    rows += [_pc(f"sweep PC-{sweep_at} snr={snr}", sweep_at, sweep_n, snr=snr) for snr in SNR_GRID]
    rows += [_pc(f"sweep PC-{sweep_at} PDS a={a:g}", sweep_at, sweep_n, snr=0.16, pds=True, pds_alpha=a)
             for a in ALPHA_GRID]
    return tuple(rows)


def ddim_samplers(steps=(10, 20)) -> tuple[SamplerSpec, ...]:
    """DDIM(η = 0), and DDIM(η = 1) with and without the preconditioned step: PDS acts on the stochastic part of
    a step only, so at η = 0 it would change nothing (docs/pds.md)."""
    rows = []
    for S in steps:
        base = {"sampler": "ddim", "steps": S}  # no clip_x0: --pds refuses it
        rows += [SamplerSpec(f"DDIM-{S}", {**base, "eta": 0.0}, final_only=True),
                 SamplerSpec(f"DDIM-{S} eta=1", {**base, "eta": 1.0}, final_only=True),
                 SamplerSpec(f"DDIM-{S} eta=1 PDS", {**base, "eta": 1.0, "pds": True}, final_only=True)]
    return tuple(rows)


def sigma_ratio(sigma_min: float, sigma_max: float, steps: int) -> float:
    """Per-step ratio sigma_i / sigma_{i+1} of an N-level geometric grid."""
    return (sigma_max / sigma_min) ** (1.0 / max(steps - 1, 1))


def _extra(bench: Benchmark, results: dict, out_dir: Path) -> dict:
    """Best snr / alpha of the sweeps (mean primary metric over seeds) and each PC row's sigma ratio."""
    from diffaccel.bench.specs import slug
    from diffaccel.runs import read_config

    metric = bench.primary
    per_sampler = _reference_values(bench, results)
    mean = {k: sum(v) / len(v) for k, v in per_sampler.items()}
    out: dict = {"metric": metric}
    for prefix, key in (("snr=", "best_snr"), ("PDS a=", "best_alpha")):
        swept = {k: v for k, v in mean.items() if k.startswith("sweep") and prefix in k}
        if swept:
            best = min(swept, key=swept.get)
            out[key] = {"sampler": best, metric: swept[best], "value": float(best.split(prefix)[1])}
    runs = [c.parent for c in sorted((out_dir / "work").glob(f"{slug(VE_REFERENCE)}/seed*/run/config.yaml"))]
    method = read_config(runs[0]).get("method_config", {}) if runs else {}
    sigma_min, sigma_max = method.get("sigma_min"), method.get("sigma_max")
    if sigma_min and sigma_max:
        out["sigma_ratio"] = {s.label: sigma_ratio(sigma_min, sigma_max, s.options["steps"])
                              for s in bench.model(VE_REFERENCE).samplers}
        out["exact_score"] = exact_score_rows(bench, sigma_min, sigma_max, out_dir / "work" / "exact")
        out["exact_n"] = exact_n(bench)
    out["exact_epsilon"] = exact_epsilon_rows(bench, out_dir / "work" / "exact-vp")
    if runs:
        out["pds_cost"] = pds_overhead(bench, runs[0])
    if plot_nfe(bench, per_sampler, out.get("exact_score", {}), out_dir / "nfe.png"):
        out["plot"] = "nfe.png"
    out["markdown"] = _extra_markdown(out)
    return out


FAMILIES = (("PC-{N}", "PC"), ("PC-{N} PDS a=5", "PC + PDS (α = 5)"),
            ("Ancestral-{N}", "ancestral"), ("Ancestral-{N} PDS a=5", "ancestral + PDS (α = 5)"))


def _reference_values(bench: Benchmark, results: dict) -> dict[str, list[float]]:
    """The VE reference model's primary metric per sampler row, one value per seed."""
    values: dict[str, list[float]] = {}
    for (label, _seed), r in results.items():
        if label == VE_REFERENCE:
            for sampler, ev in r["final"].items():
                if bench.primary in ev:
                    values.setdefault(sampler, []).append(float(ev[bench.primary]))
    return values


def plot_nfe(bench: Benchmark, per_sampler: dict[str, list[float]], exact: dict, path: Path) -> bool:
    """Left: the trained model's primary metric (mean and 95 % interval over seeds) against network calls per
    image for PC and ancestral sampling with and without PDS, the tuned vanilla sweep's best beside them. Right:
    the same samplers on the exact score (high-band variance ratio): the sampler's own error."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from diffaccel.bench.stats import mean_interval

    metric = bench.primary
    if not per_sampler:
        return False
    specs = {s.label: s for s in bench.model(VE_REFERENCE).samplers}
    iterations = sorted({s.options["steps"] for s in specs.values() if not s.label.startswith("sweep")})

    def nfe(spec) -> int:
        return spec.options["steps"] * (1 + spec.options.get("corrector_steps", 1))

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.2))
    for pattern, name in FAMILIES:
        labels = [pattern.format(N=N) for N in iterations if pattern.format(N=N) in per_sampler]
        if not labels:
            continue
        stats = [mean_interval(per_sampler[k]) for k in labels]
        xs = [nfe(specs[k]) for k in labels]
        ax.errorbar(xs, [i.mean for i in stats], yerr=[i.half_width or 0.0 for i in stats], marker="o",
                    capsize=3, label=name)
        high = [exact[k]["high"]["var_ratio"] for k in labels if k in exact and "high" in exact[k]]
        if len(high) == len(labels):
            bx.plot([specs[k].options["steps"] for k in labels], high, marker="o", label=name)
    swept = {k: mean_interval(v) for k, v in per_sampler.items() if k.startswith("sweep") and "snr=" in k}
    if swept:
        best = min(swept, key=lambda k: swept[k].mean)
        ax.errorbar([nfe(specs[best])], [swept[best].mean], yerr=[swept[best].half_width or 0.0], marker="*",
                    markersize=12, linestyle="none", color="black", capsize=3,
                    label=f"tuned vanilla ({best.split(' ', 1)[1]}, {specs[best].n} samples)")
    ax.set(xscale="log", yscale="log", xlabel="network calls per image", ylabel=f"{metric} (lower is better)",
           title=f"{VE_REFERENCE}: trained model, {len(next(iter(per_sampler.values())))} seed(s)")
    bx.axhline(1.0, color="grey", linestyle=":", linewidth=1)
    bx.set(xscale="log", xlabel="iterations N", ylabel="produced / target variance, high DCT band",
           title="exact score (Gaussian fitted to the data): sampler error alone")
    for a in (ax, bx):
        a.grid(alpha=0.3)
        a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _extra_markdown(extra: dict) -> str:
    """The sweeps' winners, the per-step sigma ratio and the exact-score bands of every VE row, and the cost."""
    metric, md = extra["metric"], []
    for key, what in (("best_snr", "tuned vanilla (best snr of the sweep)"), ("best_alpha", "best PDS alpha")):
        if key in extra:
            md.append(f"- {what}: `{extra[key]['sampler']}`, mean {metric} {extra[key][metric]:.4g}")
    cost = extra.get("pds_cost", {})
    if "pds_overhead_fraction" in cost:
        md.append(f"- PDS work per predictor step (M·Mᵀ on the drift + M on the noise), batch {cost['batch']} on "
                  f"{cost['device']}: {cost['pds_seconds'] * 1e3:.3g} ms vs {cost['network_seconds'] * 1e3:.4g} ms "
                  f"for one network call = **{100 * cost['pds_overhead_fraction']:.2f} %**")
    if extra.get("plot"):
        md += ["", f"![PDS against network calls]({extra['plot']})"]
    exact, ratio = extra.get("exact_score", {}), extra.get("sigma_ratio", {})
    if exact:
        bands = list(next(iter(exact.values())))
        md += ["", f"Exact score (the Gaussian fitted to the training images, {extra['exact_n']} samples per row): "
                   "Fréchet distance and produced / target variance per DCT band — the sampler's error alone.", "",
               "| sampler | σ ratio per step | " + " | ".join(f"Fréchet {b}" for b in bands) + " | "
               + " | ".join(f"var ratio {b}" for b in bands) + " |",
               "|---|---|" + "---|" * (2 * len(bands))]
        for label, row in exact.items():
            md.append(f"| {label} | {ratio.get(label, float('nan')):.4f} | "
                      + " | ".join(f"{row[b]['frechet']:.4g}" for b in bands) + " | "
                      + " | ".join(f"{row[b]['var_ratio']:.3f}" for b in bands) + " |")
    vp = extra.get("exact_epsilon", {})
    if vp:
        bands = list(next(iter(vp.values())))
        md += ["", f"Exact epsilon on {VP_REFERENCE}'s grid (the same Gaussian in the VP model space [-1, 1], "
                   f"{extra.get('exact_n', EXACT_N)} samples per row): produced / target variance per DCT band.", "",
               "| sampler | " + " | ".join(f"var ratio {b}" for b in bands) + " |", "|---|" + "---|" * len(bands)]
        for label, row in vp.items():
            md.append(f"| {label} | " + " | ".join(f"{row[b]['var_ratio']:.3f}" for b in bands) + " |")
    return "\n".join(md)


def exact_epsilon_rows(bench: Benchmark, folder: Path) -> dict:
    """Every DDIM row of the baseline model run with the exact epsilon of the Gaussian fitted to the training
    images (the VP model space, [-1, 1]) on the baseline's alpha_bar grid: per DCT band, Frechet distance and
    produced / target variance. Stored per row (resumable)."""
    from diffaccel.bench.runner import _read_json, _write_json
    from diffaccel.bench.specs import slug
    from diffaccel.methods import build_method
    from diffaccel.methods.pds import build_preconditioner
    from diffaccel.oracle.bands import band_metrics
    from diffaccel.oracle.fit import fit_gaussian
    from diffaccel.oracle.gaussian_vp import GaussianVPEpsilon
    from diffaccel.samplers import ddim, preconditioned_ddim

    model = bench.model(VP_REFERENCE)
    images = _pds_images(bench, n=100_000).double()             # all training images, [-1, 1]
    fit = fit_gaussian(images)
    mean, cov = fit.mean, fit.covariance()
    alpha_bars = build_method(model.method, model.method_kwargs).alpha_bars.double()
    oracle = GaussianVPEpsilon(mean, cov, alpha_bars, tuple(images.shape[1:]))
    h, w = images.shape[-2:]
    n = exact_n(bench)
    out = {}
    for spec in model.samplers:
        o = spec.options
        key = {"sampler": o, "n": n, "method": [model.method, model.method_kwargs],
               "data": [bench.data, bench.resolution, bench.data_limit]}
        path = folder / f"{slug(spec.label)}.json"
        stored = _read_json(path)
        if stored and stored.get("key") == key:
            out[spec.label] = stored["bands"]
            continue
        g = torch.Generator().manual_seed(0)
        x_T = torch.randn((n, *images.shape[1:]), generator=g, dtype=torch.float64)
        if o.get("pds"):
            pre = build_preconditioner(images[:200].float(), alpha=o.get("pds_alpha", 5.0))
            x = preconditioned_ddim(oracle, x_T, alpha_bars, o["steps"], eta=o["eta"], preconditioner=pre, generator=g)
        else:
            x = ddim(oracle, x_T, alpha_bars, o["steps"], o["eta"], g, False, False)
        bands = band_metrics(x.flatten(1), mean, cov, h, w)
        _write_json(path, {"key": key, "bands": bands})
        out[spec.label] = bands
    return out


def exact_n(bench: Benchmark) -> int:
    """Samples per exact-score row: few in quick mode."""
    return EXACT_N_QUICK if bench.n_samples < 100 else EXACT_N


def _pds_images(bench: Benchmark, n: int = 200) -> torch.Tensor:
    from diffaccel.data import load_dataset
    from diffaccel.methods.pds import representative_images

    return representative_images(load_dataset(bench.data, bench.resolution, limit=bench.data_limit), n)


def exact_score_rows(bench: Benchmark, sigma_min: float, sigma_max: float, folder: Path) -> dict:
    """Every VE sampler row run with the exact score of the Gaussian fitted to the training images (in [0, 1]):
    per DCT band, Frechet distance and produced / target variance. Stored per row (resumable)."""
    from diffaccel.bench.runner import _read_json, _write_json
    from diffaccel.bench.specs import slug
    from diffaccel.methods.pds import build_preconditioner
    from diffaccel.oracle.bands import band_metrics
    from diffaccel.oracle.gaussian_ve import GaussianVEScore
    from diffaccel.samplers_score import pc_sampler, ve_sigmas

    images = _pds_images(bench, n=100_000)                      # all training images, [-1, 1]
    oracle = GaussianVEScore.fit((images + 1) / 2)
    h, w = images.shape[-2:]
    n = exact_n(bench)
    pds_images = images[:200]
    out = {}
    for spec in bench.model(VE_REFERENCE).samplers:
        o = spec.options
        key = {"sampler": o, "n": n, "sigma": [sigma_min, sigma_max], "data": [bench.data, bench.resolution,
                                                                               bench.data_limit]}
        path = folder / f"{slug(spec.label)}.json"
        stored = _read_json(path)
        if stored and stored.get("key") == key:
            out[spec.label] = stored["bands"]
            continue
        pre = build_preconditioner(pds_images, alpha=o.get("pds_alpha", 5.0)) if o.get("pds") else None
        y = pc_sampler(oracle, (n, *images.shape[1:]), ve_sigmas(sigma_min, sigma_max, o["steps"]),
                       snr=o.get("snr", 0.16), corrector_steps=o.get("corrector_steps", 1),
                       predictor=o.get("predictor", "reverse-diffusion"), preconditioner=pre,
                       generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        bands = band_metrics(y.flatten(1), oracle.mean, oracle.basis @ torch.diag(oracle.lam) @ oracle.basis.T, h, w)
        _write_json(path, {"key": key, "bands": bands})
        out[spec.label] = bands
    return out


def pds_overhead(bench: Benchmark, run_dir: Path, repeats: int = 5) -> dict:
    """Seconds per iteration of the network (one score call) and of the PDS work of one predictor step
    (M.M^T on the drift, M on the noise) on a batch of ``sample_batch``; median of ``repeats``."""
    import statistics

    from diffaccel.bench.runner import _device
    from diffaccel.methods.pds import build_preconditioner
    from diffaccel.runs import build_run, read_config

    device = _device()
    # a call's time does not depend on the weights, so the run's network is built from its config.yaml alone
    # (a committed record keeps no checkpoint)
    method, nets = build_run(run_dir)
    net = nets[method.sampling_network].to(device).eval()
    shape = (bench.sample_batch, *read_config(run_dir)["image_shape"])
    pre = build_preconditioner(_pds_images(bench), alpha=5.0).to(device)
    y = torch.rand(shape, device=device)
    sigma = torch.full((shape[0],), 1.0, device=device)

    def timed(fn) -> float:
        times = []
        for _ in range(repeats + 1):
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            with torch.no_grad():
                fn()
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        return statistics.median(times[1:])                     # the first call warms up

    net_s = timed(lambda: method.score(net, y, sigma))
    pds_s = timed(lambda: (pre.apply_gram(y), pre.apply(y)))
    return {"batch": shape[0], "device": device, "network_seconds": net_s, "pds_seconds": pds_s,
            "pds_overhead_fraction": pds_s / net_s}


def harness_benchmark(quick: bool = False) -> Benchmark:
    common = dict(name="pds", title="PDS vs vanilla PC / ancestral, DDIM +- PDS (MNIST-32)",
                  reference_model=VE_REFERENCE, extra=_extra)
    if quick:
        ve = ModelSpec(VE_REFERENCE, "score-ve", {"num_scales": 8}, {},
                       ve_samplers(iterations=(8, 2), sweep_at=2, sweep_n=8, n_full=8, n_few=8))
        ddim = ModelSpec(VP_REFERENCE, "baseline", {"N": 1000}, {}, ddim_samplers((2,)))
        kl = ModelSpec(KL_MODEL, "kl", KL_CONFIG, {}, ddim_samplers((2,)))
        return Benchmark(**common, models=[ve, ddim, kl], data="mnist5k", resolution=32, data_limit=200, steps=2,
                         n_samples=8, n_reference=64, sample_batch=8, measure_cost=False,
                         train_defaults={"net": HARNESS_QUICK_NET, "lr": 1e-3, "ema_decay": 0.995})
    ve = ModelSpec(VE_REFERENCE, "score-ve", {"num_scales": 1000}, {}, ve_samplers())
    ddim = ModelSpec(VP_REFERENCE, "baseline", {"N": 1000}, {}, ddim_samplers())
    kl = ModelSpec(KL_MODEL, "kl", KL_CONFIG, {}, ddim_samplers())
    return Benchmark(**common, models=[ve, ddim, kl], data="mnist5k", resolution=32, steps=8000, n_samples=1000,
                     n_reference=3000, train_defaults={"net": HARNESS_NET, "lr": 1e-3, "ema_decay": 0.995},
                     notes="PC-1000 costs 2,000 network calls per image (250 samples; the other VE rows 300, the "
                           "sweep rows 100 at N = 100); PDS rows at N < 1000 only; per-step sigma ratio in "
                           "extra.sigma_ratio.")


def run(out_dir: Path, quick: bool = False, seeds: int = 1, dry_run: bool = False,
        only_seed: int | None = None) -> dict:
    return run_benchmark(harness_benchmark(quick), out_dir, seeds=seeds, dry_run_only=dry_run, quick=quick,
                         progress=not quick, only_seed=only_seed)


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
