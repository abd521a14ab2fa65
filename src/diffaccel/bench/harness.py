"""Writing benchmark results: ``results.json`` (with the machine), a PNG plot and a markdown table."""

from __future__ import annotations

import datetime
import json
import os
import platform
import time
from pathlib import Path
from typing import Callable

import torch


def machine_info() -> dict:
    """Where a measurement was taken: CPU model and cores, GPU, library versions, date."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    try:
        import diffusers

        info["diffusers"] = diffusers.__version__
    except ImportError:
        pass
    info["device"] = info["cuda"] or f"CPU: {cpu} ({os.cpu_count()} cores)"
    return info


def markdown_table(rows: list[dict], floatfmt: str = ".4g") -> str:
    if not rows:
        return ""
    cols = list(dict.fromkeys(k for r in rows for k in r))

    def fmt(v):
        if isinstance(v, float):
            return format(v, floatfmt)
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def write_results(out_dir: str | Path, name: str, results: dict, table_rows: list[dict],
                  plot_fn: Callable | None = None, notes: str = "", started: float | None = None,
                  figsize: tuple[float, float] = (7, 4.5)) -> Path:
    """Write ``results.json``, ``results.md`` and (if ``plot_fn(fig)`` is given) ``results.png`` into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    payload = {"benchmark": name, "machine": machine, **results}
    if started is not None:
        payload["wall_time_s"] = round(time.time() - started, 1)
    (out_dir / "results.json").write_text(json.dumps(payload, indent=1, default=float))
    md = [f"# Benchmark `{name}`", "", f"Machine: {machine['device']}, torch {machine['torch']}, {machine['date']}"
          + (f", wall time {payload['wall_time_s']} s" if "wall_time_s" in payload else ""), "",
          markdown_table(table_rows), ""]
    if notes:
        md += [notes, ""]
    if plot_fn is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig = plt.figure(figsize=figsize)
        plot_fn(fig)
        fig.tight_layout()
        fig.savefig(out_dir / "results.png", dpi=100)
        plt.close(fig)
        md.append("![results](results.png)")
    (out_dir / "results.md").write_text("\n".join(md) + "\n")
    return out_dir
