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
    tmp.write_text(text)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    tmp.replace(path)


def write_config(run_dir: Path, config: dict) -> None:
    write_atomic(run_dir / "config.yaml", yaml.safe_dump(config, sort_keys=False))


def read_config(run_dir: str | Path) -> dict:
    run_dir = Path(run_dir)
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise UserError(f"{run_dir} is not a diffaccel run directory (no config.yaml)")
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(config, dict) or "method" not in config:
        raise UserError(f"{path} does not describe a diffaccel run (no 'method' entry)")
    return config


def append_metrics(run_dir: Path, record: dict) -> None:
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # a line cut by a crash mid-write
            continue
        if isinstance(record, dict):  # a damaged line may still parse, as a number or a list
            records.append(record)
    return records


def truncate_metrics(run_dir: Path, step: int) -> None:
    """Drop records after ``step`` (written after the checkpoint a resumed run restarts from)."""
    records = [r for r in read_metrics(run_dir) if r.get("step", 0) <= step]
    write_atomic(run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in records))


def load_run(run_dir: str | Path, device: str | torch.device = "cpu", checkpoint: str | Path | None = None,
             ema: bool = True):
    """(method, nets) of a run: the method rebuilt from config.yaml and its networks with (EMA) weights."""
    from diffaccel.methods import build_method

    run_dir = Path(run_dir)
    config = read_config(run_dir)
    method = build_method(config["method"], config.get("method_config"))
    nets = method.build_networks(config["train"]["net"], tuple(config["image_shape"]))
    ckpt = Path(checkpoint) if checkpoint else latest_valid(run_dir / "checkpoints")
    if ckpt is None:
        found = list_checkpoints(run_dir / "checkpoints")
        raise UserError(f"{run_dir} has no usable checkpoint" + (f" ({len(found)} broken)" if found else ""))
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
