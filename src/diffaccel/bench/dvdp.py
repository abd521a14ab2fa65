"""`diffaccel bench dvdp` and `dvdp-64`: DVDP's speed/quality comparison (paper Table 1, §5.3) on the shared harness.

* ``dvdp``: MNIST-32, DDPM (linear schedule, T = 1000) vs DVDP (T₁ = 600) vs subspace diffusion (T₁ = 600);
* ``dvdp-64``: MNIST resized to 64×64, DDPM vs DVDP with K = 2 turning points {300, 600}.

Every model has the same UNet, optimiser, batch and number of steps, and ``--seeds`` seeds. Quality: FID[digits],
legible rate, coverage, precision/recall with 95 % intervals and the real-vs-real floor, along training (DDIM-20)
and at the end with DDIM-20, DDIM-100 and DDPM-1000 (the last on a subset). Speed (the ``extra`` table): training
seconds per step at equal batch and sampling seconds per image, each measured in interleaved rounds on fresh
networks in one process, so a change of machine load hits every model alike; the ratios against DDPM are the
paper's speed-ups. NFE and pixel-weighted network cost ("full-res NFE") per sample.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from diffaccel.bench.runner import run_benchmark
from diffaccel.bench.specs import Benchmark, ModelSpec, SamplerSpec

REFERENCE = "DDPM"
NET = {"preset": "mini"}
QUICK_NET = {"preset": "tiny", "overrides": {"block_out_channels": [8, 16], "norm_num_groups": 4}}
TRAIN = {"net": NET, "batch_size": 32, "lr": 1e-3, "warmup_steps": 100, "ema_decay": 0.995}
# 32 images per timed sampling call, as a batch of samples is drawn: at 4, each call's fixed cost dominated
TIMING_ROUNDS, TIMING_ITERS, TIMING_SAMPLES = 12, 2, 32


def samplers(quick: bool, allocation: str | None = None) -> tuple[SamplerSpec, ...]:
    """DDIM at two step counts and DDPM-1000; ``allocation`` (DVDP/subspace) names how DDIM splits its steps
    between the stages, and adds a DDIM row on the uniform-in-t grid for comparison."""
    per_stage = {"step_allocation": allocation} if allocation else {}

    def ddim(steps, options=per_stage, suffix="", final_only=False):
        return SamplerSpec(f"DDIM-{steps}{suffix}", {"sampler": "ddim", "steps": steps, "eta": 0.0, "clip_x0": True,
                                                     **options}, final_only=final_only)

    uniform = (ddim(3 if quick else 20, {"step_allocation": "uniform"}, " uniform", True),) \
        if allocation not in (None, "uniform") else ()
    if quick:
        return (ddim(3), *uniform, SamplerSpec("DDPM", {"sampler": "ddpm", "clip_x0": True}, n=4, final_only=True))
    ddim100 = SamplerSpec("DDIM-100", ddim(100).options, n=500, final_only=True)
    return (ddim(20), ddim100, *uniform,
            SamplerSpec("DDPM-1000", {"sampler": "ddpm", "clip_x0": True}, n=100, final_only=True))


def models(turning_points: tuple[int, ...], quick: bool, T: int = 1000) -> list[ModelSpec]:
    tps = list(turning_points)
    tag = f"T1={tps[0]}" if len(tps) == 1 else "T={" + ",".join(map(str, tps)) + "}"
    rows = [ModelSpec(REFERENCE, "baseline", {"N": T, "schedule": "linear"}, samplers=samplers(quick)),
            ModelSpec(f"DVDP {tag}", "dvdp", {"turning_points": tps, "T": T}, samplers=samplers(quick, "log-snr"))]
    if len(tps) == 1:
        rows.append(ModelSpec(f"subspace {tag}", "subspace", {"turning_points": tps, "T": T, "jump": "fitted"},
                              samplers=samplers(quick, "uniform")))
    return rows


def benchmark(resolution: int = 32, quick: bool = False) -> Benchmark:
    tps = ((600,) if resolution == 32 else (300, 600)) if not quick else ((25,) if resolution == 32 else (15, 30))
    name = "dvdp" if resolution == 32 else f"dvdp-{resolution}"
    common = dict(name=name, title=f"DVDP vs DDPM{' vs subspace diffusion' if len(tps) == 1 else ''} "
                                   f"(MNIST-{resolution}, turning points {list(tps)})",
                  reference_model=REFERENCE, extra=speed_table)
    if quick:
        return Benchmark(**common, models=models(tps, True, T=50),
                         data="mnist5k", resolution=32, data_limit=200, steps=2, eval_every=1, n_samples=6,
                         n_reference=64, sample_batch=6, measure_cost=False,
                         train_defaults={**TRAIN, "net": QUICK_NET, "batch_size": 4, "warmup_steps": 0})
    steps, eval_every = (3000, 1000) if resolution == 32 else (2000, 1000)
    return Benchmark(**common, models=models(tps, False), data="mnist5k", resolution=resolution, steps=steps,
                     eval_every=eval_every, n_samples=1000, n_reference=3000, train_defaults=TRAIN,
                     measure_cost=False,  # the interleaved speed table below measures what the paper claims
                     notes="DDIM with η = 0 and x0 clipped to the data range for every model alike; DVDP's "
                           "DDIM steps are spaced evenly in the log-SNR of each stage's finest subspace (its default, "
                           "chosen on the exact-score testbed; the uniform-in-t grid is the extra row), subspace "
                           "diffusion's uniformly in t; DDIM-100 on 500 samples, DDPM-1000 on 100 (so that three "
                           "seeds fit a session of two cores). Speed-ups: interleaved rounds in one process (see the "
                           "speed table).")


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


def _interleaved_medians(fns: list, rounds: int, iters: int) -> list[float]:
    """Median seconds of each zero-argument function, timed in rounds that visit every function in turn."""
    times = [[] for _ in fns]
    for fn in fns:  # warm-up
        fn()
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            for _ in range(iters):
                t0 = time.perf_counter()
                fn()
                times[i].append(time.perf_counter() - t0)
    return [statistics.median(ts) for ts in times]


def speed_table(bench: Benchmark, results: dict, out_dir: Path) -> dict:
    """Training seconds per step (loss, backward, AdamW at the benchmark's batch) and sampling seconds per image
    (the first sampler), on fresh networks of every model, interleaved; ratios against DDPM; the schedule plot."""
    from diffaccel.bench.harness import markdown_table
    from diffaccel.data import load_dataset
    from diffaccel.methods import build_method

    plot_schedule(out_dir / "schedule.png")
    quick = bench.steps <= 2
    ds = load_dataset(bench.data, bench.resolution, limit=bench.data_limit)
    train = {**bench.train_defaults}
    batch = train.get("batch_size", 16)
    x = ds.get_batch(torch.arange(batch) % len(ds))
    opts = bench.models[0].samplers[0].options
    step_fns, sample_fns, entries = [], [], []
    for model in bench.models:
        method = build_method(model.method, model.method_kwargs)
        method.prepare(ds, "cpu")                # as training does (subspace: fits its jump's detail variance)
        torch.manual_seed(0)
        net = method.build_networks(train["net"], tuple(ds.shape))["net"]
        opt = torch.optim.AdamW(net.parameters(), lr=train.get("lr", 1e-3))

        def step(method=method, net=net, opt=opt):
            loss = method.loss(net, x)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        def sample(method=method, net=net):
            with torch.no_grad():
                method.sample(net.eval(), TIMING_SAMPLES, tuple(ds.shape), generator=torch.Generator().manual_seed(0),
                              progress=False, **opts)
            net.train()

        step_fns.append(step)
        sample_fns.append(sample)
        cost = method.relative_cost(**opts) if hasattr(method, "relative_cost") else float(method.nfe(**opts))
        entries.append({"model": model.label, "NFE": method.nfe(**opts), "full-res NFE": cost})
    rounds, iters = (1, 1) if quick else (TIMING_ROUNDS, TIMING_ITERS)
    train_s = _interleaved_medians(step_fns, rounds, iters)
    sample_s = [s / TIMING_SAMPLES for s in _interleaved_medians(sample_fns, rounds, 1)]
    for e, ts, ss in zip(entries, train_s, sample_s):
        e.update({"train s/step": ts, "train speed-up vs DDPM": train_s[0] / ts, "sample s/image": ss,
                  "sampling speed-up vs DDPM": sample_s[0] / ss})
    table = markdown_table([{k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in e.items()} for e in entries])
    markdown = (f"## Speed ({bench.models[0].samplers[0].label} for sampling, batch {batch} for training; medians of "
                f"{rounds} interleaved rounds on fresh networks)\n\n{table}\n\nTime steps per subspace: "
                "![schedule](schedule.png)")
    return {"speed": entries, "markdown": markdown}


def run(out_dir: Path, quick: bool = False, seeds: int = 1, dry_run: bool = False,
        only_seed: int | None = None) -> dict:
    torch.set_num_threads(1)
    return run_benchmark(benchmark(32, quick), out_dir, seeds=seeds, dry_run_only=dry_run, quick=quick,
                         progress=not quick, only_seed=only_seed)


def run_64(out_dir: Path, quick: bool = False, seeds: int = 1, dry_run: bool = False,
        only_seed: int | None = None) -> dict:
    torch.set_num_threads(1)
    return run_benchmark(benchmark(64, quick), out_dir, seeds=seeds, dry_run_only=dry_run, quick=quick,
                         progress=not quick, only_seed=only_seed)
