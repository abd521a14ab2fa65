"""`diffaccel bench stack`: do the accelerations stack? Single methods against their combinations, each trained
for the same wall-clock budget on MNIST-32 on the shared harness.

Single-method rows: pixel DDPM (DDIM-20), latent DDPM (DDIM-20) and LDDGAN (T = 4). Stacked rows, each the latent
space plus one more method: latent KL-2nd (DDIM-20 on its N = 20 grid), latent DVDP (DDIM-20, its default
log-SNR steps per stage) and latent DDPM sampled with the preconditioned DDIM at 10 steps (PDS-DDIM-10, beside
plain DDIM-10 on the same network, so that the preconditioner is judged at equal NFE). Every latent row uses the
same f = 4 autoencoder as `bench lddgan` (trained once, not counted in any budget); sampling times include the
decoder. The extra table tells, for every stacked row, whether it dominates latent DDPM's DDIM-20 — faster to
sample with FID[digits] and legible rate at least as good, better with non-overlapping intervals where it
claims so — and the Pareto plot puts every row's quality against its sampling time and its training cost.
"""

from __future__ import annotations

from pathlib import Path

import torch

from diffaccel.bench.lddgan import SECONDS, UNET, equal_time_benchmark, latent
from diffaccel.bench.runner import run_benchmark
from diffaccel.bench.specs import Benchmark, ModelSpec, SamplerSpec
from diffaccel.bench.stats import mean_interval

REFERENCE = ("Latent DDPM", "DDIM-20")
STACKED = (("Latent KL-2nd", "DDIM-20"), ("Latent DVDP", "DDIM-20"), ("Latent DDPM", "PDS-DDIM-10"))


def models(quick: bool) -> list[ModelSpec]:
    steps = (lambda n: 2) if quick else (lambda n: n)
    pixel_ddim = SamplerSpec("DDIM-20", {"sampler": "ddim", "steps": steps(20), "clip_x0": True})
    ddim = SamplerSpec("DDIM-20", {"sampler": "ddim", "steps": steps(20)})  # latents: nothing to clip
    ddim10 = SamplerSpec("DDIM-10", {"sampler": "ddim", "steps": steps(10)}, final_only=True)
    pds10 = SamplerSpec("PDS-DDIM-10", {"sampler": "ddim", "steps": steps(10), "pds": True}, final_only=True)
    T = 50 if quick else 1000
    f4 = latent("f4", quick)
    return [ModelSpec("DDPM", "baseline", {"N": T}, {"net": UNET}, (pixel_ddim,)),
            ModelSpec("Latent DDPM", "baseline", {"N": T}, {"net": UNET}, (ddim, ddim10, pds10), **f4),
            ModelSpec("Latent KL-2nd", "kl", {"M": 8, "N": 20, "variant": "2nd"}, {"net": UNET}, (ddim,), **f4),
            ModelSpec("Latent DVDP", "dvdp", {"T": T, "turning_points": [round(0.6 * T)]}, {"net": UNET}, (ddim,),
                      **f4),
            ModelSpec("LDDGAN", "lddgan", {"T": 4, "gen_loss": "adv+rec+wl"}, samplers=(SamplerSpec("T=4", {}),),
                      **f4)]


def _row_stats(results: dict, label: str, sampler: str) -> dict:
    finals = [r["final"][sampler] for (m, _), r in sorted(results.items()) if m == label and sampler in r["final"]]
    return {metric: mean_interval([f.get(metric) for f in finals])
            for metric in ("fid[digits]", "legible_rate", "recall[digits]", "seconds_per_100_images")}


def dominance_rows(results: dict) -> list[dict]:
    """Each stacked row against latent DDPM's DDIM-20: faster, and FID/legible rate no worse (overlapping
    intervals) or better (disjoint intervals)?"""
    ref = _row_stats(results, *REFERENCE)
    rows = []
    for label, sampler in STACKED:
        s = _row_stats(results, label, sampler)
        if not s["fid[digits]"].n:
            continue

        def verdict(metric, higher):
            a, b = s[metric], ref[metric]
            if not a.overlaps(b):
                return "better" if (a.mean > b.mean) == higher else "worse"
            return "n.s."

        fid, legible = verdict("fid[digits]", False), verdict("legible_rate", True)
        speed = ref["seconds_per_100_images"].mean / s["seconds_per_100_images"].mean
        rows.append({"stack": f"{label}, {sampler}", "sampling speed-up": speed, "fid[digits]": fid,
                     "legible_rate": legible,
                     "dominates": speed > 1 and "worse" not in (fid, legible) and "better" in (fid, legible)})
    return rows


def pareto_plot(bench: Benchmark, results: dict, out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = []
    for model in bench.models:
        runs = [r for (m, _), r in sorted(results.items()) if m == model.label]
        cost = mean_interval([r.get("sec_per_step") for r in runs]).mean
        for sampler in model.samplers:
            s = _row_stats(results, model.label, sampler.label)
            points.append((f"{model.label}, {sampler.label}", s, cost))
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    for ax, (metric, ylabel) in zip(axes[:2], (("fid[digits]", "FID[digits] (lower is better)"),
                                               ("legible_rate", "legible rate (higher is better)"))):
        for name, s, _ in points:
            ax.errorbar(s["seconds_per_100_images"].mean, s[metric].mean, yerr=s[metric].half_width or 0,
                        fmt="o", capsize=3, label=name)
        ax.set_xscale("log")
        ax.set_xlabel("sampling seconds per 100 images (decoder included)")
        ax.set_ylabel(ylabel)
    for name, s, cost in points:
        axes[2].errorbar(cost, s["fid[digits]"].mean, yerr=s["fid[digits]"].half_width or 0, fmt="o", capsize=3)
    axes[2].set_xscale("log")
    axes[2].set_xlabel("training seconds per step (equal wall-clock budget)")
    axes[2].set_ylabel("FID[digits]")
    axes[0].legend(fontsize=7)
    fig.suptitle("Quality against sampling time and training cost (mean ± 95 % interval over seeds)")
    fig.tight_layout()
    fig.savefig(out_dir / "pareto.png", dpi=110)
    plt.close(fig)


def extra_tables(bench: Benchmark, results: dict, out_dir: Path) -> dict:
    from diffaccel.bench.harness import markdown_table

    rows = dominance_rows(results)
    pareto_plot(bench, results, out_dir)
    md = ("## Stacked rows against latent DDPM (DDIM-20)\n\n\"better\"/\"worse\": the 95 % intervals are disjoint; "
          "\"dominates\": faster to sample, neither metric worse and at least one better.\n\n"
          + (markdown_table(rows, floatfmt=".3g") if rows else "(no stacked row evaluated yet)")
          + "\n\n![pareto](pareto.png)")
    return {"dominance": rows, "markdown": md}


def benchmark(quick: bool = False) -> Benchmark:
    return equal_time_benchmark(
        quick, name="stack", title="Stacked accelerations vs single methods (MNIST-32, equal training time)",
        reference_model="Latent DDPM", models=models(quick), extra=extra_tables,
        notes=f"Equal wall-clock training per model ({SECONDS:.0f} s, turned into steps by a timing probe); the "
              "f = 4 autoencoder of `bench lddgan` trained once (1,500 steps, not counted). s/100 img: median of 5 "
              "timed trials of 100 images, decoder included; PDS's filter is computed once per model (200 encoded "
              "training images), outside the timing.")


def run(out_dir: Path, quick: bool = False, seeds: int = 1, dry_run: bool = False,
        only_seed: int | None = None) -> dict:
    torch.set_num_threads(1)
    return run_benchmark(benchmark(quick), out_dir, seeds=seeds, dry_run_only=dry_run, quick=quick,
                         progress=not quick, only_seed=only_seed)
