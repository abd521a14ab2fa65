"""``diffaccel train | sample | eval | export | bench | info | doctor | pds-filter``."""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import sys
import time
from pathlib import Path

from diffaccel.errors import UserError

EPILOG = """examples:
  diffaccel train --method baseline --data mnist5k --steps 2000 --out runs/baseline
  diffaccel train --method kl --kl-terms 8 --time-steps 20 --out runs/kl8
  diffaccel train --resume --out runs/kl8 --steps 4000
  diffaccel sample runs/kl8 --n 64 --sampler ddim --steps 20 --eta 1
  diffaccel eval runs/kl8 --n 10000 --extractor effnet
  diffaccel export runs/baseline exported/baseline   # a diffusers DDIMPipeline folder
  diffaccel bench kl
"""


class _SharedFlags:
    """An argument group where a flag already added by another method is silently shared, not redefined."""

    def __init__(self, group, seen: set[str]):
        self.group, self.seen = group, seen

    def add_argument(self, *names, **kwargs):
        if any(n in self.seen for n in names):
            return None
        self.seen.update(names)
        return self.group.add_argument(*names, **kwargs)

    def __getattr__(self, name):
        return getattr(self.group, name)



class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line (the usage is one `--help` away), exit status 2."""

    def error(self, message: str):
        from diffaccel.validation import clip

        for action in self._actions:  # "argument --x: --x must be ..." reads better as "--x must be ..."
            for flag in action.option_strings:
                message = message.replace(f"argument {flag}: {flag} ", f"{flag} ")
        self.exit(2, f"diffaccel: error: {clip(message, 300)} (see `{self.prog} --help`)\n")


# numeric flags: floats must be finite, and every number lies in [low, high] (defaults: [0, 2**31 - 1]); a
# method or the trainer may check tighter bounds with their own messages
INT_MAX = 2**31 - 1
FLOAT_MAX = 1e30  # far below float32's 3.4e38, so that a value and its square stay representable in the tensors
BOUNDS: dict[str, tuple[float, float] | None] = {
    "seed": (0, 2**32 - 1), "batch_size": (0, 1 << 16), "n": (0, 10**7), "eval_n": (0, 10**7),
    "resolution": (0, 4096), "kl_terms": (0, 1024), "kl_partial": (0, 1024), "latent_channels": (0, 1024),
    "nz": (0, 1 << 14), "corrector_steps": (0, 1000), "steps_each": (0, 1000), "seeds": (0, 1000),
    "images": (0, 10**6), "steps_T": (0, 1000), "num_scales": (0, 10**6), "time_steps": (0, 10**6),
    # checked by the trainer / loader with their own messages
    "sigma_max": (0, 1e5), "lr": None, "data_limit": None,
}


def _bounded(action: argparse.Action):
    kind, flag, dest = action.type, action.option_strings[0], action.dest
    low, high = BOUNDS.get(dest, (0, INT_MAX if kind is int else FLOAT_MAX))

    def convert(text):
        value = kind(text)  # argparse turns a ValueError into "invalid int value"
        if kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{flag} must be a finite number, got {text}")
        if not low <= value <= high:
            bound = f">= {low}" if high == INT_MAX else f"in [{low}, {high:g}]"
            raise argparse.ArgumentTypeError(f"{flag} must be {bound}, got {text}")
        return value

    convert.__name__ = kind.__name__  # argparse names the type in its own messages
    return convert


def _bound_numeric_flags(parser: argparse.ArgumentParser) -> None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _bound_numeric_flags(sub)
        elif action.type in (int, float) and action.option_strings and BOUNDS.get(action.dest, ()) is not None:
            action.type = _bounded(action)


def _eta(text: str) -> float:
    """DDIM's η scales the posterior's standard deviation: outside [0, 1] (or NaN) the step's variance is invalid."""
    value = float(text)
    if not 0.0 <= value <= 1.0:  # also false for NaN
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1], got {text}")
    return value

class _ReadRecorder:
    """Stands in for the parsed arguments and records which of them are read: what a method actually uses."""

    def __init__(self, namespace: argparse.Namespace):
        self.__dict__.update(_namespace=namespace, read=set())

    def __getattr__(self, name):
        self.__dict__["read"].add(name)
        return getattr(self.__dict__["_namespace"], name)


def _explicit_dests(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The destinations of the flags the user typed (defaults suppressed, so only given ones are set)."""
    sub = parser._subparsers._group_actions[0].choices[parser.parse_args(argv).command]
    saved, saved_defaults = [(a, a.default) for a in sub._actions], sub._defaults
    try:
        for a, _ in saved:
            a.default = argparse.SUPPRESS
        sub._defaults = {}
        given = set(vars(parser.parse_args(argv)))
    finally:
        for a, default in saved:
            a.default = default
        sub._defaults = saved_defaults
    return given - {"command"}


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _refuse_unread(given: set[str], allowed: set[str], what: str, hint: str = "") -> None:
    unread = sorted(given - allowed)
    if unread:
        flags = ", ".join(_flag(d) for d in unread)
        raise UserError(f"{flags} {'is' if len(unread) == 1 else 'are'} not used by {what}{hint}; "
                        "drop it rather than have it ignored")


def _method_classes():
    from diffaccel.methods import METHODS, method_class

    return {name: method_class(name) for name in METHODS}


def _add_train_parser(sub) -> argparse.ArgumentParser:
    from diffaccel.nets.unet import PRESETS
    from diffaccel.train import LR_SCHEDULES, TrainConfig

    d = TrainConfig()
    p = sub.add_parser("train", help="train a model (any method) into a run directory",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       description="Train a diffusion model. Flags override --config FILE, which overrides defaults.")
    p.add_argument("--config", type=Path, help="YAML file of flag values (keys are flag names with _ for -)")
    p.add_argument("--method", default="baseline", help="method: " + ", ".join(_method_classes()))
    p.add_argument("--out", default=None, help="run directory (default: runs/<method>-<time>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last good checkpoint")
    p.add_argument("--init-from", default=None, help="initialise the networks from another run or, for baseline "
                   "and kl, a diffusers UNet2DModel / DDPM / DDIM pipeline folder (method-specific)")
    g = p.add_argument_group("data")
    g.add_argument("--data", default=d.data, help="mnist5k | digits | folder of images | .npz | CIFAR-10 batches "
                   "folder | MNIST idx file")
    g.add_argument("--resolution", type=int, default=None, help="resize images to this square size")
    g.add_argument("--channels", type=int, default=None, choices=[1, 3], help="convert images to 1 or 3 channels")
    g.add_argument("--hflip", action="store_true", help="random horizontal flips (the papers' augmentation)")
    g.add_argument("--data-limit", type=int, default=None, help="use only the first N images")
    g = p.add_argument_group("network and optimisation")
    from diffaccel.nets.autoencoder import AUTOENCODER_PRESETS
    from diffaccel.nets.ddgan import GENERATOR_PRESETS

    g.add_argument("--preset", default="small",
                   help=f"network size: UNet {', '.join(PRESETS)}; DDGAN generator {', '.join(GENERATOR_PRESETS)}; "
                        f"autoencoder {', '.join(AUTOENCODER_PRESETS)}")
    g.add_argument("--net-config", default=None, help='JSON overrides of UNet2DModel arguments, e.g. '
                   '\'{"block_out_channels": [32, 64]}\'')
    g.add_argument("--batch-size", type=int, default=d.batch_size)
    g.add_argument("--lr", type=float, default=d.lr)
    g.add_argument("--weight-decay", type=float, default=d.weight_decay)
    g.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    g.add_argument("--lr-schedule", choices=LR_SCHEDULES, default=d.lr_schedule,
                   help="learning rate after warm-up: constant, or a cosine decay to 0 at --steps")
    g.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm)
    g.add_argument("--steps", type=int, default=d.steps, help="optimisation steps in total")
    g.add_argument("--grad-accum", type=int, default=d.grad_accum, help="micro-batches per step")
    g.add_argument("--ema-decay", type=float, default=d.ema_decay)
    g.add_argument("--mixed-precision", default=d.mixed_precision, choices=["no", "fp16", "bf16"])
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--device", default=d.device, help="auto | cpu | cuda")
    g = p.add_argument_group("logging, checkpoints and evaluation")
    g.add_argument("--log-every", type=int, default=d.log_every)
    g.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every)
    g.add_argument("--keep-checkpoints", type=int, default=d.keep_checkpoints)
    g.add_argument("--sample-every", type=int, default=d.sample_every, help="save a sample grid every N steps")
    g.add_argument("--log-with", default=None, help="also log metrics and sample grids to a tracker: tensorboard "
                   "(events in RUN_DIR/tensorboard; needs diffaccel[tensorboard]); metrics.jsonl stays the record")
    g.add_argument("--clip-x0", action="store_true",
                   help="baseline, KL, DVDP: clip predicted x0 to the data range in the run's sample grids")
    g.add_argument("--eval-every", type=int, default=d.eval_every, help="FID every N steps into metrics.jsonl")
    g.add_argument("--eval-n", type=int, default=1000, help="samples per evaluation during training")
    g.add_argument("--extractor", default="effnet", help="feature extractor for --eval-every: effnet | inception | "
                   "digits (1x32x32 digit images)")
    g.add_argument("--max-nonfinite", type=int, default=d.max_nonfinite,
                   help="stop after this many non-finite steps in a row")
    seen: set[str] = set(p._option_string_actions)
    shared = {a.dest for a in p._actions}
    for name, cls in _method_classes().items():
        cls.add_arguments(_SharedFlags(p.add_argument_group(f"method {name}"), seen))
    p.shared_dests = shared  # read by the trainer whatever the method; the rest only if the method reads them
    return p


def _add_sampling_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", type=Path, help="run directory written by `diffaccel train`")
    p.add_argument("--sampler", default=None, help="ddim | ddpm (epsilon methods), pc | ald (score models)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps / iterations (method default if unset)")
    p.add_argument("--eta", type=_eta, default=None, help="DDIM eta in [0, 1] (1 = ancestral, 0 = deterministic)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--device", default="auto")
    p.add_argument("--checkpoint", type=Path, default=None, help="a checkpoint folder (default: the latest good one)")
    seen = set(p._option_string_actions)
    before = {a.dest for a in p._actions}
    for name, cls in _method_classes().items():
        cls.add_sample_arguments(_SharedFlags(p.add_argument_group(f"method {name}"), seen))
    p.method_dests = {a.dest for a in p._actions} - before | {"sampler", "steps", "eta"}  # read by the method


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="diffaccel", description="Faster diffusion models: KL diffusion, DVDP, "
                                     "LDDGAN and PDS on one core.", epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train_parser(sub)

    p = sub.add_parser("sample", help="draw samples from a trained run into a PNG grid",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_sampling_flags(p)
    p.add_argument("--n", type=int, default=64, help="number of samples")
    p.add_argument("--out", type=Path, default=None, help="grid PNG (default: RUN_DIR/samples/sample-<time>.png)")
    p.add_argument("--save-images", type=Path, default=None, help="also save every sample as a PNG in this folder")

    p = sub.add_parser("eval", help="FID / KID / precision / recall, NFE and timing of a trained run",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_sampling_flags(p)
    p.add_argument("--n", type=int, default=10000, help="number of generated samples")
    p.add_argument("--extractor", default="effnet", help="effnet | inception | digits (1x32x32 digit images)")
    p.add_argument("--inception-weights", type=Path, default=None, help="pt_inception-2015-12-05 weights file")
    p.add_argument("--out", type=Path, default=None, help="eval.json path (default: RUN_DIR/eval.json)")

    p = sub.add_parser("bench", help="run a side-by-side benchmark into benchmarks/results/NAME/")
    p.add_argument("name", nargs="?", help="benchmark name (omit to list them)")
    p.add_argument("--quick", action="store_true", help="seconds-long smoke version")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="results root folder")
    p.add_argument("--seeds", type=int, default=None,
                   help="train and sample every model this many times (seeds 0..K-1) and report 95%% intervals")
    p.add_argument("--dry-run", action="store_true", help="print the planned rows and an estimated time, run nothing")
    p.add_argument("--only-seed", type=int, default=None, metavar="K",
                   help="work on seed K of --seeds alone and write no results (one such worker per core shares the "
                        "work folder); rerun without it to write the results")
    p.add_argument("--update-readme", type=Path, nargs="?", const=Path("README.md"), default=None, metavar="README",
                   help="rewrite README's generated results table from OUT/*/results.json, run nothing")

    p = sub.add_parser("train-extractor", help="train the digits classifier that `--extractor digits` uses",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("name", choices=["digits"])
    p.add_argument("--out", type=Path, default=None, help="weights file (default: the one shipped in the package)")
    p.add_argument("--check", action="store_true",
                   help="train, then compare with the shipped weights' checksum instead of writing them")

    p = sub.add_parser("export", help="write a run as a diffusers pipeline folder (safetensors, model card)")
    p.add_argument("run_dir", type=Path)
    p.add_argument("out_dir", type=Path)
    p.add_argument("--raw", action="store_true", help="export the raw weights instead of the EMA weights")
    p.add_argument("--checkpoint", type=Path, default=None, help="a checkpoint folder (default: the latest good one)")

    p = sub.add_parser("info", help="describe a run directory: method, settings, checkpoints, last metrics")
    p.add_argument("run_dir", type=Path)

    p = sub.add_parser("doctor", help="versions, device, data and weights availability; checks a run directory")
    p.add_argument("run_dir", type=Path, nargs="?")

    p = sub.add_parser("pds-filter", help="compute PDS frequency/space filters from data", add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    _bound_numeric_flags(parser)
    return parser


# --- commands --------------------------------------------------------------------------------------------------
def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda requested but no CUDA device is available")
    return torch.device(name)


def _apply_config_file(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    from diffaccel.validation import echo, load_yaml, read_text

    args = parser.parse_args(argv)
    if getattr(args, "config", None):
        # bounded: a file of at most 1 MB whose aliases expand to at most 20,000 values
        values = load_yaml(read_text(args.config, "--config"), f"--config {args.config}") or {}
        if not isinstance(values, dict):
            raise UserError(f"--config {args.config} must hold a mapping of flag names to values")
        known = set(vars(args))
        unknown = sorted(str(k)[:40] for k in values if not isinstance(k, str) or k.replace("-", "_") not in known)
        if unknown:
            raise UserError(f"--config {args.config}: unknown settings {echo(unknown)}")
        train_parser = parser._subparsers._group_actions[0].choices["train"]
        actions = {a.dest: a for a in train_parser._actions}
        train_parser.set_defaults(**{k.replace("-", "_"): _config_value(actions.get(k.replace("-", "_")), k, v,
                                                                        args.config) for k, v in values.items()})
        args = parser.parse_args(argv)
        args.config_dests = {str(k).replace("-", "_") for k in values}
    return args


def _config_value(action, key: str, value, source):
    """A --config value checked and converted as the same flag typed on the command line would be."""
    if action is None or not action.option_strings:  # e.g. "command": nothing to convert
        return value

    from diffaccel.validation import clip, echo

    def bad(why: str) -> UserError:
        return UserError(f"--config {source}: {key}: {why}")

    if value is None:
        if action.default is None:
            return None
        raise bad(f"needs a value (default {echo(action.default)})")
    if action.nargs == 0:  # on/off flags such as --hflip
        if not isinstance(value, bool):
            raise bad(f"must be true or false, got {echo(value)}")
        return value
    if isinstance(value, dict) and action.dest == "net_config":
        value = json.dumps(value)  # a YAML mapping is the JSON text the flag takes
    if isinstance(value, list) and all(isinstance(v, (int, float, str)) and not isinstance(v, bool) for v in value):
        value = ",".join(str(v) for v in value)  # a YAML list is the comma-separated text the flag takes
    if not isinstance(value, (str, int, float)):
        raise bad(f"expected a single value, got {echo(value)}")
    try:
        converted = (action.type or str)(str(value))
    except (ValueError, TypeError, argparse.ArgumentTypeError) as e:
        raise bad(f"invalid value {echo(value)} ({clip(e)})") from None
    if action.choices is not None and converted not in action.choices:
        raise bad(f"must be one of {', '.join(map(str, action.choices))}, got {echo(value)}")
    return converted


def cmd_train(args: argparse.Namespace) -> None:
    from diffaccel.methods import method_class
    from diffaccel.runs import read_config
    from diffaccel.train import TrainConfig, release_process_group, train
    from diffaccel.validation import build_method_checked

    given = getattr(args, "given", set())
    if args.out is not None and not str(args.out).strip():
        raise UserError("--out is empty; give a run directory (or leave --out out for runs/<method>-<time>)")
    if args.resume:
        if not args.out:
            raise UserError("--resume needs --out RUN_DIR")
        saved = read_config(args.out)
        cfg = TrainConfig(**{**saved["train"], "out": str(args.out)})  # the folder may have been moved or copied
        _check_resume_flags(args, given, saved)
        for flag in RESUME_MAY_CHANGE & set(vars(cfg)):
            if flag in given:
                setattr(cfg, flag, getattr(args, flag))
        method = build_method_checked(saved["method"], saved.get("method_config"), f"{args.out}/config.yaml")
    else:
        recorder = _ReadRecorder(args)
        method = method_class(args.method).from_args(recorder)
        # a flag the user gave is honoured or refused: the trainer's own flags, plus what this method read
        _refuse_unread(given, args.parser.shared_dests | recorder.read, f"method {args.method!r}")
        if args.clip_x0 and hasattr(method, "check_latent_options"):
            method.check_latent_options(clip_x0=True)  # the run's sample grids would refuse it mid-training
        try:
            overrides = json.loads(args.net_config) if args.net_config else {}
        except ValueError as e:
            raise UserError(f"--net-config is not valid JSON: {e}") from None
        from diffaccel.validation import check_net_overrides

        check_net_overrides(overrides, "--net-config")
        out = args.out or f"runs/{args.method}-{time.strftime('%Y%m%d-%H%M%S')}"
        cfg = TrainConfig(data=args.data, resolution=args.resolution, channels=args.channels, hflip=args.hflip,
                          data_limit=args.data_limit, net={"preset": args.preset, "overrides": overrides},
                          batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                          warmup_steps=args.warmup_steps, lr_schedule=args.lr_schedule,
                          max_grad_norm=args.max_grad_norm, steps=args.steps,
                          grad_accum=args.grad_accum, ema_decay=args.ema_decay,
                          mixed_precision=args.mixed_precision, seed=args.seed, out=out, log_every=args.log_every,
                          checkpoint_every=args.checkpoint_every, keep_checkpoints=args.keep_checkpoints,
                          sample_every=args.sample_every, eval_every=args.eval_every,
                          max_nonfinite=args.max_nonfinite, device=args.device, init_from=args.init_from,
                          log_with=args.log_with,
                          sample_options={"clip_x0": True} if args.clip_x0 else {})
    if not cfg.eval_every and given & {"extractor", "eval_n"}:
        raise UserError(", ".join(_flag(d) for d in sorted(given & {"extractor", "eval_n"}))
                        + " only matter with --eval-every N > 0; drop them or set --eval-every")
    if cfg.device != "auto":
        _device(cfg.device)  # --device cuda without CUDA is refused, as `sample` does, not replaced by the CPU
    cfg.validate()
    from diffaccel.validation import check_tracker

    check_tracker(cfg.log_with)
    callback = None
    if cfg.eval_every:
        from diffaccel.data import load_dataset
        from diffaccel.evaluate import training_evaluator
        from diffaccel.validation import check_extractor

        reference = load_dataset(cfg.data, cfg.resolution, cfg.channels, False, cfg.data_limit)
        # the extractor is built now, not at the first evaluation hours later
        check_extractor(getattr(args, "extractor", "effnet"), reference.shape)
        callback = training_evaluator(reference, getattr(args, "eval_n", 1000), getattr(args, "extractor", "effnet"),
                                      cfg.sample_options)
    run_dir = train(cfg, method, resume=args.resume, callback=callback)
    release_process_group()
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun / accelerate launch, rank 0 speaks
        return
    print(f"run directory: {run_dir}\n  samples: {run_dir / 'samples.png'}\n  loss plot: {run_dir / 'loss.png'}\n"
          f"  report: {run_dir / 'report.md'}")


# settings a resumed run may change; any other flag given with --resume must repeat the run's own value
RESUME_MAY_CHANGE = {"steps", "log_every", "checkpoint_every", "eval_every", "sample_every", "device",
                     "keep_checkpoints", "max_nonfinite", "eval_n", "log_with", "extractor", "resume", "out", "config"}


def _check_resume_flags(args: argparse.Namespace, given: set[str], saved: dict) -> None:
    train = saved["train"]
    current = {"method": saved["method"], "preset": train["net"].get("preset"),
               "net_config": train["net"].get("overrides", {}), "clip_x0": bool(train["sample_options"].get("clip_x0"))}
    changed = []
    for dest in sorted(given - RESUME_MAY_CHANGE):
        value = getattr(args, dest, None)
        if dest == "net_config":
            try:
                value = json.loads(value) if value else {}
            except ValueError:
                pass
        if dest in current:
            same = value == current[dest]
        elif dest in train:
            same = value == train[dest]
        else:  # a method's own setting: the method is rebuilt from the run's config.yaml, not from flags
            same = False
        if not same:
            changed.append(dest)
    if changed:
        from diffaccel.validation import echo

        was = "; ".join(f"{_flag(d)} was {echo(current[d] if d in current else train[d], 40)}"
                        if d in current or d in train else
                        f"{_flag(d)} is a setting of the method, fixed as {echo(saved.get('method_config'), 60)}"
                        for d in changed)
        raise UserError(f"--resume continues the run as it was trained: {was}. Only "
                        + ", ".join(_flag(d) for d in sorted(RESUME_MAY_CHANGE - {'resume', 'out', 'config'}))
                        + " may change; start a new run (--out) for other settings")


def _check_sampling_flags(args: argparse.Namespace) -> None:
    """Every sampling flag given is read by the run's method (else refused), and the options are valid,
    before anything is loaded or sampled."""
    from diffaccel.runs import read_config
    from diffaccel.validation import build_method_checked

    config = read_config(args.run_dir)
    method = build_method_checked(config["method"], config.get("method_config"), f"{args.run_dir}/config.yaml")
    recorder = _ReadRecorder(args)
    method.sampler_options(recorder)
    shared = {a.dest for a in args.parser._actions} - args.parser.method_dests
    _refuse_unread(args.given, shared | recorder.read, f"the sampler of this {config['method']} run")


def cmd_sample(args: argparse.Namespace) -> None:
    import torch

    from diffaccel.data import save_grid, to_uint8
    from diffaccel.runs import load_run

    from diffaccel.runs import read_config
    from diffaccel.validation import check_output_file, check_output_folder

    if args.n < 1:
        raise UserError(f"--n must be >= 1, got {args.n}")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    shape = tuple(read_config(args.run_dir)["image_shape"])
    _check_sampling_flags(args)
    from diffaccel.validation import available_memory, human_bytes

    need = args.n * math.prod(shape) * 4 * 2  # the float samples, and their uint8 grid
    if need > available_memory():
        raise UserError(f"--n {args.n} samples of shape {shape} need about {human_bytes(need)} of memory, more than "
                        f"the {human_bytes(available_memory())} available; draw fewer at a time")
    out = args.out or args.run_dir / "samples" / f"sample-{time.strftime('%Y%m%d-%H%M%S')}.png"
    check_output_file(out, "--out")  # outputs are checked before sampling: a refusal leaves nothing behind
    if args.save_images:
        check_output_folder(args.save_images, "--save-images")
    device = _device(args.device)
    method, nets = load_run(args.run_dir, device, checkpoint=args.checkpoint)
    options = method.sampler_options(args)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    chunks, t0 = [], time.perf_counter()
    with torch.inference_mode():
        for start in range(0, args.n, args.batch_size):
            n = min(args.batch_size, args.n - start)
            chunks.append(method.sample(nets[method.sampling_network], n, shape, generator=generator, device=device,
                                        **options).cpu())
    elapsed = time.perf_counter() - t0
    images = torch.cat(chunks)
    save_grid(images, out)
    if args.save_images:
        from PIL import Image

        args.save_images.mkdir(parents=True, exist_ok=True)
        for i, im in enumerate(to_uint8(images)):
            arr = im.permute(1, 2, 0).numpy()
            Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(args.save_images / f"{i:06d}.png")
    print(f"{args.n} samples ({method.name}, {options}, NFE {method.nfe(**options)}) in {elapsed:.2f} s "
          f"on {device}: {out}")


def cmd_eval(args: argparse.Namespace) -> None:
    from diffaccel.evaluate import evaluate_run

    _check_sampling_flags(args)
    result = evaluate_run(args.run_dir, n=args.n, sampler_args=args, extractor=args.extractor,
                          device=_device(args.device), batch_size=args.batch_size, seed=args.seed, out=args.out,
                          checkpoint=args.checkpoint, inception_weights=args.inception_weights)
    print(json.dumps(result, indent=1))


def cmd_bench(args: argparse.Namespace) -> None:
    from diffaccel.bench import BENCHMARKS, benchmark_function

    if args.update_readme is not None:
        from diffaccel.bench.overview import update_readme

        if args.name:
            raise UserError("--update-readme runs no benchmark: drop the benchmark name")
        changed = update_readme(args.update_readme, args.out)
        print(f"{args.update_readme}: results table {'updated' if changed else 'already up to date'}")
        return
    if not args.name:
        print("benchmarks: " + ", ".join(sorted(BENCHMARKS)))
        return
    fn = benchmark_function(args.name)
    out_dir = args.out / args.name if not args.quick else args.out / f"{args.name}-quick"
    options = {}
    accepted = inspect.signature(fn).parameters
    if args.only_seed is not None and args.seeds is None:
        raise UserError("--only-seed K needs --seeds: it names one seed of the benchmark's seeds 0..N-1")
    for flag, key, value in (("--seeds", "seeds", args.seeds), ("--dry-run", "dry_run", args.dry_run or None),
                             ("--only-seed", "only_seed", args.only_seed)):
        if value is None:
            continue
        if key not in accepted:
            raise UserError(f"benchmark {args.name!r} does not take {flag} (it is not on the shared harness)")
        if key == "seeds" and not 1 <= value <= 100:
            raise UserError(f"--seeds must be between 1 and 100, got {value}")
        if key == "only_seed" and not 0 <= value < args.seeds:
            raise UserError(f"--only-seed must be one of the seeds 0..{args.seeds - 1}, got {value}")
        options[key] = value
    result = fn(out_dir, quick=args.quick, **options)
    if args.dry_run or args.only_seed is not None:
        return result
    print(f"results in {out_dir}")
    return result


def cmd_train_extractor(args: argparse.Namespace) -> None:
    from diffaccel.metrics import digits

    if args.check and args.out is not None:
        raise UserError("--check compares with the shipped weights and writes nothing: drop --out")
    net, report = digits.train_digits_classifier(progress=True)
    print(json.dumps(report, indent=1))
    if report["heldout_accuracy"] < 0.97:
        raise UserError(f"held-out accuracy {report['heldout_accuracy']:.4f} is below 0.97; weights not written")
    if args.check:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            digest = digits.save_classifier(net, Path(tmp) / "w.safetensors", report)
        same = digest == digits.WEIGHTS_SHA256
        print(f"sha256 {digest}: {'reproduces' if same else 'DIFFERS FROM'} the shipped weights "
              f"({digits.WEIGHTS_SHA256})")
        if not same:
            raise SystemExit(1)
        return
    out = args.out or digits.WEIGHTS_PATH
    digest = digits.save_classifier(net, out, report)
    print(f"wrote {out} (sha256 {digest})")


def cmd_export(args: argparse.Namespace) -> None:
    from diffaccel.export import export_run

    out = export_run(args.run_dir, args.out_dir, ema=not args.raw, checkpoint=args.checkpoint)
    print(f"exported {args.run_dir} ({'raw' if args.raw else 'EMA'} weights) to {out}")


def cmd_info(args: argparse.Namespace) -> None:
    from diffaccel.checkpoint import list_checkpoints, verify
    from diffaccel.runs import read_config, read_metrics

    config = read_config(args.run_dir)  # everything is read and checked before the first line is printed
    train = config["train"]
    lines = [f"run: {args.run_dir}\nmethod: {config['method']} {config.get('method_config')}\n"
             f"data: {train['data']} image shape {config['image_shape']}\nnetwork: {train['net']}\n"
             f"training: batch {train['batch_size']}, lr {train['lr']}, steps {train['steps']}, seed {train['seed']}"]
    ckpts = list_checkpoints(Path(args.run_dir) / "checkpoints")
    lines.append("checkpoints:" + ("" if ckpts else " none"))
    for c in ckpts:
        try:
            verify(c)
            lines.append(f"  {c.name}: ok")
        except UserError as e:
            lines.append(f"  {c.name}: BROKEN ({e})")
    records = read_metrics(args.run_dir)
    losses = [r for r in records if any(k.startswith("loss") for k in r)]
    if losses:
        lines.append("last log: " + json.dumps(losses[-1]))
    evals = [r for r in records if any("[" in k for k in r)]
    if evals:
        lines.append("last evaluation: " + json.dumps(evals[-1]))
    print("\n".join(lines))


def cmd_doctor(args: argparse.Namespace) -> None:
    from diffaccel.doctor import doctor

    ok = doctor(args.run_dir)
    if doctor.last_run_problems:  # the run directory the user named is damaged: a user error, exit 2
        n = len(doctor.last_run_problems)
        raise UserError(f"run directory {args.run_dir} has {n} problem{'s' * (n > 1)} (marked above); first: "
                        f"{doctor.last_run_problems[0][:400]}")
    if not ok:  # the installation lacks something required
        raise SystemExit(1)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["pds-filter"]:
            from diffaccel.methods.pds import pds_filter_main

            pds_filter_main(argv[1:])
            return
        parser = build_parser()
        args = _apply_config_file(parser, argv)
        args.argv = argv
        args.given = _explicit_dests(parser, argv) | getattr(args, "config_dests", set())
        args.parser = parser._subparsers._group_actions[0].choices[args.command]
        {"train": cmd_train, "sample": cmd_sample, "eval": cmd_eval, "bench": cmd_bench, "info": cmd_info,
         "export": cmd_export, "doctor": cmd_doctor, "train-extractor": cmd_train_extractor}[args.command](args)
    except UserError as e:
        message = str(e)  # capped: a value echoed into a message never floods the terminal
        print(f"diffaccel: error: {message if len(message) <= 1000 else message[:999] + '…'}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("diffaccel: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except OSError as e:  # the system refused a path the user gave (read-only, not a folder, no space, ...)
        from diffaccel.validation import clip, os_reason

        where = f"{e.filename}: " if e.filename else ""
        print(f"diffaccel: error: {clip(where + os_reason(e), 300)}", file=sys.stderr)
        raise SystemExit(2) from None
    except Exception:  # a bug in diffaccel, not bad input: keep the traceback and ask for a report
        import traceback

        traceback.print_exc()
        print("diffaccel: internal error (the traceback above is a bug in diffaccel, not a problem with your "
              "input): please report it with the command line you ran", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
