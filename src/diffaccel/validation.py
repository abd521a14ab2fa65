"""What every command reads is checked here, before any work: files of a run directory against one schema,
OS errors turned into one line naming the path and the reason, YAML with a bound on alias expansion, and values
echoed into messages cut to a readable length.

The schemas are hand-written rather than pydantic models: pydantic is not part of the project's environment,
and the run directory has four small files whose shapes (``config.yaml``, checkpoint ``meta.json``, ``state.pt``,
``metrics.jsonl``) fit in a page of declarative tables below; the train section's schema is derived from the
:class:`~diffaccel.train.TrainConfig` dataclass itself, so the two can never disagree.
"""

from __future__ import annotations

import errno
import math
import os
import stat
import typing
from pathlib import Path

from diffaccel.errors import UserError

MAX_ECHO = 80  # characters of a user's value repeated in a message
MAX_CONFIG_BYTES = 1 << 20  # config.yaml, --config, meta.json: written by us, a few kB
MAX_METRICS_BYTES = 256 << 20
MAX_YAML_NODES = 20_000  # YAML nodes after alias expansion (a run's config has ~100)


class UnreadableError(UserError):
    """An input exists but the operating system will not let it be read (permission, loop, not a folder, ...).

    Unlike damaged content this is never a reason to fall back to an older checkpoint: the user has to fix it."""


def echo(value, limit: int = MAX_ECHO) -> str:
    """``repr(value)`` cut to ``limit`` characters (a 400-byte YAML bomb must not become a 300 MB message)."""
    text = _bounded_repr(value, limit + 1)
    return text if len(text) <= limit else text[:limit - 1] + "…"


def clip(text: str, limit: int = 160) -> str:
    """A message part (e.g. a library's exception text) cut to ``limit`` characters, on one line."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _bounded_repr(value, limit: int) -> str:
    """repr that stops early on large containers (shared references would otherwise be expanded in full)."""
    if isinstance(value, (list, tuple, dict, set)):
        parts, size = [], 0
        items = value.items() if isinstance(value, dict) else value
        for item in items:
            part = (f"{_bounded_repr(item[0], limit)}: {_bounded_repr(item[1], limit)}" if isinstance(value, dict)
                    else _bounded_repr(item, limit))
            parts.append(part)
            size += len(part) + 2
            if size > limit:
                parts.append("…")
                break
        o, c = {list: "[]", tuple: "()", dict: "{}", set: "{}"}.get(type(value), "[]")
        return o + ", ".join(parts) + c
    text = repr(value)
    return text[:limit + 1]


def os_reason(e: OSError) -> str:
    """A short human reason for an OS error (``permission denied``, ``symlink loop``, ...)."""
    reasons = {errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
               errno.ELOOP: "too many levels of symbolic links (a symlink loop)",
               errno.ENOTDIR: "a component of the path is not a folder", errno.EISDIR: "it is a folder, not a file",
               errno.ENOENT: "it does not exist", errno.ENAMETOOLONG: "the name is too long",
               errno.EROFS: "read-only file system", errno.ENOSPC: "no space left on the device"}
    return reasons.get(e.errno, e.strerror or type(e).__name__)


def read_bytes(path: str | Path, what: str, limit: int) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes; one-line UserError naming ``path`` otherwise.

    Named pipes, devices and sockets are refused before opening them (a read would block or never end)."""
    path = Path(path)
    try:
        st = os.stat(path)
        if stat.S_ISDIR(st.st_mode):
            raise UserError(f"{what} {path} is a folder, not a file")
        if not stat.S_ISREG(st.st_mode):
            kind = "a named pipe" if stat.S_ISFIFO(st.st_mode) else "not a regular file"
            raise UserError(f"{what} {path} is {kind}; refusing to read it")
        if st.st_size > limit:
            raise UserError(f"{what} {path} is {st.st_size:,} bytes, more than the {limit:,} bytes allowed")
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise UnreadableError(f"cannot read {what} {path}: {os_reason(e)}") from None
    if len(data) > limit:
        raise UserError(f"{what} {path} is more than the {limit:,} bytes allowed")
    return data


def read_text(path: str | Path, what: str, limit: int = MAX_CONFIG_BYTES) -> str:
    data = read_bytes(path, what, limit)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{what} {path} is not UTF-8 text (byte {data[e.start]:#04x} at offset {e.start})") from None


def is_dir(path: Path, what: str) -> bool:
    """``path.is_dir()``, but an OS error other than "does not exist" is a one-line UserError, not False."""
    try:
        return stat.S_ISDIR(os.stat(path).st_mode)
    except FileNotFoundError:
        return False
    except OSError as e:
        if e.errno == errno.ENOTDIR:
            return False
        raise UnreadableError(f"cannot read {what} {path}: {os_reason(e)}") from None


def list_dir(path: Path, what: str) -> list[Path]:
    try:
        return sorted(path.iterdir())
    except OSError as e:
        raise UnreadableError(f"cannot list {what} {path}: {os_reason(e)}") from None


# --- YAML with bounded alias expansion ---------------------------------------------------------------------------
def load_yaml(text: str, source: str, max_nodes: int = MAX_YAML_NODES):
    """``yaml.safe_load`` that refuses documents growing past ``max_nodes`` nodes once aliases are expanded
    (a "billion laughs" document is a few hundred bytes), counted on the composed graph before construction."""
    import yaml

    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        total = _expanded_size(node, {}, set(), max_nodes)
        if total > max_nodes:
            raise UserError(f"{source}: the YAML expands to more than {max_nodes:,} values through its aliases "
                            "(&anchor / *alias); refusing it")
        return loader.construct_document(node)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise UserError(f"{source} is not valid YAML{where}: {str(problem)[:MAX_ECHO]}") from None
    finally:
        loader.dispose()


def _expanded_size(node, memo: dict, active: set, cap: int) -> int:
    key = id(node)
    if key in memo:
        return memo[key]
    if key in active:
        raise UserError("the YAML refers to itself through an alias (a recursive structure); refusing it")
    active.add(key)
    total = 1
    if isinstance(node.value, list):
        for child in node.value:
            for sub in (child if isinstance(child, tuple) else (child,)):
                total += _expanded_size(sub, memo, active, cap)
                if total > cap:
                    break
            if total > cap:
                break
    active.discard(key)
    memo[key] = total
    return total


# --- a small declarative schema --------------------------------------------------------------------------------
class Field:
    """One entry of a mapping: its type(s), whether it must be present, and an optional check of its value."""

    def __init__(self, types, required: bool = True, check=None, why: str = ""):
        self.types = types if isinstance(types, tuple) else (types,)
        self.required, self.check, self.why = required, check, why


def _type_ok(value, types) -> bool:
    for t in types:
        if t is None and value is None:
            return True
        if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return True
        if t is int and isinstance(value, int) and not isinstance(value, bool):
            return True
        if t not in (None, float, int) and isinstance(value, t):
            return True
    return False


def _names(types) -> str:
    return " or ".join("null" if t is None else {dict: "a mapping", list: "a list"}.get(t, t.__name__) for t in types)


def check_mapping(value, schema: dict[str, Field], where: str, extra: bool = False) -> dict:
    """``value`` must be a dict whose entries fit ``schema`` (unknown keys refused unless ``extra``)."""
    if not isinstance(value, dict):
        raise UserError(f"{where} must be a mapping, got {type(value).__name__} {echo(value, 40)}")
    if not extra:
        unknown = [k for k in value if k not in schema]
        if unknown:
            raise UserError(f"{where} has unknown entries {echo(sorted(map(str, unknown)), 60)}")
    for key, f in schema.items():
        if key not in value:
            if f.required:
                raise UserError(f"{where} lacks the entry {key!r}")
            continue
        v = value[key]
        if not _type_ok(v, f.types):
            raise UserError(f"{where}: {key} must be {_names(f.types)}, got {echo(v, 40)}")
        if f.check is not None and v is not None and not f.check(v):
            raise UserError(f"{where}: {key} {f.why}, got {echo(v, 40)}")
    return value


def _positive_ints(n: int, cap: int):
    return lambda v: (len(v) == n and all(isinstance(x, int) and not isinstance(x, bool) and 1 <= x <= cap
                                          for x in v))


MAX_RESOLUTION = 4096
MAX_SHAPE = (4, MAX_RESOLUTION, MAX_RESOLUTION)


def _shape_ok(v) -> bool:
    return _positive_ints(3, MAX_RESOLUTION)(v) and v[0] <= 64


RUN_SCHEMA = {
    "method": Field(str),
    "method_config": Field((dict, None), required=False),
    "train": Field(dict),
    "image_shape": Field(list, check=_shape_ok, why=f"must be [channels, height, width] of integers in [1, "
                                                    f"{MAX_RESOLUTION}]"),
    "model_shape": Field(list, required=False, check=_shape_ok, why="must be [channels, height, width]"),
    "diffaccel_version": Field(str, required=False),
}
NET_SCHEMA = {"preset": Field(str), "overrides": Field(dict, required=False)}


def _hint_types(hint) -> tuple:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return tuple(t for a in typing.get_args(hint) for t in _hint_types(a))
    if hint is type(None):
        return (None,)
    return (origin or hint,)


def train_schema() -> dict[str, Field]:
    """The train section's schema, from TrainConfig's own field types (missing entries take its defaults)."""
    import dataclasses

    from diffaccel.train import TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    return {f.name: Field(_hint_types(hints[f.name]), required=False) for f in dataclasses.fields(TrainConfig)}


def check_run_config(config, path, rebuild: bool = True) -> dict:
    """A run's config.yaml, checked entry by entry; with ``rebuild`` the method must be a registered one and
    its settings must rebuild it (library code training its own Method subclass reads its runs without)."""
    from diffaccel.methods import METHODS

    where = str(path)
    check_mapping(config, RUN_SCHEMA, where)
    if rebuild and config["method"] not in METHODS:
        raise UserError(f"{where}: unknown method {echo(config['method'], 40)}; known: {', '.join(sorted(METHODS))}")
    check_mapping(config["train"], train_schema(), f"{where}: train")
    if "net" in config["train"]:
        net = check_mapping(config["train"]["net"], NET_SCHEMA, f"{where}: train.net")
        check_net_overrides(net.get("overrides", {}), f"{where}: train.net.overrides")
    if isinstance(config.get("method_config"), dict) and any(not isinstance(k, str) for k in config["method_config"]):
        raise UserError(f"{where}: method_config keys must be names")
    if rebuild:
        build_method_checked(config["method"], config.get("method_config"), where)
    import dataclasses

    # entries a config written before they existed lacks take TrainConfig's defaults
    return {**config, "train": dataclasses.asdict(train_config_of(config, path))}


def train_config_of(config: dict, path):
    """The TrainConfig a checked run config describes, its values validated as the trainer would."""
    from diffaccel.train import TrainConfig

    cfg = TrainConfig(**config["train"])
    try:
        cfg.validate()
    except UserError as e:
        raise UserError(f"{path}: {e}") from None
    return cfg


def build_method_checked(name: str, config: dict | None, source: str):
    """The method a run's config names, rebuilt; settings it does not take or refuses are one line."""
    from diffaccel.methods import build_method

    try:
        return build_method(name, config)
    except UserError as e:
        raise UserError(f"{source}: method {name!r}: {e}") from None
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise UserError(f"{source}: method_config does not rebuild method {name!r}: {clip(e)}") from None


def build_networks_checked(method, net_cfg: dict, image_shape, source: str = "--net-config"):
    """``method.build_networks`` with the constructors' own complaints (unknown argument, bad width) as one line."""
    check_net_overrides(net_cfg.get("overrides", {}), source)
    try:
        return method.build_networks(net_cfg, tuple(image_shape))
    except UserError:
        raise
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, AssertionError, ZeroDivisionError,
            RuntimeError) as e:
        raise UserError(f"{source} {echo(net_cfg.get('overrides', {}), 60)}: the network cannot be built "
                        f"({type(e).__name__}: {clip(e)})") from None


def check_net_overrides(overrides, source: str) -> None:
    """--net-config: a mapping of names to values whose numbers are finite and not negative."""
    if not isinstance(overrides, dict):
        raise UserError(f"{source} must be a JSON object of network arguments, got {echo(overrides, 40)}")

    def walk(v, key):
        if isinstance(v, bool) or v is None or isinstance(v, str):
            return
        if isinstance(v, (int, float)):
            if not math.isfinite(v) or v < 0:
                raise UserError(f"{source}: {key} must hold finite numbers >= 0, got {echo(v, 40)}")
            if isinstance(v, int) and v > 1 << 20:
                raise UserError(f"{source}: {key} = {v} is larger than {1 << 20:,}")
            return
        if isinstance(v, (list, tuple)):
            if len(v) > 64:
                raise UserError(f"{source}: {key} has {len(v)} entries, more than 64")
            for x in v:
                walk(x, key)
            return
        if isinstance(v, dict):
            for k, x in v.items():
                walk(x, f"{key}.{k}")
            return
        raise UserError(f"{source}: {key} has a value of type {type(v).__name__}")

    for key, value in overrides.items():
        if not isinstance(key, str):
            raise UserError(f"{source}: argument names must be text, got {echo(key, 40)}")
        walk(value, key)
        if key.endswith("channels") and isinstance(value, (list, tuple)) and any(
                isinstance(x, (int, float)) and x < 1 for x in value):
            raise UserError(f"{source}: {key} widths must be >= 1, got {echo(value, 40)}")
        if key.endswith("channels") and isinstance(value, (int, float)) and not isinstance(value, bool) and value < 1:
            raise UserError(f"{source}: {key} must be >= 1, got {value}")


# --- checkpoint meta.json and state.pt --------------------------------------------------------------------------
_SHA = lambda v: len(v) == 64 and all(c in "0123456789abcdef" for c in v)  # noqa: E731
META_SCHEMA = {"method": Field(str), "step": Field(int, check=lambda v: v >= 0, why="must be >= 0"),
               "sha256": Field(dict), "diffaccel_version": Field(str, required=False)}


def check_meta(meta, path, files) -> dict:
    check_mapping(meta, META_SCHEMA, str(path))
    check_mapping(meta["sha256"], {f: Field(str, check=_SHA, why="must be a SHA-256 hex digest") for f in files},
                  f"{path}: sha256")
    return meta


def _tensor():
    import torch

    return torch.Tensor


def check_state(state, path) -> dict:
    """The trainer's state.pt: step counters, data order, RNG states, optimiser and EMA states."""
    T = _tensor()
    where = str(path)
    check_mapping(state, {
        "step": Field(int, check=lambda v: v >= 0, why="must be >= 0"),
        "nonfinite": Field(int, check=lambda v: v >= 0, why="must be >= 0"),
        "data": Field(dict), "rng": Field(list, check=lambda v: len(v) >= 1, why="must not be empty"),
        "optimizers": Field(dict), "ema_n_averaged": Field(dict), "scaler": Field((dict, None), required=False),
    }, where)
    check_mapping(state["data"], {"generator": Field(T), "perm": Field(T, check=lambda v: v.ndim == 1,
                                                                        why="must be one-dimensional"),
                                  "pos": Field(int, check=lambda v: v >= 0, why="must be >= 0"),
                                  "epoch": Field(int, check=lambda v: v >= 0, why="must be >= 0")}, f"{where}: data")
    for i, rng in enumerate(state["rng"]):
        check_mapping(rng, {"torch": Field(T), "numpy": Field(T), "numpy_pos": Field(int), "python": Field(str),
                            "cuda": Field(list, required=False)}, f"{where}: rng[{i}]")
    for name, opt in state["optimizers"].items():
        check_mapping(opt, {"state": Field(dict), "param_groups": Field(list)}, f"{where}: optimizers.{name}",
                      extra=True)
    for name, n in state["ema_n_averaged"].items():
        if not isinstance(n, T):
            raise UserError(f"{where}: ema_n_averaged.{name} must be a tensor")
    return state


def check_state_fits(state: dict, path, optimizers, ema, dataset_size: int) -> None:
    """The state belongs to this trainer: same optimiser phases, EMA networks and data size."""
    for what, have, want in (("optimizers", state["optimizers"], optimizers),
                             ("ema_n_averaged", state["ema_n_averaged"], ema)):
        if set(have) != set(want):
            raise UserError(f"{path}: {what} are for {sorted(have)}, this method has {sorted(want)}")
    perm = state["data"]["perm"]
    if perm.numel() != dataset_size or (perm.numel() and (int(perm.min()) < 0 or int(perm.max()) >= dataset_size)):
        raise UserError(f"{path}: the data order is for {perm.numel()} images, the data now has {dataset_size} "
                        "(--data, --data-limit and the data itself must stay as they were)")
    if state["data"]["pos"] > perm.numel():
        raise UserError(f"{path}: data position {state['data']['pos']} is past the {perm.numel()} images")


def check_metrics_record(record) -> bool:
    """A metrics.jsonl line as the readers use it: an object whose ``step``, if present, is an integer."""
    return isinstance(record, dict) and (
        "step" not in record or (isinstance(record["step"], int) and not isinstance(record["step"], bool)))


def newest_problem(checkpoints: list) -> str:
    """Why the newest of some broken checkpoints is broken (for "no usable checkpoint" messages)."""
    from diffaccel.checkpoint import verify

    try:
        verify(checkpoints[-1])
    except UserError as e:
        return clip(e, 300)
    return "it verifies now"


# --- outputs: checked before any work, so that a refusal leaves nothing behind ---------------------------------
def _nearest_existing(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not os.path.lexists(path) and path != path.parent:
        path = path.parent
    return path


def _probe_writable(folder: Path, flag: str, target: Path) -> None:
    import tempfile

    try:
        fd, probe = tempfile.mkstemp(prefix=".diffaccel-probe-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"{flag} {target}: cannot write in {folder}: {os_reason(e)}") from None


def check_output_file(path: str | Path, flag: str) -> Path:
    """``path`` can be written as a file: not a folder, and its nearest existing parent is a writable folder
    (folders still missing would be created). Nothing is left behind by the check."""
    path = Path(path)
    try:
        if path.is_dir():
            raise UserError(f"{flag} {path} is a folder; give a file name")
        if os.path.lexists(path) and not path.is_file():
            raise UserError(f"{flag} {path} exists and is not a regular file")
    except OSError as e:
        raise UserError(f"{flag} {path}: {os_reason(e)}") from None
    parent = _nearest_existing(path.parent)
    if not parent.is_dir():
        raise UserError(f"{flag} {path}: {parent} is a file, not a folder")
    _probe_writable(parent, flag, path)
    return path


def check_output_folder(path: str | Path, flag: str) -> Path:
    """``path`` is (or can be created as) a writable folder; nothing is created by the check."""
    path = Path(path)
    if os.path.lexists(path) and not path.is_dir():
        raise UserError(f"{flag} {path} is a file, not a folder")
    parent = _nearest_existing(path)
    if not parent.is_dir():
        raise UserError(f"{flag} {path}: {parent} is a file, not a folder")
    _probe_writable(parent, flag, path)
    return path


def check_extractor(name: str, image_shape, weights_path=None) -> None:
    """The feature extractor ``name`` can score images of ``image_shape`` (built once on the CPU, cached, so a
    missing weights file or an unsuitable image size is refused before any sampling)."""
    from diffaccel.metrics.features import EXTRACTORS, cached_extractor

    if name not in EXTRACTORS:
        raise UserError(f"unknown feature extractor {echo(name, 40)}; choose one of: {', '.join(EXTRACTORS)}")
    if name == "digits" and int(image_shape[0]) != 1:
        raise UserError(f"the digits extractor scores 1-channel digit images, these have {image_shape[0]} "
                        "channels; use --extractor effnet")
    cached_extractor(name, "cpu", int(image_shape[-1]), None, str(weights_path) if weights_path else None)


# --- memory ------------------------------------------------------------------------------------------------------
def available_memory() -> int:
    """Bytes this process may still allocate: $DIFFACCEL_MEMORY_LIMIT if set (tests, shared machines), else the
    kernel's MemAvailable (plus a cgroup limit when one is lower), else 8 GiB."""
    env = os.environ.get("DIFFACCEL_MEMORY_LIMIT")
    if env:
        try:
            return int(parse_size(env))
        except ValueError:
            raise UserError(f"$DIFFACCEL_MEMORY_LIMIT must be a size such as 4GB or 500MB, got {echo(env, 40)}") \
                from None
    found = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    for cgroup in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(cgroup).read_text().strip()
            if text.isdigit() and int(text) < 1 << 60:
                found.append(int(text))
        except OSError:
            pass
    return min(found) if found else 8 << 30


def parse_size(text: str) -> float:
    units = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "kib": 1 << 10, "mib": 1 << 20,
             "gib": 1 << 30, "tib": 1 << 40}
    t = text.strip().lower().replace(" ", "")
    number = t.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = t[len(number):]
    if unit not in units or not number:
        raise ValueError(text)
    value = float(number) * units[unit]
    if not math.isfinite(value) or value <= 0:
        raise ValueError(text)
    return value


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1000 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} PB"


def data_cap() -> int:
    """The most bytes of images a dataset file may hold once decoded: half the available memory (the other half
    is for the networks, the batches and the float copy of a batch)."""
    return available_memory() // 2


def check_data_size(nbytes: int, path, what: str = "images") -> None:
    cap = data_cap()
    if nbytes > cap:
        raise UserError(f"{path}: {what} would take {human_bytes(nbytes)} in memory, more than the "
                        f"{human_bytes(cap)} cap (half the available memory)")


# --- the pre-flight check: a configuration's memory, estimated before anything is allocated -------------------
def _is_meta_limitation(e: Exception) -> bool:
    """True when an error is the meta device's (an op without a shape-only kernel), not the configuration's."""
    text = str(e).lower()
    return isinstance(e, NotImplementedError) or "meta" in text


def preflight(method, net_cfg: dict, image_shape, micro_batch: int, device=None) -> dict:
    """Estimate the memory one training step of this configuration takes, before allocating any of it.

    The networks are built on PyTorch's ``meta`` device (shapes only, no storage) and every phase's loss is run
    once on a meta batch of ``micro_batch`` images, with forward hooks summing the bytes of every module output:
    the activations kept for the backward pass, which for KL diffusion include its M network calls. The estimate
    is ``5 × parameter bytes`` (weights, gradients, two AdamW moments, the EMA copy) ``+ 2 × activation bytes``
    (kept activations and their gradients). A loss the meta device cannot run (an op without a shape-only
    kernel) leaves the activation part unknown, and the check falls back to the parameters alone.

    A configuration that cannot even run on the meta batch (a shape mismatch from --net-config) is refused here,
    with the error, before a run directory exists; one whose estimate exceeds :func:`available_memory` (the GPU's
    free memory on CUDA) is refused with the estimate. Returns ``{"parameters", "parameter_bytes",
    "activation_bytes", "estimate_bytes", "available_bytes"}``.
    """
    import torch

    with torch.device("meta"):
        nets = build_networks_checked(method, net_cfg, tuple(image_shape))
    parameters = sum(p.numel() for net in nets.values() for p in net.parameters())
    parameter_bytes = sum(p.numel() * p.element_size() for net in nets.values() for p in net.parameters())
    activation = [0]

    def hook(_module, _inputs, output):
        for t in output if isinstance(output, (tuple, list)) else (output,):
            if isinstance(t, torch.Tensor):
                activation[0] += t.numel() * t.element_size()

    handles = [m.register_forward_hook(hook) for net in nets.values() for m in net.modules()]
    activation_bytes = None
    try:
        x0 = torch.zeros(micro_batch, *tuple(image_shape), device="meta")
        for phase in method.phases():
            phase.loss_fn(nets, x0, 0)
        activation_bytes = activation[0]
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - either a limitation of the meta device or a broken configuration
        if not _is_meta_limitation(e):
            raise UserError(f"this configuration fails on its first batch, before any training "
                            f"({type(e).__name__}: {clip(e)}); check --net-config and the method's settings") \
                from None
    finally:
        for h in handles:
            h.remove()
    estimate = 5 * parameter_bytes + 2 * (activation_bytes or 0)
    if os.environ.get("DIFFACCEL_MEMORY_LIMIT") is None and device is not None and \
            getattr(device, "type", str(device)) == "cuda" and torch.cuda.is_available():
        available, where = torch.cuda.mem_get_info(device)[0], "free on the GPU"
    else:
        available, where = available_memory(), "available"
    report = {"parameters": parameters, "parameter_bytes": parameter_bytes, "activation_bytes": activation_bytes,
              "estimate_bytes": estimate, "available_bytes": available}
    if estimate > available:
        acts = (f"{human_bytes(2 * activation_bytes)} for the activations of a micro-batch of {micro_batch}"
                if activation_bytes is not None else "activations not estimated")
        raise UserError(f"this configuration needs about {human_bytes(estimate)} of memory "
                        f"({parameters:,} parameters: {human_bytes(5 * parameter_bytes)} with gradients, optimiser "
                        f"and EMA; {acts}), more than the {human_bytes(available)} {where}; use a smaller "
                        "--batch-size (or --grad-accum), --preset, --resolution or method setting")
    return report


# --- experiment tracking -----------------------------------------------------------------------------------------
TRACKERS = {"tensorboard": ("tensorboard", "diffaccel[tensorboard]")}  # --log-with name: (module, what to install)


def check_tracker(name: str | None) -> None:
    """``--log-with NAME`` names a tracker diffaccel logs to and whose package is installed (refused before any
    data is read, not at the first logged step)."""
    if name is None:
        return
    import importlib.util

    if name not in TRACKERS:
        raise UserError(f"--log-with must be one of: {', '.join(TRACKERS)}; got {echo(name, 40)}")
    module, extra = TRACKERS[name]
    if importlib.util.find_spec(module) is None:
        raise UserError(f"--log-with {name} needs the {module} package, which is not installed: "
                        f"pip install '{extra}'")
