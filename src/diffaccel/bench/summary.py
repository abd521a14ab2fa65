"""From per-(model, seed) results to the benchmark's table, plots and files.

Every metric is reported as mean ± 95 % interval over seeds (:mod:`diffaccel.bench.stats`); every table has a
floor row (the same metrics between two disjoint real sets of the comparison's sizes); a model whose best
primary score is at its last evaluation is marked "still improving", and no steps-to-reach figure is derived
from a reference curve that has not flattened; a difference from the reference model is called significant
only when the intervals do not overlap.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict
from pathlib import Path

from diffaccel.bench.runner import curve_sampler
from diffaccel.bench.specs import Benchmark, slug
from diffaccel.bench.stats import Interval, first_step_reaching, mean_interval, still_improving

HIGHER_IS_BETTER = ("precision", "recall", "legible_rate", "class_coverage")


def higher_is_better(metric: str) -> bool:
    return metric.split("[")[0] in HIGHER_IS_BETTER


def quality_metrics(bench: Benchmark) -> list[str]:
    names = []
    for e in bench.extractors:
        names += [f"fid[{e}]", f"kid[{e}]", f"precision[{e}]", f"recall[{e}]"]
        if e == "digits":
            names += ["legible_rate", "class_coverage"]
    return [bench.primary] + [n for n in names if n != bench.primary]


def _mean_curve(per_seed: list[list[tuple[int, float, float]]], batch_size: int | None = None) -> list[dict]:
    """(step, value, train_seconds) per seed -> per step: Interval of the value, mean seconds and, with the
    model's batch size, the training images processed (step × batch)."""
    steps = sorted({s for curve in per_seed for s, _, _ in curve})
    out = []
    for step in steps:
        values = [v for curve in per_seed for s, v, _ in curve if s == step]
        secs = [t for curve in per_seed for s, _, t in curve if s == step and math.isfinite(t)]
        iv = mean_interval(values)
        out.append({"step": step, **iv.as_dict(), "train_seconds": sum(secs) / len(secs) if secs else math.nan,
                    "images": step * batch_size if batch_size else math.nan})
    return out


def summarize(bench: Benchmark, results: dict, floor: dict, seeds: int, costs: dict | None = None) -> dict:
    metrics = quality_metrics(bench)
    rows, curves = [], {}
    for model in bench.models:
        runs = [results[(model.label, k)] for k in range(seeds) if (model.label, k) in results]
        csampler = curve_sampler(model)
        for metric in (bench.primary, "legible_rate"):
            if csampler is None or (metric == "legible_rate" and "digits" not in bench.extractors):
                continue
            per_seed = []
            for r in runs:
                pts = [(int(e["step"]), float(e[metric]), float(e["train_seconds"])) for e in r["evals"]
                       if metric in e]
                final = r["final"].get(csampler.label, {})
                if metric in final:
                    pts.append((r["steps"], float(final[metric]), float(r["train_seconds"])))
                per_seed.append(pts)
            batch = {**bench.train_defaults, **model.train}.get("batch_size")
            curves.setdefault(model.label, {})[metric] = _mean_curve(per_seed, batch)
        for sampler in model.samplers:
            finals = [r["final"][sampler.label] for r in runs if sampler.label in r["final"]]
            row = {"model": model.label, "sampler": sampler.label, "steps": runs[0]["steps"] if runs else None,
                   "nfe": finals[0]["nfe"] if finals else None, "n_samples": finals[0]["n"] if finals else None,
                   "seeds": len(finals),
                   "train_sec_per_step": mean_interval([r["sec_per_step"] for r in runs]),
                   "seconds_per_100_images": mean_interval([f["seconds_per_100_images"] for f in finals])}
            cost = (costs or {}).get(model.label, {})
            row["cost_sec_per_step"] = cost.get("sec_per_step")
            row["peak_train_memory_mb"] = cost.get("peak_mem_mb")
            for metric in metrics:
                row[metric] = mean_interval([f.get(metric) for f in finals])
            row["per_seed"] = finals
            rows.append(row)
    for model in bench.models:
        curve = curves.get(model.label, {}).get(bench.primary, [])
        points = [(c["step"], c["mean"]) for c in curve]
        flag = still_improving(points, higher_is_better(bench.primary)) if len(points) >= 2 else None
        for row in rows:
            if row["model"] == model.label:
                row["still_improving"] = flag
    _compare_with_reference(bench, rows, curves)
    floor_rows = {n: {m: mean_interval([s.get(m) for s in per_seed]) for m in metrics} | {
        "n_real": per_seed[0]["n_real"] if per_seed else None} for n, per_seed in floor.items()}
    return {"rows": rows, "curves": curves, "floors": floor_rows, "metrics": metrics, "seeds": seeds}


def _compare_with_reference(bench: Benchmark, rows: list[dict], curves: dict) -> None:
    if not bench.reference_model:
        return
    refs = [r for r in rows if r["model"] == bench.reference_model]
    if not refs:
        return
    ref_curve = curves.get(bench.reference_model, {}).get(bench.primary, [])
    ref_points = [(c["step"], c["mean"]) for c in ref_curve]
    hib = higher_is_better(bench.primary)
    ref_flat = len(ref_points) >= 2 and not still_improving(ref_points, hib)
    target = (max if hib else min)(v for _, v in ref_points) if ref_points else None
    for row in rows:
        ref = next((r for r in refs if r["sampler"] == row["sampler"]), refs[0])
        verdicts = []
        for metric in (bench.primary, "legible_rate"):
            a, b = row.get(metric), ref.get(metric)
            if not isinstance(a, Interval) or not isinstance(b, Interval) or row is ref or math.isnan(a.mean):
                continue
            if a.overlaps(b):
                verdicts.append(f"{metric}: n.s.")
            else:
                better = (a.mean > b.mean) == higher_is_better(metric)
                verdicts.append(f"{metric}: {'better' if better else 'worse'}")
        row["vs_reference"] = "; ".join(verdicts) if verdicts else ("reference" if row is ref else "")
        if not ref_flat or target is None:
            row["steps_to_reference_best"] = "reference still improving" if ref_points else None
            continue
        curve = curves.get(row["model"], {}).get(bench.primary, [])
        reach = first_step_reaching([(c["step"], c["mean"]) for c in curve], target, hib)
        row["steps_to_reference_best"] = reach if reach is not None else "not reached"


# --- writing ---------------------------------------------------------------------------------------------------
def _cell(v) -> str:
    if isinstance(v, Interval):
        return v.format()
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def table_rows(summary: dict, bench: Benchmark) -> list[dict]:
    """The rows of results.md (the floor rows first)."""
    shown = [bench.primary] + [m for m in ("legible_rate", "class_coverage", f"recall[{bench.extractors[0]}]",
                                           f"precision[{bench.extractors[0]}]") if m in summary["metrics"]]
    shown += [f"fid[{e}]" for e in bench.extractors if f"fid[{e}]" != bench.primary]
    out = []
    for n, fl in sorted(summary["floors"].items()):
        out.append({"model": f"real vs real (floor, {fl['n_real']} vs {bench.n_reference})", "sampler": "",
                    "steps": "", "NFE": "", **{m: _cell(fl.get(m)) for m in shown}})
    for r in summary["rows"]:
        flag = {True: "still improving", False: "flattened", None: "-"}[r.get("still_improving")]
        out.append({"model": r["model"], "sampler": r["sampler"], "steps": r["steps"], "NFE": r["nfe"],
                    "n": r["n_samples"], "seeds": r["seeds"], **{m: _cell(r.get(m)) for m in shown},
                    "train s/step": _cell(r["cost_sec_per_step"] if r.get("cost_sec_per_step") is not None
                                          else r["train_sec_per_step"]),
                    **({"peak train MB": _cell(r["peak_train_memory_mb"])}
                       if r.get("peak_train_memory_mb") is not None else {}),
                    "s/100 img": _cell(r["seconds_per_100_images"]),
                    "curve": flag, **({"vs reference": r.get("vs_reference", "")} if bench.reference_model else {}),
                    **({"steps to reference best": _cell(r.get("steps_to_reference_best"))}
                       if bench.reference_model and bench.eval_every else {})})
    return out


def _jsonable(obj):
    if isinstance(obj, Interval):
        return obj.as_dict()
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def _plot(summary: dict, bench: Benchmark, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m for m in (bench.primary, "legible_rate") if any(m in c for c in summary["curves"].values())]
    if not metrics:
        path.unlink(missing_ok=True)                # no curves (final-only rows): no plot of an earlier run stays
        return
    xkeys = {"step": "optimisation steps", "train_seconds": "training wall-clock seconds",
             "images": "training images processed"}
    fig, axes = plt.subplots(len(metrics), 3, figsize=(16, 3.8 * len(metrics)), squeeze=False)
    for i, metric in enumerate(metrics):
        for j, xkey in enumerate(xkeys):
            ax = axes[i][j]
            for label, curves in summary["curves"].items():
                c = [p for p in curves.get(metric, []) if not math.isnan(p["mean"])]
                if not c:
                    continue
                xs = [p[xkey] for p in c]
                ax.plot(xs, [p["mean"] for p in c], marker="o", label=label)
                if any(p["ci95"] for p in c):
                    ax.fill_between(xs, [p["ci95"][0] if p["ci95"] else p["mean"] for p in c],
                                    [p["ci95"][1] if p["ci95"] else p["mean"] for p in c], alpha=0.2)
            floor = summary["floors"].get(bench.n_samples, {}).get(metric)
            if isinstance(floor, Interval) and not math.isnan(floor.mean):
                ax.axhline(floor.mean, color="grey", linestyle=":", linewidth=1, label="real vs real")
            ax.set_xlabel(xkeys[xkey])
            ax.set_ylabel(metric)
            if metric.startswith("fid"):
                ax.set_yscale("log")
            ax.grid(alpha=0.3)
            if i == 0 and j == 0:
                ax.legend(fontsize=7)
    fig.suptitle(f"{bench.title} — mean and 95% interval over {summary['seeds']} seed(s)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_outputs(bench: Benchmark, summary: dict, out_dir: Path, work: Path, started: float, quick: bool) -> None:
    from diffaccel.bench.harness import machine_info, markdown_table

    machine = machine_info()
    settings = {k: v for k, v in asdict(bench).items() if k not in ("models", "extra")}
    settings["models"] = [{k: v for k, v in asdict(m).items() if k != "setup"} | {
        "setup": getattr(m.setup, "__name__", None)} for m in bench.models]
    payload = {"benchmark": bench.name, "quick": quick, "machine": machine, "settings": settings,
               "wall_time_s_this_session": round(time.time() - started, 1), **_jsonable(summary)}
    (out_dir / "results.json").write_text(json.dumps(payload, indent=1, default=str))
    _plot(summary, bench, out_dir / "results.png")
    grids = []
    for model in bench.models:
        for sampler in model.samplers:
            src = work / slug(model.label) / "seed0" / f"grid_{slug(sampler.label)}.png"
            if src.is_file():
                name = f"samples_{slug(model.label)}_{slug(sampler.label)}.png"
                shutil.copy(src, out_dir / name)
                grids.append(f"- {model.label}, {sampler.label}: ![{name}]({name})")
    seeds = summary["seeds"]
    md = [f"# {bench.title}", "",
          f"Machine: {machine['device']}, torch {machine['torch']}, {machine['date']}. Data: {bench.data}"
          f"{f' at {bench.resolution}²' if bench.resolution else ''}; budget "
          f"{f'{bench.seconds:g} s of training per model' if bench.seconds else f'{bench.steps} steps per model'}; "
          f"{bench.n_samples} samples per evaluation against {bench.n_reference} real images; {seeds} seed(s).",
          "", markdown_table(table_rows(summary, bench)), "",
          f"Cells are mean ± half-width of the 95 % Student-t interval over {seeds} seeds (training and sampling "
          "seeds both change); with one seed no interval is given and no difference is called significant. "
          "The floor rows score two disjoint real sets of the same sizes with the same metrics: no model can be "
          "told apart from the data below them. \"still improving\": the best value of the primary metric is at "
          "the last evaluation (the curve has not flattened). \"vs reference\": better/worse only when the "
          "intervals do not overlap, n.s. otherwise. \"train s/step\" and \"peak train MB\": the median of timed "
          "trainer steps of each model in a fresh process (one model at a time; `work/cost.json` has the load "
          "average), or else the median logged during training; \"s/100 img\": wall time of the final "
          "evaluation's sampling.", ""]
    if bench.notes:
        md += [bench.notes, ""]
    if (out_dir / "results.png").is_file():
        md += ["![curves](results.png)", ""]
    if grids:
        md += ["Samples (seed 0, final network):", ""] + grids + [""]
    extra = summary.get("extra")
    if extra and extra.get("markdown"):
        md += [extra["markdown"], ""]
    (out_dir / "results.md").write_text("\n".join(md))
