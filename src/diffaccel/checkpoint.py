"""Checkpoints that are never half-written, never unpickle code, and say clearly when they are broken.

A checkpoint is a folder ``step_XXXXXXX/`` holding ``weights.safetensors`` (every network), ``ema.safetensors``
(the EMA networks), ``state.pt`` (optimisers, scaler, RNG and data-order state: tensors and plain containers,
loaded with ``weights_only=True``) and ``meta.json`` (method, step and the SHA-256 of each file). It is written in a
temporary folder, flushed to disk and renamed into place, so an interrupted write never replaces a good one.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from diffaccel.errors import UserError

FILES = ("weights.safetensors", "ema.safetensors", "state.pt")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def flatten(nets: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    """One flat tensor dict ``{"net.layer.weight": …}`` for all networks (contiguous CPU copies)."""
    return {f"{name}.{k}": v.detach().cpu().contiguous() for name, net in nets.items()
            for k, v in net.state_dict().items()}


def load_into(nets: dict[str, torch.nn.Module], tensors: dict[str, torch.Tensor], source: Path) -> None:
    """Load flat tensors into networks, refusing any mismatch of names or shapes with a message saying which."""
    for name, net in nets.items():
        prefix = f"{name}."
        sub = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        if not sub:
            raise UserError(f"{source} holds no weights for network {name!r} "
                            f"(it has: {sorted({k.split('.')[0] for k in tensors})}); is it from another method?")
        own = net.state_dict()
        missing, unexpected = sorted(set(own) - set(sub)), sorted(set(sub) - set(own))
        wrong = [k for k in own if k in sub and own[k].shape != sub[k].shape]  # network order: the first layer that differs
        if missing or unexpected or wrong:
            detail = "; ".join(s for s in (
                f"missing {missing[:3]}" if missing else "", f"unexpected {unexpected[:3]}" if unexpected else "",
                f"shape of {wrong[0]} is {tuple(sub[wrong[0]].shape)} here but {tuple(own[wrong[0]].shape)} in "
                f"the network" if wrong else "") if s)
            raise UserError(f"{source}: weights of {name!r} do not fit this network architecture ({detail})")
        net.load_state_dict(sub, strict=True)


def save_checkpoint(ckpt_root: Path, step: int, meta: dict, weights: dict[str, torch.Tensor],
                    ema: dict[str, torch.Tensor], state: dict, keep: int = 2) -> Path:
    """Write checkpoint ``step`` atomically and keep the newest ``keep`` ones."""
    final = ckpt_root / f"step_{step:07d}"
    tmp = ckpt_root / f".tmp_step_{step:07d}"
    old = ckpt_root / f".old_step_{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        save_file(weights, tmp / "weights.safetensors")
        save_file(ema, tmp / "ema.safetensors")
        torch.save(state, tmp / "state.pt")
        meta = {**meta, "step": step, "sha256": {f: _sha256(tmp / f) for f in FILES}}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        for f in (*FILES, "meta.json"):
            with open(tmp / f, "rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():  # same step written again (e.g. after a resume): move the old one aside first
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
        _fsync_dir(ckpt_root)
    except BaseException as e:
        # whatever stopped the write (disk full, a read-only folder, a serializer failing half-way, Ctrl-C),
        # the finished checkpoints stay as they were: drop the partial copy, put a moved-aside one back
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not final.exists():
            old.rename(final)
        if not isinstance(e, Exception):
            raise
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e) or type(e).__name__
        raise UserError(f"could not write checkpoint {final} ({reason}); "
                        "the previous checkpoints are intact") from None
    for old in list_checkpoints(ckpt_root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Finished checkpoints, oldest first (temporary folders of interrupted writes are ignored)."""
    from diffaccel.validation import is_dir, list_dir

    if not is_dir(ckpt_root, "checkpoint folder"):
        if os.path.lexists(ckpt_root) and not os.path.isdir(ckpt_root):
            raise UserError(f"{ckpt_root} is a file, not a folder of checkpoints")
        return []
    return [p for p in list_dir(ckpt_root, "checkpoint folder")
            if p.name.startswith("step_") and is_dir(p, "checkpoint")]


def verify(ckpt: Path) -> dict:
    """The checkpoint's meta if every file is present and matches its checksum; UserError naming the file if not.

    A file the system will not let us read raises :class:`~diffaccel.validation.UnreadableError` (not a reason to
    fall back to an older checkpoint)."""
    from diffaccel.validation import MAX_CONFIG_BYTES, UnreadableError, check_meta, os_reason, read_text

    meta_path = ckpt / "meta.json"
    if not os.path.isdir(ckpt):
        what = "does not exist" if not os.path.lexists(ckpt) else "is not a checkpoint folder"
        raise UserError(f"checkpoint {ckpt} {what} (a checkpoint is a folder checkpoints/step_N of a run)")
    try:
        text = read_text(meta_path, "checkpoint file", MAX_CONFIG_BYTES)
        meta = check_meta(json.loads(text), "meta.json", FILES)
    except UnreadableError as e:
        if isinstance(e.__context__, FileNotFoundError) or not os.path.lexists(meta_path):
            raise UserError(f"checkpoint {ckpt} is unreadable: {meta_path.name}: it is missing") from None
        raise
    except ValueError as e:
        raise UserError(f"checkpoint {ckpt} is unreadable: {meta_path.name}: {e}") from None
    except UserError as e:
        raise UserError(f"checkpoint {ckpt} is unreadable: {e}") from None
    for f in FILES:
        path = ckpt / f
        if not os.path.lexists(path):
            raise UserError(f"checkpoint {ckpt} is incomplete: {f} is missing")
        try:
            if not path.is_file():
                raise UserError(f"checkpoint {ckpt}: {f} is not a regular file")
            digest = _sha256(path)
        except OSError as e:
            raise UnreadableError(f"cannot read checkpoint file {path}: {os_reason(e)}") from None
        if digest != meta["sha256"][f]:
            raise UserError(f"checkpoint file {path} is corrupted or truncated (checksum mismatch)")
    return meta


def load_checkpoint(ckpt: Path, map_location="cpu") -> tuple[dict, dict, dict, dict]:
    """(meta, weights, ema, state) of a verified checkpoint; state is loaded with ``weights_only=True`` and
    checked against the state schema."""
    from diffaccel.validation import check_state

    meta = verify(ckpt)
    try:
        weights = load_file(ckpt / "weights.safetensors", device=str(map_location))
        ema = load_file(ckpt / "ema.safetensors", device=str(map_location))
    except (SafetensorError, RuntimeError, OSError, EOFError) as e:
        raise UserError(f"checkpoint {ckpt} cannot be loaded: {e}") from None
    path = ckpt / "state.pt"
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if "Unsupported global" in str(e):
            # weights_only refused a global: the file would run code when unpickled
            raise UserError(f"checkpoint file {path} holds objects other than tensors and plain "
                            "containers; refusing to unpickle it (it could run arbitrary code)") from None
        raise UserError(f"checkpoint file {path} is not a torch state file (its bytes do not unpickle)") from None
    except (RuntimeError, OSError, EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError,
            UnicodeDecodeError, OverflowError, MemoryError) as e:
        reason = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        raise UserError(f"checkpoint file {path} cannot be loaded: {reason}") from None
    check_state(state, path)
    return meta, weights, ema, state


def latest_valid(ckpt_root: Path, log=print) -> Path | None:
    """The newest checkpoint that verifies; broken newer ones are reported and skipped."""
    from diffaccel.validation import UnreadableError

    for ckpt in reversed(list_checkpoints(ckpt_root)):
        try:
            verify(ckpt)
            return ckpt
        except UnreadableError:  # permission, symlink loop: the user must fix it, an older one is no answer
            raise
        except UserError as e:
            log(f"warning: {e}; falling back to the previous checkpoint")
    return None
