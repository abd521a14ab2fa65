"""The method-agnostic trainer: accelerate, AdamW per phase, EMA, AMP, accumulation, exact checkpoints and resume.

The trainer knows nothing about any method: it asks the method for its networks and optimisation phases,
feeds every phase the same batch each step and keeps EMA copies of the networks the method names.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel
from tqdm.auto import tqdm

import diffaccel
from diffaccel.checkpoint import flatten, latest_valid, list_checkpoints, load_checkpoint, load_into, save_checkpoint
from diffaccel.data import ImageDataset, load_dataset, save_grid
from diffaccel.errors import UserError
from diffaccel.methods.base import Method
from diffaccel.runs import append_metrics, read_config, truncate_metrics, write_config
from diffaccel.validation import build_networks_checked, check_state_fits, check_tracker, preflight


LR_SCHEDULES = ("constant", "cosine")


@dataclass
class TrainConfig:
    data: str = "mnist5k"
    resolution: int | None = None
    channels: int | None = None
    hflip: bool = False
    data_limit: int | None = None
    net: dict = field(default_factory=lambda: {"preset": "small"})
    batch_size: int = 16
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    lr_schedule: str = "constant"
    max_grad_norm: float = 1.0
    steps: int = 2000
    grad_accum: int = 1
    ema_decay: float = 0.999
    mixed_precision: str = "no"
    seed: int = 0
    out: str = "runs/run"
    log_every: int = 50
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    sample_every: int = 0
    sample_n: int = 64
    sample_options: dict = field(default_factory=dict)
    eval_every: int = 0
    max_nonfinite: int = 10
    device: str = "auto"
    init_from: str | None = None
    log_with: str | None = None

    def validate(self) -> None:
        checks = [
            (self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}"),
            (self.lr > 0 and math.isfinite(self.lr), f"--lr must be a positive number, got {self.lr}"),
            (self.weight_decay >= 0, f"--weight-decay must be >= 0, got {self.weight_decay}"),
            (self.steps >= 1, f"--steps must be >= 1, got {self.steps}"),
            (self.lr_schedule in LR_SCHEDULES, f"--lr-schedule must be one of {', '.join(LR_SCHEDULES)}, "
                                               f"got {self.lr_schedule!r}"),
            (self.data_limit is None or self.data_limit >= 1,
             f"--data-limit must be >= 1 (the number of images to use), got {self.data_limit}"),
            (self.grad_accum >= 1, f"--grad-accum must be >= 1, got {self.grad_accum}"),
            (self.grad_accum <= self.batch_size, f"--grad-accum {self.grad_accum} is larger than --batch-size "
                                                 f"{self.batch_size}: each micro-batch needs at least one image"),
            (0 <= self.ema_decay < 1, f"--ema-decay must be in [0, 1), got {self.ema_decay}"),
            (self.mixed_precision in ("no", "fp16", "bf16"), "--mixed-precision must be no, fp16 or bf16"),
            (self.log_every >= 1, f"--log-every must be >= 1, got {self.log_every}"),
            (self.checkpoint_every >= 1, f"--checkpoint-every must be >= 1, got {self.checkpoint_every}"),
            (self.max_nonfinite >= 1, f"--max-nonfinite must be >= 1, got {self.max_nonfinite}"),
            (self.max_grad_norm > 0, f"--max-grad-norm must be > 0, got {self.max_grad_norm}"),
            (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"),
             f"--device must be auto, cpu or cuda, got {self.device!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)


def _ema_fn(decay: float):
    """EMA with the usual warm-up min(decay, (1+n)/(10+n)), so short runs are not dominated by the init."""

    @torch.no_grad()
    def update(ema_params, params, num_averaged):
        n = float(num_averaged)
        d = min(decay, (1 + n) / (10 + n))
        torch._foreach_lerp_(ema_params, params, 1 - d)

    return update


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
             "numpy_pos": np.random.get_state()[2], "python": repr(random.getstate())}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", np.asarray(state["numpy"]).astype(np.uint32), int(state["numpy_pos"]), 0, 0.0))
    import ast

    version, internal, gauss = ast.literal_eval(state["python"])
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class BatchStream:
    """Global batches in a seeded order, epoch after epoch; its state makes resume repeat the order exactly."""

    def __init__(self, dataset: ImageDataset, batch_size: int, seed: int):
        self.dataset, self.batch_size = dataset, batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.perm, self.pos, self.epoch = torch.randperm(len(dataset), generator=self.generator), 0, 0

    def next(self) -> torch.Tensor:
        idx = []
        while len(idx) < self.batch_size:
            if self.pos >= len(self.perm):
                self.perm, self.pos = torch.randperm(len(self.dataset), generator=self.generator), 0
                self.epoch += 1
            take = self.perm[self.pos:self.pos + self.batch_size - len(idx)]
            idx.extend(take.tolist())
            self.pos += len(take)
        return self.dataset.get_batch(torch.tensor(idx), generator=self.generator)

    def state(self) -> dict:
        return {"generator": self.generator.get_state(), "perm": self.perm, "pos": self.pos, "epoch": self.epoch}

    def load(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.perm, self.pos, self.epoch = state["perm"], int(state["pos"]), int(state["epoch"])


class Trainer:
    def __init__(self, cfg: TrainConfig, method: Method, dataset: ImageDataset | None = None, resume: bool = False,
                 callback: Callable | None = None, progress: bool = True, log: Callable = print):
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        cfg.validate()
        check_tracker(cfg.log_with)
        self.cfg, self.method, self.callback, self.progress, self.log = cfg, method, callback, progress, log
        self.run_dir = Path(cfg.out)
        from diffaccel.validation import check_output_folder

        check_output_folder(self.run_dir, "run directory")
        if resume:
            self._check_resumable()
        elif self.run_dir.exists() and any(self.run_dir.iterdir()):
            raise UserError(f"run directory {self.run_dir} already exists and is not empty; "
                            "pass --resume to continue it or choose another --out")
        self._fresh, self._created = not resume, not self.run_dir.exists()  # (a fresh run's folder is empty)
        cpu = cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available())
        from accelerate.state import AcceleratorState

        if AcceleratorState._shared_state:  # a second Trainer in this process (tests, notebooks, benchmarks):
            AcceleratorState._reset_state(reset_partial_state=False)  # else a new mixed_precision is refused
        self.accelerator = Accelerator(cpu=cpu, mixed_precision=cfg.mixed_precision, log_with=cfg.log_with,
                                       project_dir=str(self.run_dir) if cfg.log_with else None)
        acc = self.accelerator
        if cfg.mixed_precision == "fp16" and acc.device.type == "cpu" and acc.is_main_process:
            self.log("warning: --mixed-precision fp16 has no effect on the CPU (accelerate trains in float32 "
                     "there); bf16 does work on the CPU")
        if cfg.batch_size % acc.num_processes:
            raise UserError(f"--batch-size {cfg.batch_size} is not divisible by the {acc.num_processes} processes")
        set_seed(cfg.seed + acc.process_index)  # each rank draws its own noise; data order is global

        dataset = dataset if dataset is not None else load_dataset(
            cfg.data, cfg.resolution, cfg.channels, cfg.hflip, cfg.data_limit)
        self.image_shape = dataset.shape
        self.dataset = method.prepare(dataset, acc.device)
        if not resume:  # memory estimated (and the configuration run once on shapes alone) before allocating
            method.on_train_start(cfg.steps)
            micro = math.ceil(cfg.batch_size / acc.num_processes / cfg.grad_accum)
            self.preflight = preflight(method, cfg.net, self.dataset.shape, micro, acc.device)
        self.nets = build_networks_checked(method, cfg.net, self.dataset.shape)  # bad --net-config: one line
        if cfg.init_from and not resume:
            method.initialize(self.nets, Path(cfg.init_from))
        self.phases = method.phases()
        self.optimizers = {}
        for phase in self.phases:
            params = [p for name in phase.networks for p in self.nets[name].parameters()]
            factory = phase.optimizer or (lambda ps, lr: torch.optim.AdamW(ps, lr=lr, weight_decay=cfg.weight_decay))
            self.optimizers[phase.name] = factory(params, phase.lr or cfg.lr)
        self.ema = {name: AveragedModel(self.nets[name], multi_avg_fn=_ema_fn(cfg.ema_decay), use_buffers=True)
                    for name in method.ema_networks}
        names = list(self.nets)
        prepared = acc.prepare(*[self.nets[n] for n in names], *self.optimizers.values())
        self.nets = dict(zip(names, prepared[:len(names)]))
        self.optimizers = dict(zip(self.optimizers, prepared[len(names):]))
        for e in self.ema.values():
            e.to(acc.device)
        self.stream = BatchStream(self.dataset, cfg.batch_size, cfg.seed)
        self.step = 0
        self.nonfinite = 0
        self.diagnostics: dict[str, list[torch.Tensor]] = {}
        self.grad_norms: dict[str, list[torch.Tensor]] = {}
        with self._writes():
            if resume:
                self._load_latest()
            else:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                if acc.is_main_process:
                    write_config(self.run_dir, self.config_dict())

    @contextlib.contextmanager
    def _writes(self):
        """A failed write into the run directory (disk full, read-only, not a folder) ends with one clear message."""
        try:
            yield
        except OSError as e:
            where = f" ({e.filename})" if e.filename else ""
            last = latest_valid(self.run_dir / "checkpoints", log=self.log)
            raise UserError(f"cannot write to the run directory {self.run_dir}: {e.strerror or e}{where}; "
                            f"last good checkpoint: {last or 'none'}") from None

    # --- experiment tracking (metrics.jsonl stays the record; the tracker mirrors it) ---------------------------
    def _start_tracking(self) -> None:
        """Open the tracker's run in RUN_DIR/<tracker>/; a resumed run appends to the same one, its events past
        the checkpoint's step (written before an interruption, and now to be repeated) purged first."""
        if not self.cfg.log_with:
            return
        kwargs = {"tensorboard": {"purge_step": self.step + 1}} if self.step else {}
        self.accelerator.init_trackers(self.cfg.log_with, init_kwargs=kwargs)

    def _track(self, record: dict) -> None:
        """Every finite number of a metrics record (losses, lr, step time, diagnostics, evaluations) as a scalar."""
        if not self.cfg.log_with:
            return
        scalars = {k: float(v) for k, v in record.items() if k != "step" and isinstance(v, (int, float))
                   and not isinstance(v, bool) and math.isfinite(v)}
        if scalars:
            self.accelerator.log(scalars, step=record["step"])

    def _track_grid(self, path: Path) -> None:
        if self.cfg.log_with != "tensorboard":
            return
        from PIL import Image

        grid = np.asarray(Image.open(path).convert("RGB"))
        self.accelerator.get_tracker("tensorboard").log_images({"samples": grid[None]}, step=self.step,
                                                               dataformats="NHWC")

    # --- configuration and resume --------------------------------------------------------------------------
    def config_dict(self) -> dict:
        return {"method": self.method.name, "method_config": self.method.config(),
                "train": dataclasses.asdict(self.cfg), "image_shape": list(self.image_shape),
                "model_shape": list(self.dataset.shape), "diffaccel_version": diffaccel.__version__}

    def _check_resumable(self) -> None:
        saved = read_config(self.run_dir, rebuild=False)  # the method compared here may be a library user's own
        if saved["method"] != self.method.name:
            raise UserError(f"{self.run_dir} was trained with method {saved['method']!r}, not {self.method.name!r}")
        saved_cfg, current = saved.get("method_config") or {}, self.method.config()
        fitted = {k: saved_cfg[k] for k in self.method.fitted_settings if k in saved_cfg and k not in current}
        if fitted:  # fitted from the data when the run started: the run continues with the values it was trained on
            self.method.adopt_fitted(fitted)
        if saved.get("method_config") != self.method.config():
            raise UserError(f"{self.run_dir} was trained with method settings {saved.get('method_config')}, "
                            f"not {self.method.config()}; resume with the same settings")

    def _load_latest(self) -> None:
        ckpt = latest_valid(self.run_dir / "checkpoints", log=self.log)
        if ckpt is None:
            found = list_checkpoints(self.run_dir / "checkpoints")
            if found:
                from diffaccel.validation import newest_problem

                raise UserError(f"no usable checkpoint in {self.run_dir / 'checkpoints'}: every one is broken "
                                f"(the newest: {newest_problem(found)})")
            self.log(f"{self.run_dir} has no checkpoint yet: starting from step 0")
            if self.accelerator.is_main_process:  # one writer: ranks replacing the same file would race
                truncate_metrics(self.run_dir, 0)
            return
        meta, weights, ema, state = load_checkpoint(ckpt)
        if meta.get("method") != self.method.name:
            raise UserError(f"checkpoint {ckpt} is from method {meta.get('method')!r}, not {self.method.name!r}")
        acc = self.accelerator
        check_state_fits(state, ckpt / "state.pt", self.optimizers, self.ema, len(self.dataset))
        load_into({n: acc.unwrap_model(net) for n, net in self.nets.items()}, weights, ckpt / "weights.safetensors")
        load_into({n: e.module for n, e in self.ema.items()}, ema, ckpt / "ema.safetensors")
        try:  # the schema fixed the shapes of the containers; what is inside must still fit these optimisers
            for name, e in self.ema.items():
                e.n_averaged.copy_(state["ema_n_averaged"][name])
            for name, opt in self.optimizers.items():
                opt.load_state_dict(state["optimizers"][name])
            if state.get("scaler") is not None and acc.scaler is not None:
                acc.scaler.load_state_dict(state["scaler"])
            self.stream.load(state["data"])
            self.step, self.nonfinite = int(state["step"]), int(state["nonfinite"])
            _set_rng_state(state["rng"][min(acc.process_index, len(state["rng"]) - 1)])
        except (ValueError, KeyError, TypeError, RuntimeError, IndexError, SyntaxError) as e:
            raise UserError(f"checkpoint file {ckpt / 'state.pt'} does not fit this run "
                            f"({type(e).__name__}: {str(e)[:120]})") from None
        acc.wait_for_everyone()  # every rank has chosen and read its checkpoint before rank 0 moves any
        truncate_metrics(self.run_dir, self.step) if acc.is_main_process else None
        if acc.is_main_process:  # record the settings the run continues with (e.g. a larger --steps)
            write_config(self.run_dir, self.config_dict())
            for broken in (c for c in list_checkpoints(ckpt.parent) if c.name > ckpt.name):
                # newer checkpoints that failed verification: kept for inspection, but out of the way of pruning
                # (they would otherwise count among --keep-checkpoints and push good ones out)
                shutil.rmtree(broken.with_name(f".broken_{broken.name}"), ignore_errors=True)
                broken.rename(broken.with_name(f".broken_{broken.name}"))
                self.log(f"moved the broken {broken.name} aside to .broken_{broken.name}")
        self.log(f"resumed {self.run_dir} from {ckpt.name} (step {self.step})")

    def save(self) -> Path | None:
        acc = self.accelerator
        rng = acc.gather_for_metrics([_rng_state()], use_gather_object=True) if acc.num_processes > 1 \
            else [_rng_state()]
        path = None
        if acc.is_main_process:
            state = {"step": self.step, "nonfinite": self.nonfinite, "data": self.stream.state(), "rng": rng,
                     "optimizers": {n: o.state_dict() for n, o in self.optimizers.items()},
                     "ema_n_averaged": {n: e.n_averaged.cpu() for n, e in self.ema.items()},
                     "scaler": acc.scaler.state_dict() if acc.scaler is not None else None}
            weights = flatten({n: acc.unwrap_model(net) for n, net in self.nets.items()})
            ema = flatten({n: e.module for n, e in self.ema.items()})
            broken = next((k for t in (weights, ema) for k, v in t.items()
                           if v.is_floating_point() and not torch.isfinite(v).all()), None)
            if broken:  # a diverged network must never push the last good checkpoints out
                self.log(f"step {self.step}: not saving a checkpoint, {broken} is not finite; "
                         "the previous checkpoints are kept")
                acc.wait_for_everyone()
                return None
            path = save_checkpoint(self.run_dir / "checkpoints", self.step,
                                   {"method": self.method.name, "diffaccel_version": diffaccel.__version__},
                                   weights, ema, state, keep=self.cfg.keep_checkpoints)
        acc.wait_for_everyone()
        return path

    # --- training ------------------------------------------------------------------------------------------
    def _lr(self, step: int, base: float | None = None) -> float:
        """Linear warm-up, then constant or a cosine decay to 0 at --steps (DDGAN's official schedule)."""
        cfg, base = self.cfg, base or self.cfg.lr
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return base * (step + 1) / cfg.warmup_steps
        if cfg.lr_schedule == "cosine":
            progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
            return base * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return base

    def train_step(self, x0: torch.Tensor) -> dict[str, float]:
        """One optimisation step of every due phase on the same global batch; returns the phase losses.

        Named values a phase returns beside its loss are collected (as tensors, no host sync) in
        ``self.diagnostics`` for the next metrics record.
        """
        acc, cfg = self.accelerator, self.cfg
        shard = x0.chunk(acc.num_processes)[acc.process_index].to(acc.device)
        losses, stepped, skipped = {}, set(), set()
        for phase in self.phases:
            if self.step % phase.every:
                continue
            opt = self.optimizers[phase.name]
            for group in opt.param_groups:
                group["lr"] = self._lr(self.step, phase.lr)
            opt.zero_grad(set_to_none=True)
            total = 0.0
            for micro in shard.chunk(cfg.grad_accum):
                with acc.autocast():
                    loss = phase.loss_fn(self.nets, micro, self.step)
                if isinstance(loss, tuple):
                    loss, values = loss
                    for k, v in values.items():
                        self.diagnostics.setdefault(k, []).append(torch.as_tensor(v).detach().float().mean())
                acc.backward(loss / cfg.grad_accum)
                total += loss.detach().float() / cfg.grad_accum
            params = [p for n in phase.networks for p in self.nets[n].parameters()]
            # an unclipped phase still needs its norm, for the finiteness check below
            norm = acc.clip_grad_norm_(params, cfg.max_grad_norm if phase.clip else float("inf"))
            norm = torch.as_tensor(norm, device=total.device).detach().float()
            finite = torch.isfinite(total) & torch.isfinite(norm)
            if acc.num_processes > 1:  # every rank must agree, or one would step and the others not
                finite = acc.reduce(finite.float(), "sum") == acc.num_processes  # reduce has no "min"
            if not bool(finite):
                opt.zero_grad(set_to_none=True)
                losses[phase.name] = float("nan")
                skipped.update(phase.networks)
                continue
            opt.step()
            # the pre-clip norm, kept as a tensor (no host sync per step) for the window's clip statistics
            self.grad_norms.setdefault(phase.name, []).append(norm)
            stepped.update(phase.networks)
            losses[phase.name] = float(acc.reduce(total, "mean")) if acc.num_processes > 1 else float(total)
        for name, e in self.ema.items():
            if name in skipped and name not in stepped:  # a skipped step leaves the EMA as it was, too
                continue
            e.update_parameters(acc.unwrap_model(self.nets[name]))
        for name in list(self.nets):
            for p in self.nets[name].parameters():
                p.grad = None  # gradients of networks another phase touched are not carried over
        return losses

    def clip_statistics(self) -> dict[str, float]:
        """Over the steps since the last record, per phase: mean and max of the gradient norm before clipping
        and, for a clipped phase, the fraction of steps whose norm exceeded --max-grad-norm (clipping fired).

        Keys ``grad_norm_mean``, ``grad_norm_max``, ``clip_rate``, suffixed ``_PHASE`` when a method has several
        phases (as the losses are). Skipped (non-finite) steps are not counted.
        """
        out, several = {}, len(self.phases) > 1
        for phase in self.phases:
            norms = self.grad_norms.get(phase.name)
            if not norms:
                continue
            norms = torch.stack(norms)
            suffix = f"_{phase.name}" if several else ""
            out[f"grad_norm_mean{suffix}"] = float(norms.mean())
            out[f"grad_norm_max{suffix}"] = float(norms.max())
            if phase.clip:
                out[f"clip_rate{suffix}"] = float((norms > self.cfg.max_grad_norm).float().mean())
        return out

    def sample_grid(self, path: Path) -> None:
        opts = dict(self.cfg.sample_options or {})
        grid = getattr(self.method, "alpha_bars", None)
        if "steps" not in opts and grid is not None and len(grid) - 1 < 20:
            opts["steps"] = len(grid) - 1  # the samplers' default of 20 DDIM steps does not fit a shorter time grid
        net = self.ema[self.method.sampling_network].module
        with torch.random.fork_rng(devices=[]):
            g = torch.Generator(device=self.accelerator.device).manual_seed(self.cfg.seed)
            images = self.method.sample(net.eval(), self.cfg.sample_n, self.image_shape, generator=g,
                                        device=self.accelerator.device, progress=False, **opts)
        net.train()
        save_grid(images, path)

    def run(self) -> Path:
        try:
            with self._writes():
                return self._run()
        except UserError:
            self._forget_unstarted_run()
            raise

    def _forget_unstarted_run(self) -> None:
        """A fresh run refused before its first step completed leaves no config-only folder behind (it would
        block the corrected rerun with "already exists")."""
        if not (self._fresh and self.step == 0 and self.accelerator.is_main_process) \
                or list_checkpoints(self.run_dir / "checkpoints"):
            return
        if self._created:
            shutil.rmtree(self.run_dir, ignore_errors=True)
        else:  # the user's empty folder stays, empty
            for child in self.run_dir.iterdir():
                shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink(missing_ok=True)

    def _run(self) -> Path:
        cfg, acc = self.cfg, self.accelerator
        main = acc.is_main_process
        self.method.on_train_start(cfg.steps)
        if self.step >= cfg.steps:
            self.log(f"{self.run_dir} already reached step {self.step} >= --steps {cfg.steps}")
            return self.run_dir
        for net in self.nets.values():
            net.train()
        bar = tqdm(total=cfg.steps, initial=self.step, desc=f"train {self.method.name}", disable=not (self.progress
                   and main), dynamic_ncols=True)
        self._start_tracking()
        window: dict[str, list[float]] = {}
        t_window = time.perf_counter()
        while self.step < cfg.steps:
            x0 = self.stream.next()
            losses = self.train_step(x0)
            self.step += 1
            bad = [n for n, v in losses.items() if not math.isfinite(v)]
            if bad:
                self.nonfinite += 1
                if main:
                    append_metrics(self.run_dir, {"step": self.step, "skipped": "non-finite loss or gradient",
                                                  "phases": bad})
                    self.log(f"step {self.step}: non-finite loss/gradient in {bad}, step skipped "
                             f"({self.nonfinite} in a row)")
                if self.nonfinite >= cfg.max_nonfinite:
                    last = latest_valid(self.run_dir / "checkpoints", log=self.log)
                    raise UserError(f"training stopped: {self.nonfinite} non-finite steps in a row at step "
                                    f"{self.step}; last good checkpoint: {last or 'none'}")
            else:
                self.nonfinite = 0
            for n, v in losses.items():
                if math.isfinite(v):
                    window.setdefault(n, []).append(v)
            bar.update(1)
            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                elapsed = time.perf_counter() - t_window
                steps_in_window = cfg.log_every if self.step % cfg.log_every == 0 else self.step % cfg.log_every
                record = {"step": self.step,
                          **{f"loss_{n}" if len(self.phases) > 1 else "loss": float(np.mean(v))
                             for n, v in window.items()},
                          "lr": self._lr(self.step), "sec_per_step": elapsed / steps_in_window}
                record.update({k: float(torch.stack(v).mean()) for k, v in self.diagnostics.items()})
                record.update(self.clip_statistics())
                self.diagnostics, self.grad_norms = {}, {}
                if main:
                    append_metrics(self.run_dir, record)
                    self._track(record)
                    self.method.on_log(record, self.log)
                    bar.set_postfix({k: f"{v:.4g}" for k, v in record.items() if k.startswith("loss")})
                window, t_window = {}, time.perf_counter()
            if cfg.eval_every and self.callback and self.step % cfg.eval_every == 0:
                ema_nets = {n: e.module.eval() for n, e in self.ema.items()}
                with torch.random.fork_rng(devices=[]):
                    extra = self.callback(self.step, self.method, ema_nets) if main else None
                for e in ema_nets.values():
                    e.train()
                if main and extra:
                    append_metrics(self.run_dir, {"step": self.step, **extra})
                    self._track({"step": self.step, **extra})
                    self.log(f"step {self.step}: " + ", ".join(f"{k} {v:.4g}" for k, v in extra.items()
                                                                 if isinstance(v, float)))
                acc.wait_for_everyone()
            if cfg.sample_every and self.step % cfg.sample_every == 0 and main:
                self.sample_grid(self.run_dir / "samples" / f"step_{self.step:07d}.png")
                self._track_grid(self.run_dir / "samples" / f"step_{self.step:07d}.png")
            if self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps:
                self.save()
        bar.close()
        if main:
            self.sample_grid(self.run_dir / "samples.png")
            from diffaccel.report import write_report

            write_report(self.run_dir)
        for tracker in acc.trackers:  # flush and close the event files; acc.end_training() would also tear down
            tracker.finish()          # the process group that the barrier below and the caller still use
        acc.wait_for_everyone()
        return self.run_dir


def release_process_group() -> None:
    """Destroy the data-parallel process group, if one is up, once a launched rank has finished its work.

    Left for interpreter shutdown, gloo's worker threads can outlive the group and abort the rank
    ("terminate called without an active exception") after a run that otherwise succeeded.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def train(cfg: TrainConfig, method: Method, resume: bool = False, callback: Callable | None = None,
          dataset: ImageDataset | None = None, progress: bool = True, log: Callable = print) -> Path:
    """Train ``method`` as ``cfg`` says; returns the run directory."""
    return Trainer(cfg, method, dataset=dataset, resume=resume, callback=callback, progress=progress, log=log).run()
