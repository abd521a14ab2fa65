"""`diffaccel bench dvdp`: DVDP's speed/quality comparison (paper Table 1, §5.3) side by side in one run.

Two settings, each with one UNet configuration, one data set, one optimiser, one seed and equal training steps:

* MNIST-32: DDPM (linear schedule, T = 1000) vs DVDP (T₁ = 600) vs subspace diffusion (T₁ = 600);
* MNIST-64 (MNIST resized): DDPM vs DVDP with K = 2 turning points {300, 600}.

Measured per model: training seconds per iteration at equal batch (interleaved rounds on a fixed batch, median,
so a change of machine load hits every model alike), sampling seconds per image (the FID samples, generated in
chunks interleaved across models), NFE and pixel-weighted network cost per sample, and FID/KID/precision/recall
with the EfficientNet-lite0 extractor against the whole data set.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from diffaccel.bench.harness import write_results


@dataclass
class Settings:
    """Benchmark size. The defaults are the committed run: about 35 minutes on an idle 2-core CPU with the two
    settings in two processes (``run(..., only=0)`` and ``only=1``), long enough for digit-like samples."""

    data: str = "mnist5k"
    data_limit: int | None = None
    resolutions: tuple[int, int] = (32, 64)
    net: dict = field(default_factory=lambda: {"preset": "small", "overrides": {"block_out_channels": [16, 32, 32]}})
    steps: tuple[int, int] = (3000, 1000)  # training steps per model in each setting
    batch_size: int = 16
    lr: float = 1e-3
    ema_decay: float = 0.995
    seed: int = 0
    n_samples: int = 1000
    sample_steps: int = 10
    eta: float = 0.0
    clip_x0: bool = True  # predicted x0 clipped to the data range, for every model alike
    sample_batch: int = 250
    timing_rounds: int = 10
    timing_iters: int = 2

    @classmethod
    def quick(cls) -> "Settings":
        return cls(data="digits", data_limit=48, resolutions=(16, 16), steps=(2, 2), batch_size=4, n_samples=6,
                   sample_steps=3, sample_batch=3, timing_rounds=1, timing_iters=1)


def models(setting: int) -> list[tuple[str, str, dict]]:
    """(label, method name, method kwargs) of the models compared in setting 0 (one turning point) or 1 (two)."""
    ddpm = ("DDPM", "baseline", {"N": 1000, "schedule": "linear"})
    if setting == 0:
        return [ddpm, ("DVDP T1=600", "dvdp", {"turning_points": [600]}),
                ("subspace T1=600", "subspace", {"turning_points": [600]})]
    return [ddpm, ("DVDP T={300,600}", "dvdp", {"turning_points": [300, 600]})]


def plot_schedule(path: str | Path) -> Path:
    """λ̄ and SNR per subspace for T₁ = 600 and for {300, 600}, with DDPM's linear schedule (= the coarsest subspace)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from diffaccel.methods.dvdp import DVDP

    fig, axes = plt.subplots(2, 2, figsize=(10, 6.5), sharex=True)
    t = torch.arange(1001)
    names = {0: "finest detail", 1: "second detail", 2: "coarsest"}
    for col, tps in enumerate([(600,), (300, 600)]):
        m = DVDP(tps)
        for i in range(m.K + 1):
            label = "coarsest (= DDPM linear)" if i == m.K else names[i] + f" (dropped at t={tps[i]})"
            end = tps[i] if i < m.K else 1000
            snr = (m.lam[i] ** 2 / m.sig[i].clamp(min=1e-12) ** 2)
            for ax, y in ((axes[0, col], m.lam[i]), (axes[1, col], snr)):
                line, = ax.plot(t[:end + 1], y[:end + 1], label=label)
                ax.plot(t[end:], y[end:], ls=":", color=line.get_color(), alpha=0.5)
        for tp in tps:
            for ax in axes[:, col]:
                ax.axvline(tp, color="gray", lw=0.7, ls="--")
        axes[0, col].axhline(m.lambda_at_turn, color="gray", lw=0.7)
        axes[0, col].set_title(f"turning points {list(tps)}, lambda_at_turn = {m.lambda_at_turn:g}")
        axes[0, col].set_ylabel("signal scale λ̄ per subspace")
        axes[1, col].set_ylabel("SNR λ̄²/σ̄²")
        axes[1, col].set_yscale("log")
        axes[1, col].set_ylim(1e-6, 1e4)
        axes[1, col].set_xlabel("time step t (dotted: after the subspace is dropped)")
        axes[0, col].legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _timing(method_list, nets, x: torch.Tensor, s: Settings) -> list[float]:
    """Median seconds per optimisation step (loss, backward, AdamW) of each model, in interleaved rounds."""
    opts = [torch.optim.AdamW(n.parameters(), lr=s.lr) for n in nets]
    times = [[] for _ in nets]

    def step(i):
        t0 = time.perf_counter()
        loss = method_list[i].loss(nets[i], x)
        loss.backward()
        opts[i].step()
        opts[i].zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    for i in range(len(nets)):  # warm-up
        step(i)
    for _ in range(s.timing_rounds):
        for i in range(len(nets)):
            times[i].extend(step(i) for _ in range(s.timing_iters))
    return [statistics.median(ts) for ts in times]


def _sample_grid_figure(grids: list[tuple[str, torch.Tensor]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from diffaccel.data import to_uint8

    fig, axes = plt.subplots(1, len(grids), figsize=(3.2 * len(grids), 3.8), squeeze=False)
    for ax, (title, images) in zip(axes[0], grids):
        n = min(len(images), 36)
        side = int(n**0.5)
        imgs = to_uint8(images[: side * side])[:, 0]  # [n, H, W]
        H, W = imgs.shape[-2:]
        grid = imgs.reshape(side, side, H, W).permute(0, 2, 1, 3).reshape(side * H, side * W)
        ax.imshow(grid.numpy(), cmap="gray", vmin=0, vmax=255)
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def run_setting(setting: int, s: Settings, work: Path) -> dict:
    """Time, train, sample and score the models of one setting; saved to ``work/setting{setting}.pt`` so that the
    settings can run in separate processes and an interrupted benchmark keeps its finished trainings."""
    from diffaccel.data import load_dataset
    from diffaccel.evaluate import score_images
    from diffaccel.methods import build_method
    from diffaccel.runs import load_run, read_metrics
    from diffaccel.train import TrainConfig, train

    resolution = s.resolutions[setting]
    ds = load_dataset(s.data, resolution=resolution, limit=s.data_limit)
    shape = tuple(ds.shape)
    entries = models(setting)
    methods = [build_method(name, kwargs) for _, name, kwargs in entries]
    tag = f"{s.data}-{resolution}"

    # 1. training speed at equal batch, interleaved
    nets = []
    for m in methods:
        torch.manual_seed(s.seed)
        nets.append(m.build_networks(s.net, shape)["net"])
    torch.manual_seed(s.seed)
    x = ds.get_batch(torch.arange(s.batch_size) % len(ds))
    train_s = _timing(methods, nets, x, s)
    del nets

    # 2. equal-step training of every model with the project's trainer (a finished run is reused)
    runs = []
    for (label, _, _), m in zip(entries, methods):
        out = work / f"{setting}-{tag}" / label.replace(" ", "_").replace("/", "_")
        cfg = TrainConfig(data=s.data, resolution=resolution, data_limit=s.data_limit, net=s.net,
                          batch_size=s.batch_size, lr=s.lr, steps=s.steps[setting], ema_decay=s.ema_decay,
                          seed=s.seed, out=str(out), checkpoint_every=s.steps[setting],
                          log_every=max(1, s.steps[setting] // 10), sample_n=16,
                          sample_options={"sampler": "ddim", "steps": s.sample_steps, "eta": s.eta,
                                          "clip_x0": s.clip_x0}, device="cpu")
        t0 = time.perf_counter()
        runs.append(train(cfg, m, dataset=ds, progress=False, log=lambda *_: None,
                          resume=(out / "config.yaml").is_file()))
        print(f"[dvdp bench] {tag} {label}: trained {s.steps[setting]} steps in {time.perf_counter() - t0:.0f} s",
              flush=True)

    # 3. samples for FID, in chunks interleaved across models so load changes hit all alike
    loaded = [load_run(r) for r in runs]
    fakes = [[] for _ in runs]
    sample_time = [0.0 for _ in runs]
    opts = {"sampler": "ddim", "steps": s.sample_steps, "eta": s.eta, "clip_x0": s.clip_x0}
    for c, start in enumerate(range(0, s.n_samples, s.sample_batch)):
        n = min(s.sample_batch, s.n_samples - start)
        for i, (m, nets) in enumerate(loaded):
            g = torch.Generator().manual_seed(s.seed * 1000 + c)
            t0 = time.perf_counter()
            fakes[i].append(m.sample(nets["net"], n, shape, generator=g, progress=False, **opts).clamp(-1, 1))
            sample_time[i] += time.perf_counter() - t0
    print(f"[dvdp bench] {tag}: sampled {s.n_samples} images per model", flush=True)

    base_train, base_sample = train_s[0], sample_time[0] / s.n_samples
    result = {"entries": [], "rows": [], "grids": []}
    for i, ((label, name, kwargs), (m, _)) in enumerate(zip(entries, loaded)):
        fake = torch.cat(fakes[i])
        scores = score_images(ds.images, fake, "effnet")
        losses = [r["loss"] for r in read_metrics(runs[i]) if "loss" in r]
        cost = m.relative_cost(**opts) if hasattr(m, "relative_cost") else float(m.nfe(**opts))
        entry = {"setting": tag, "model": label, "method": name, "method_config": m.config(),
                 "train_s_per_iter": train_s[i], "train_speedup": base_train / train_s[i],
                 "sample_s_per_image": sample_time[i] / s.n_samples,
                 "sample_speedup": base_sample / (sample_time[i] / s.n_samples),
                 "nfe": m.nfe(**opts), "full_res_equivalent_nfe": cost, "final_loss": losses[-1] if losses else None,
                 **scores}
        result["entries"].append(entry)
        result["rows"].append({"setting": tag, "model": label, "train s/iter": entry["train_s_per_iter"],
                               "train speed-up": entry["train_speedup"], "sample s/image": entry["sample_s_per_image"],
                               "sampling speed-up": entry["sample_speedup"], "NFE": entry["nfe"],
                               "full-res NFE": cost, "FID[effnet]": scores["fid[effnet]"],
                               "KID[effnet]": scores["kid[effnet]"], "precision": scores["precision[effnet]"],
                               "recall": scores["recall[effnet]"]})
        result["grids"].append((f"{tag} {label}\nFID[effnet] {scores['fid[effnet]']:.2f}", fake[:36]))
        print(f"[dvdp bench] {tag} {label}: " + ", ".join(f"{k} {v:.4g}" for k, v in result["rows"][-1].items()
                                                        if isinstance(v, float)), flush=True)
    torch.save(result, work / f"setting{setting}.pt")
    return result


def run(out_dir: Path, quick: bool = False, settings: Settings | None = None, work_dir: Path | None = None,
        only: int | None = None) -> dict:
    """Run every setting (or only setting ``only``); once every setting's result is in ``work_dir``, write the
    results (JSON, markdown table, plot, sample grid, schedule plot) into ``out_dir``."""
    started = time.time()
    torch.set_num_threads(1)
    s = settings or (Settings.quick() if quick else Settings())
    out_dir = Path(out_dir)
    work = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="bench-dvdp-"))
    work.mkdir(parents=True, exist_ok=True)
    for setting in range(len(s.resolutions)) if only is None else [only]:
        run_setting(setting, s, work)
    return write(out_dir, s, work, started)


def write(out_dir: Path, s: Settings, work: Path, started: float | None = None) -> dict:
    """Merge the settings' saved results in ``work`` into ``out_dir`` (nothing is written until all are there)."""
    out_dir, work = Path(out_dir), Path(work)
    files = [work / f"setting{i}.pt" for i in range(len(s.resolutions))]
    if not all(f.is_file() for f in files):
        return {}
    parts = [torch.load(f, weights_only=False) for f in files]  # our own files, written above
    rows = [r for p in parts for r in p["rows"]]
    results = {"settings": asdict(s), "work_dir": str(work), "models": [e for p in parts for e in p["entries"]]}
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_schedule(out_dir / "schedule.png")
    _sample_grid_figure([g for p in parts for g in p["grids"]], out_dir / "samples.png")

    def plot(fig):
        axes = fig.subplots(1, 3)
        labels = [f"{r['setting']}\n{r['model']}" for r in rows]
        for ax, key in zip(axes, ["train speed-up", "sampling speed-up", "FID[effnet]"]):
            ax.bar(range(len(rows)), [r[key] for r in rows],
                   color=["C0" if r["model"] == "DDPM" else "C1" if r["model"].startswith("DVDP") else "C2"
                          for r in rows])
            ax.set_xticks(range(len(rows)), labels, rotation=70, fontsize=6)
            ax.set_title(key + (" (vs DDPM)" if "speed" in key else ""), fontsize=9)
            if "speed" in key:
                ax.axhline(1, color="gray", lw=0.7)

    notes = (f"Equal training steps per setting ({', '.join(map(str, s.steps))}), batch {s.batch_size}, UNet "
             f"{s.net}, sampler DDIM {s.sample_steps} steps eta={s.eta}{', x0 clipped' if s.clip_x0 else ''}, "
             f"{s.n_samples} samples per model, "
             f"FID against all {s.data} images. Train s/iter: median over interleaved rounds; sample s/image: "
             f"the FID samples in interleaved chunks. Full-res NFE: network calls weighted by pixel count.")
    write_results(out_dir, "dvdp", results, rows, plot, notes=notes, started=started)
    return results
