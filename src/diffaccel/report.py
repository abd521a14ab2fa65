"""The run's loss/metric plot and short markdown report, rebuilt from metrics.jsonl."""

from __future__ import annotations

from pathlib import Path

from diffaccel.runs import read_config, read_metrics, write_atomic


def plot_run(run_dir: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    loss_keys = sorted({k for r in records for k in r if k.startswith("loss")})
    # FID only: KID lives on another scale and would flatten the curve (the KL paper's Figure 2 plots FID)
    eval_keys = sorted({k for r in records for k in r if k.startswith("fid[")})
    if not loss_keys:
        return None
    fig, axes = plt.subplots(1, 1 + bool(eval_keys), figsize=(6 + 5 * bool(eval_keys), 4), squeeze=False)
    ax = axes[0, 0]
    for k in loss_keys:
        pts = [(r["step"], r[k]) for r in records if k in r]
        ax.plot(*zip(*pts), label=k)
    ax.set_xlabel("optimisation step")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    if eval_keys:
        ax = axes[0, 1]
        for k in eval_keys:
            pts = [(r["step"], r[k]) for r in records if k in r]
            ax.plot(*zip(*pts), marker="o", label=k)
        ax.set_xlabel("optimisation step")
        ax.set_ylabel("FID (lower is better)")
        ax.set_yscale("log")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(run_dir.name)
    fig.tight_layout()
    path = run_dir / "loss.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(run_dir: Path) -> Path:
    """loss.png and report.md: method, settings, last losses and metrics, where the samples are."""
    config = read_config(run_dir, rebuild=False)
    records = read_metrics(run_dir)
    plot = plot_run(run_dir)
    train = config["train"]
    last = next((r for r in reversed(records) if any(k.startswith("loss") for k in r)), {})
    evals = [r for r in records if any("[" in k for k in r)]
    times = [r["sec_per_step"] for r in records if "sec_per_step" in r]
    lines = [f"# Run `{run_dir.name}`", "",
             f"- method: **{config['method']}** {config.get('method_config') or ''}",
             f"- data: `{train['data']}` at {config['image_shape']}, batch {train['batch_size']}, "
             f"lr {train['lr']}, EMA {train['ema_decay']}, seed {train['seed']}",
             f"- network: {train['net']}",
             f"- steps: {last.get('step', 0)} of {train['steps']}"
             + (f", median {sorted(times)[len(times) // 2]:.3f} s/step" if times else ""),
             "- last losses: " + ", ".join(f"{k} {v:.4g}" for k, v in last.items() if k.startswith("loss"))]
    if evals:
        lines.append("- last evaluation: " + ", ".join(f"{k} {v:.4g}" for k, v in evals[-1].items()
                                                        if isinstance(v, float)))
    lines += ["", "![samples](samples.png)" if (run_dir / "samples.png").exists() else "",
              "![loss](loss.png)" if plot else ""]
    path = run_dir / "report.md"
    write_atomic(path, "\n".join(lines) + "\n")
    return path
