"""Run directories: ``config.yaml``, ``metrics.jsonl``, ``checkpoints/``, ``samples/``, plots and a report."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import yaml

from diffaccel.checkpoint import latest_valid, list_checkpoints, load_checkpoint, load_into
from diffaccel.errors import UserError


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        tmp.replace(path)
    except BaseException:  # nothing half-written is left beside the target
        tmp.unlink(missing_ok=True)
        raise


def write_config(run_dir: Path, config: dict) -> None:
    write_atomic(run_dir / "config.yaml", yaml.safe_dump(config, sort_keys=False))


def read_config(run_dir: str | Path, rebuild: bool = True) -> dict:
    """A run's config.yaml, read and checked against the run schema (:mod:`diffaccel.validation`); ``rebuild``
    also requires its method to be registered and its settings to rebuild it."""
    from diffaccel.validation import check_run_config, load_yaml, read_text

    run_dir = Path(run_dir)
    check_run_dir(run_dir)
    path = run_dir / "config.yaml"
    if not os.path.lexists(path):
        raise UserError(f"{run_dir} is not a diffaccel run directory (no config.yaml)")
    config = load_yaml(read_text(path, "run config"), str(path))
    if not isinstance(config, dict) or "method" not in config:
        raise UserError(f"{path} does not describe a diffaccel run (no 'method' entry)")
    return check_run_config(config, path, rebuild)


def check_run_dir(run_dir: Path) -> None:
    """``run_dir`` names an existing folder (else one line saying what it is instead)."""
    from diffaccel.validation import UnreadableError, os_reason

    try:
        st = os.stat(run_dir)
    except FileNotFoundError:
        raise UserError(f"{run_dir} is not a diffaccel run directory (it does not exist)") from None
    except OSError as e:
        raise UnreadableError(f"cannot read run directory {run_dir}: {os_reason(e)}") from None
    import stat

    if not stat.S_ISDIR(st.st_mode):
        raise UserError(f"{run_dir} is a file, not a run directory")


def append_metrics(run_dir: Path, record: dict) -> None:
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The records of metrics.jsonl; lines cut by a crash mid-write or otherwise damaged are skipped, but a
    file that is not text at all (or cannot be read) is a one-line error."""
    from diffaccel.validation import MAX_METRICS_BYTES, check_metrics_record, read_text

    path = Path(run_dir) / "metrics.jsonl"
    if not os.path.lexists(path):
        return []
    records = []
    for line in read_text(path, "metrics file", MAX_METRICS_BYTES).splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # a line cut by a crash mid-write
            continue
        if check_metrics_record(record):  # a damaged line may still parse, as a number or a list
            records.append(record)
    return records


def truncate_metrics(run_dir: Path, step: int) -> None:
    """Drop records after ``step`` (written after the checkpoint a resumed run restarts from)."""
    records = [r for r in read_metrics(run_dir) if r.get("step", 0) <= step]
    write_atomic(run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in records))


def build_run(run_dir: str | Path, config: dict | None = None):
    """(method, nets) as config.yaml describes them, the networks freshly initialised (no weights read)."""
    from diffaccel.validation import build_method_checked, build_networks_checked

    config = config or read_config(run_dir)
    source = str(Path(run_dir) / "config.yaml")
    method = build_method_checked(config["method"], config.get("method_config"), source)
    nets = build_networks_checked(method, config["train"].get("net", {"preset": "small"}), config["image_shape"],
                                  f"{source}: train.net")
    return method, nets


def load_run(run_dir: str | Path, device: str | torch.device = "cpu", checkpoint: str | Path | None = None,
             ema: bool = True):
    """(method, nets) of a run: the method rebuilt from config.yaml and its networks with (EMA) weights."""
    run_dir = Path(run_dir)
    config = read_config(run_dir)
    method, nets = build_run(run_dir, config)
    ckpt = Path(checkpoint) if checkpoint else latest_valid(run_dir / "checkpoints")
    if ckpt is None:
        found = list_checkpoints(run_dir / "checkpoints")
        if found:
            from diffaccel.validation import newest_problem

            raise UserError(f"{run_dir} has no usable checkpoint ({len(found)} broken; the newest: "
                            f"{newest_problem(found)})")
        raise UserError(f"{run_dir} has no usable checkpoint")
    meta, weights, ema_weights, _ = load_checkpoint(ckpt)
    if meta.get("method") != config["method"]:
        raise UserError(f"checkpoint {ckpt} is from method {meta.get('method')!r}, the run is {config['method']!r}")
    load_into(nets, weights, ckpt / "weights.safetensors")
    if ema:
        load_into({k: nets[k] for k in method.ema_networks}, ema_weights, ckpt / "ema.safetensors")
    for net in nets.values():
        net.to(device).eval()
    method.run_dir = run_dir
    return method, nets
