"""Running a :class:`~diffaccel.bench.specs.Benchmark`: every (model, seed) trained, evaluated and stored as it
completes, so that rerunning the same command continues where it stopped.

Every record but the weights is small, so a benchmark can be continued in another checkout: commit ``OUT/work``
(``.gitignore`` leaves out its checkpoints and latent caches) and a rerun skips every finished (model, seed) and
evaluation; a setup (e.g. an autoencoder) whose weights are missing is trained again from its seed, and so is a
trained network with evaluations still to do — its stored evaluations are kept when the new run replays the
recorded loss trace exactly (the same network), and discarded otherwise.

Work folder layout (``OUT/work``)::

    probe.json                    seconds per step / per sample of every model (dry runs, seconds budgets)
    floors.json                   real-vs-real floors, keyed by their settings
    MODEL/seedK/train_key         hash of everything the network depends on; a mismatch retrains
    MODEL/seedK/run/              an ordinary diffaccel run (config, metrics.jsonl, checkpoints) — resumed
    MODEL/seedK/trained.json      written when training reached its steps
    MODEL/seedK/evals/*.json      one final evaluation per sampler, keyed by its settings
    MODEL/seedK/grid_*.png        64 samples of each sampler

Along training the first sampler that is not ``final_only`` is evaluated every ``eval_every`` steps (a
callback of the trainer, logged to metrics.jsonl, so it resumes with the run); at the end every sampler is
evaluated from the final EMA network. Sampling seeds depend on the training seed only, so every model of a
seed sees the same initial noise.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from diffaccel.bench.specs import Benchmark, ModelSpec, SamplerSpec, eval_key, slug, train_key, train_settings
from diffaccel.checkpoint import list_checkpoints
from diffaccel.errors import UserError

PROBE_STEPS = 3
PROBE_SAMPLE_BATCH = 16  # per-image sampling cost falls with the batch on a CPU: 2 images overstate it up to 5×


def _log(msg: str) -> None:
    print(f"[bench] {msg}", flush=True)


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1, default=float))
    tmp.replace(path)


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# --- data: the reference set and the disjoint real sets of the floors ------------------------------------------
class RealSplit:
    """A fixed permutation of the data: the first ``n_reference`` images are the reference of every FID; the
    floor of seed k compares it with ``n`` other real images (disjoint from the reference)."""

    def __init__(self, images: torch.Tensor, n_reference: int):
        if n_reference >= len(images):
            raise UserError(f"the benchmark's reference set ({n_reference}) needs fewer images than the data "
                            f"has ({len(images)}), so that its floor can use other real images")
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
        self.reference = images[order[:n_reference]]
        self.pool = images[order[n_reference:]]

    def floor_set(self, n: int, seed: int) -> torch.Tensor:
        n = min(n, len(self.pool))
        start = (seed * n) % len(self.pool)
        idx = (torch.arange(n) + start) % len(self.pool)
        return self.pool[idx]


def score(bench: Benchmark, split: RealSplit, fake: torch.Tensor) -> dict:
    from diffaccel.evaluate import score_images

    out = {}
    for extractor in bench.extractors:
        out.update(score_images(split.reference, fake, extractor=extractor, cache=True,
                                real_name=f"{slug(bench.name)}-reference"))
    return out


def floors(bench: Benchmark, split: RealSplit, seeds: int, work: Path) -> dict:
    """{n: [scores of seed 0, 1, ...]} of real-vs-real for every sample count the benchmark uses."""
    counts = sorted({bench.n_samples} | {s.n for m in bench.models for s in m.samplers if s.n})
    path = work / "floors.json"
    stored = _read_json(path) or {}
    key = json.dumps([bench.data, bench.resolution, bench.data_limit, bench.n_reference, list(bench.extractors)])
    if stored.get("key") != key:
        stored = {"key": key, "floors": {}}
    changed = False
    for n in counts:
        per_seed = stored["floors"].setdefault(str(n), [])
        while len(per_seed) < seeds:
            real = split.floor_set(n, len(per_seed))
            per_seed.append({**score(bench, split, real.float() / 127.5 - 1 if real.dtype == torch.uint8 else real),
                             "n_real": len(real)})
            changed = True
    if changed:
        _write_json(path, stored)
    return {int(n): v[:seeds] for n, v in stored["floors"].items() if int(n) in counts}


# --- training --------------------------------------------------------------------------------------------------
def train_config(bench: Benchmark, model: ModelSpec, seed: int, steps: int, out: Path,
                 init_from: str | None = None):
    """The TrainConfig of (model, seed) in this benchmark: its data, the benchmark's defaults and the row's own
    settings; also what a setup uses to pretrain a row's starting point."""
    from diffaccel.train import TrainConfig

    fields = {"data": bench.data, "resolution": bench.resolution, "data_limit": bench.data_limit,
              **bench.train_defaults, **model.train, **({"init_from": init_from} if init_from else {})}
    eval_every = bench.eval_every if bench.eval_every and bench.eval_every < steps else 0
    return TrainConfig(**fields, steps=steps, seed=seed, out=str(out), eval_every=eval_every,
                       checkpoint_every=eval_every or steps, keep_checkpoints=1,
                       log_every=max(1, min(50, eval_every or steps)), device=_device())


def _method(model: ModelSpec, setup_folder: Path, seed: int, quick: bool):
    """(method, init_from) of a model, after its setup: the setup's ``init_from`` entry is the run training starts
    from (e.g. a pretrained baseline to fine-tune), every other entry a method setting."""
    from diffaccel.methods import build_method

    extra = dict(model.setup(setup_folder, seed, quick)) if model.setup else {}
    init_from = extra.pop("init_from", None)
    return build_method(model.method, {**model.method_kwargs, **extra}), init_from


def curve_sampler(model: ModelSpec) -> SamplerSpec | None:
    return next((s for s in model.samplers if not s.final_only), None)


def _generate(method, net, n: int, shape, seed: int, batch: int, options: dict) -> tuple[torch.Tensor, float]:
    from diffaccel.evaluate import generate

    t0 = time.perf_counter()
    images, _ = generate(method, net, n, shape, batch_size=batch, seed=seed, progress=False, **options)
    return images, time.perf_counter() - t0


def sampling_seed(seed: int) -> int:
    return 10007 * seed + 1


class _CurveEvaluator:
    """The trainer's ``--eval-every`` callback: the curve sampler's scores at every evaluation point but the last
    (the last one is the final evaluation, done for every sampler from the finished run)."""

    def __init__(self, bench: Benchmark, split: RealSplit, sampler: SamplerSpec, steps: int, seed: int, shape):
        self.bench, self.split, self.sampler, self.steps, self.seed, self.shape = \
            bench, split, sampler, steps, seed, shape

    def __call__(self, step: int, method, ema_nets: dict):
        if step >= self.steps:
            return None
        net = ema_nets[method.sampling_network]
        images, seconds = _generate(method, net, self.bench.n_samples, self.shape, sampling_seed(self.seed),
                                    self.bench.sample_batch, self.sampler.options)
        return {"curve_sampler": self.sampler.label, **score(self.bench, self.split, images),
                "eval_sampling_seconds": seconds}


def train_one(bench: Benchmark, model: ModelSpec, seed: int, steps: int, split: RealSplit, dataset, work: Path,
              quick: bool, progress: bool) -> Path:
    """Train (or resume, or reuse) the network of (model, seed); returns its run directory."""
    from diffaccel.train import train

    folder = work / slug(model.label) / f"seed{seed}"
    key = train_key(bench, model, seed, steps)
    key_file = folder / "train_key"
    if folder.exists() and (not key_file.is_file() or key_file.read_text().strip() != key):
        _log(f"{model.label} seed {seed}: settings changed, retraining")
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    key_file.write_text(key)
    (folder / "train_settings.json").write_text(json.dumps(train_settings(bench, model, seed, steps), indent=1,
                                                           default=str))
    run_dir = folder / "run"
    recorded_losses = None
    if (folder / "trained.json").is_file():
        if list_checkpoints(run_dir / "checkpoints") or not pending_evaluations(bench, model, folder):
            return run_dir
        # A committed record keeps no weights: train the network again from its seed, and keep the stored
        # evaluations only if the new run replays the recorded loss trace (the same network, bit for bit).
        _log(f"{model.label} seed {seed}: evaluations left but no weights; training again from seed {seed}")
        recorded_losses = _losses(run_dir)
        shutil.rmtree(run_dir)
        (folder / "trained.json").unlink()
    method, init_from = _method(model, work / "setup" / slug(model.label) / f"seed{seed}", seed, quick)
    cfg = train_config(bench, model, seed, steps, run_dir, init_from)
    sampler = curve_sampler(model)
    callback = _CurveEvaluator(bench, split, sampler, steps, seed, dataset.shape) if sampler and cfg.eval_every \
        else None
    resume = (run_dir / "config.yaml").is_file()
    _log(f"{model.label} seed {seed}: {'resuming' if resume else 'training'} to step {steps}")
    t0 = time.perf_counter()
    train(cfg, method, resume=resume, callback=callback, dataset=dataset, progress=progress,
          log=lambda *_: None)
    if recorded_losses is not None and _losses(run_dir) != recorded_losses:
        _log(f"{model.label} seed {seed}: the new run does not replay the recorded loss trace; "
             f"its stored evaluations are discarded")
        shutil.rmtree(folder / "evals", ignore_errors=True)
    _write_json(folder / "trained.json", {"steps": steps, "wall_seconds_last_session": time.perf_counter() - t0})
    return run_dir


def _losses(run_dir: Path) -> list[float]:
    from diffaccel.runs import read_metrics

    return [r["loss"] for r in read_metrics(run_dir) if "loss" in r]


def pending_evaluations(bench: Benchmark, model: ModelSpec, folder: Path) -> list[SamplerSpec]:
    """The samplers of (model, seed) in ``folder`` without a stored evaluation under their current settings."""
    return [s for s in model.samplers
            if (_read_json(folder / "evals" / f"{slug(s.label)}.json") or {}).get("eval_key")
            != eval_key(bench, s, s.n or bench.n_samples)]


def evaluate_one(bench: Benchmark, model: ModelSpec, seed: int, run_dir: Path, split: RealSplit) -> dict:
    """Final evaluation of every sampler of (model, seed), each stored as it completes."""
    from diffaccel.data import save_grid
    from diffaccel.runs import load_run, read_config

    folder = run_dir.parent
    out = {}
    loaded = None
    for sampler in model.samplers:
        n = sampler.n or bench.n_samples
        key = eval_key(bench, sampler, n)
        path = folder / "evals" / f"{slug(sampler.label)}.json"
        stored = _read_json(path)
        if stored and stored.get("eval_key") == key:
            out[sampler.label] = stored
            continue
        if loaded is None:
            if not list_checkpoints(run_dir / "checkpoints"):
                raise UserError(f"{model.label} seed {seed}: {sampler.label} is to be evaluated, but the run keeps no "
                                f"weights (committed results keep no checkpoints); delete {folder} to retrain it")
            loaded = load_run(run_dir, _device())
        method, nets = loaded
        net = nets[method.sampling_network]
        shape = tuple(read_config(run_dir)["image_shape"])
        _log(f"{model.label} seed {seed}: sampling {n} with {sampler.label}")
        images, seconds = _generate(method, net, n, shape, sampling_seed(seed), bench.sample_batch, sampler.options)
        save_grid(images[:64].float() / 127.5 - 1, folder / f"grid_{slug(sampler.label)}.png", nrow=8)
        result = {"eval_key": key, "sampler": sampler.label, "n": n, "nfe": method.nfe(**sampler.options),
                  "sampling_seconds": seconds, "seconds_per_100_images": 100 * seconds / n,
                  **timing_trials(bench, sampler, method, net, shape, seed), **score(bench, split, images)}
        _write_json(path, result)
        out[sampler.label] = result
    return out


def timing_trials(bench: Benchmark, sampler: SamplerSpec, method, net, shape, seed: int) -> dict:
    """``bench.timing_trials`` timed generations of ``sampler.timing_n`` images after one untimed warm-up; seconds
    per 100 images is their median (decoder included: the method's sampler decodes)."""
    if not bench.timing_trials:
        return {}
    n = sampler.timing_n
    _generate(method, net, min(n, 2), shape, sampling_seed(seed), n, sampler.options)
    trials = [_generate(method, net, n, shape, sampling_seed(seed) + 1 + i, n, sampler.options)[1]
              for i in range(bench.timing_trials)]
    return {"timing_trial_seconds": trials, "timing_images": n,
            "seconds_per_100_images": 100 * statistics.median(trials) / n}


def training_curve(run_dir: Path) -> dict:
    """From metrics.jsonl: evaluation records with the training wall-clock seconds elapsed at their step, and
    the median seconds per step."""
    from diffaccel.runs import read_metrics

    records = read_metrics(run_dir)
    elapsed, prev, clock, sec_per_step = {}, 0, 0.0, []
    for r in records:
        if "sec_per_step" in r:
            clock += float(r["sec_per_step"]) * (int(r["step"]) - prev)
            prev = int(r["step"])
            elapsed[prev] = clock
            sec_per_step.append(float(r["sec_per_step"]))
    evals = []
    for r in records:
        if "curve_sampler" in r:
            step = int(r["step"])
            evals.append({**r, "train_seconds": elapsed.get(step, math.nan)})
    return {"evals": evals, "sec_per_step": statistics.median(sec_per_step) if sec_per_step else math.nan,
            "train_seconds": clock, "last_step": prev}


# --- probe: cost per step and per sample, for dry runs and wall-clock budgets --------------------------------
def probe(bench: Benchmark, dataset, work: Path, quick: bool, models: list[ModelSpec] | None = None,
          run_setup: bool = False) -> dict:
    """Seconds per training step and per sample of every model (a few steps of real training in a scratch
    folder, one small sampling batch per sampler), stored in ``work/probe.json`` by the model's settings.
    A model with a ``setup`` (e.g. an autoencoder to train) is probed only once it is set up: ``run_setup``
    runs it first (training does), a dry run reports it as not probed."""
    from diffaccel.train import train

    path = work / "probe.json"
    stored = _read_json(path) or {}
    for model in models or bench.models:
        key = train_key(bench, model, 0, 0)
        if stored.get(model.label, {}).get("key") == key:
            continue
        if model.setup and not run_setup and not (work / "setup" / slug(model.label) / "seed0").exists():
            stored[model.label] = {"key": None, "note": "needs its setup first: not probed"}
            continue
        method, init_from = _method(model, work / "setup" / slug(model.label) / "seed0", 0, quick)
        with tempfile.TemporaryDirectory(dir=work) as tmp:
            cfg = train_config(bench, model, 0, PROBE_STEPS, Path(tmp) / "run", init_from)
            cfg.eval_every = 0
            cfg.log_every = 1
            t0 = time.perf_counter()
            train(cfg, method, dataset=dataset, progress=False, log=lambda *_: None)
            total = time.perf_counter() - t0
            curve = training_curve(Path(tmp) / "run")
            from diffaccel.runs import load_run

            m, nets = load_run(Path(tmp) / "run", _device())
            per_sample = {}
            for sampler in model.samplers:
                b = min(bench.sample_batch, PROBE_SAMPLE_BATCH)
                _, seconds = _generate(m, nets[m.sampling_network], b, dataset.shape, 0, b, sampler.options)
                per_sample[sampler.label] = seconds / b
        stored[model.label] = {"key": key, "sec_per_step": curve["sec_per_step"], "setup_seconds": total,
                               "sec_per_sample": per_sample, "load_average": os.getloadavg()[0]}
        _write_json(path, stored)
    return stored


def model_steps(bench: Benchmark, model: ModelSpec, probed: dict | None) -> int:
    if model.steps is not None:
        return model.steps
    if bench.seconds is None:
        return bench.steps
    per_step = (probed or {}).get(model.label, {}).get("sec_per_step")
    if not per_step or not math.isfinite(per_step):
        raise UserError(f"{model.label}: no timing probe, so its wall-clock budget cannot be turned into steps")
    return max(1, int(bench.seconds / per_step))


# --- the whole benchmark ---------------------------------------------------------------------------------------
def _status(bench: Benchmark, model: ModelSpec, seed: int, steps: int, work: Path) -> tuple[str, int, list]:
    """(state, steps already trained, samplers still to evaluate) of (model, seed)."""
    folder = work / slug(model.label) / f"seed{seed}"
    key_file = folder / "train_key"
    if not key_file.is_file() or key_file.read_text().strip() != train_key(bench, model, seed, steps):
        return "to train", 0, list(model.samplers)
    if not (folder / "trained.json").is_file():
        done = training_curve(folder / "run")["last_step"]
        return f"resumes at ~{done}", done, list(model.samplers)
    evals = pending_evaluations(bench, model, folder)
    if not evals:
        return "done", steps, []
    if not list_checkpoints(folder / "run" / "checkpoints"):
        return f"trained, no weights (trains again), {len(evals)} evaluation(s) to do", 0, evals
    return f"trained, {len(evals)} evaluation(s) to do", steps, evals


def dry_run(bench: Benchmark, seeds: int, dataset, work: Path, quick: bool) -> dict:
    probed = probe(bench, dataset, work, quick)
    rows, total = [], 0.0
    for seed in range(seeds):
        for model in bench.models:
            p = probed.get(model.label, {})
            try:
                steps = model_steps(bench, model, probed)
            except UserError:
                steps = None
            status, done, todo = _status(bench, model, seed, steps or 0, work) if steps \
                else ("needs probe", 0, list(model.samplers))
            sec_step = p.get("sec_per_step", math.nan)
            evals = (steps // bench.eval_every - (steps % bench.eval_every == 0)) if bench.eval_every and steps else 0
            curve = curve_sampler(model)
            sample_s = sum((p.get("sec_per_sample") or {}).get(s.label, math.nan) * (s.n or bench.n_samples)
                           for s in todo)
            curve_s = evals * (p.get("sec_per_sample") or {}).get(curve.label, math.nan) * bench.n_samples \
                if curve else 0.0
            remaining = 0.0 if status == "done" else (max(0, (steps or 0) - done) * sec_step + curve_s + sample_s)
            total += remaining if math.isfinite(remaining) else 0.0
            rows.append({"model": model.label, "seed": seed, "steps": steps, "status": status,
                         "s/step (probe)": sec_step, "samplers": ", ".join(s.label for s in model.samplers),
                         "estimated s": remaining})
    from diffaccel.bench.harness import markdown_table

    print(markdown_table(rows, floatfmt=".3g"))
    print(f"estimated time left: {total / 60:.1f} min (from a {PROBE_STEPS}-step probe on this machine; "
          f"load average {os.getloadavg()[0]:.1f}; scoring not included)")
    return {"plan": rows, "estimated_seconds": total}


@contextlib.contextmanager
def exclusive_lock(path: Path):
    """Hold an exclusive lock on ``path`` (workers sharing a work folder set it up one at a time)."""
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _claim(path: Path, wait: bool):
    """An exclusive lock on ``path`` (released when the returned handle closes), or None if another process holds
    it and ``wait`` is False."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        handle.close()
        return None
    return handle


def run_benchmark(bench: Benchmark, out_dir: str | Path, seeds: int = 1, dry_run_only: bool = False,
                  quick: bool = False, progress: bool = True, only_seed: int | None = None) -> dict:
    """Train, evaluate and report every model of ``bench`` for seeds 0..seeds-1; resumable (see module doc).

    Several processes (one per core) may run the same benchmark on one work folder: the probe, the floors and
    every setup are made under a lock by whichever comes first, then each (model, seed) is claimed by one process
    at a time; a process skips the ones others hold, comes back to them once its own are done, and writes the
    results. ``only_seed=K`` restricts a process to seed K and makes it write no results."""
    from diffaccel.bench.summary import summarize, write_outputs
    from diffaccel.data import load_dataset
    from diffaccel.metrics.features import cached_extractor

    if seeds < 1:
        raise UserError(f"--seeds must be >= 1, got {seeds}")
    if only_seed is not None and not 0 <= only_seed < seeds:
        raise UserError(f"--only-seed must be one of the benchmark's seeds 0..{seeds - 1}, got {only_seed}")
    labels = [m.label for m in bench.models]
    if len(set(labels)) != len(labels):
        raise UserError(f"benchmark {bench.name}: model labels must be unique, got {labels}")
    out_dir = Path(out_dir)
    work = out_dir / "work"
    work.mkdir(parents=True, exist_ok=True)
    dataset = load_dataset(bench.data, bench.resolution, limit=bench.data_limit)
    for extractor in bench.extractors:  # refuses data it cannot score (one line) before any work, dry run too
        cached_extractor(extractor, "cpu", image_size=dataset.images.shape[-1])
    if dry_run_only:
        return dry_run(bench, seeds, dataset, work, quick)
    started = time.time()
    split = RealSplit(dataset.images, bench.n_reference)
    with exclusive_lock(work / "setup.lock"):
        probed = probe(bench, dataset, work, quick, run_setup=True) if bench.seconds is not None else None
        floor = floors(bench, split, seeds, work)
    results = {}
    # seed by seed: an interrupted benchmark already has whole seeds to show
    units = [(model, seed) for seed in (range(seeds) if only_seed is None else (only_seed,)) for model in bench.models]
    for wait in (False, True):  # first the units no other process holds, then wait for the others' to finish
        held = []
        for model, seed in units:
            claim = _claim(work / "claims" / f"{slug(model.label)}-seed{seed}", wait)
            if claim is None:
                held.append((model, seed))
                continue
            with claim:
                steps = model_steps(bench, model, probed)
                run_dir = train_one(bench, model, seed, steps, split, dataset, work, quick, progress)
                final = evaluate_one(bench, model, seed, run_dir, split)
                results[(model.label, seed)] = {"steps": steps, "final": final, **training_curve(run_dir)}
        units = held
    results = {(m.label, k): results[m.label, k] for k in range(seeds) for m in bench.models if (m.label, k) in results}
    if only_seed is not None:
        _log(f"seed {only_seed} of {seeds} done; rerun without --only-seed to write the results once every seed is")
        return {"only_seed": only_seed, "models": len(bench.models)}
    costs = None
    if bench.measure_cost:
        from diffaccel.bench.cost import measure_costs

        costs = measure_costs(bench, work, quick)
    summary = summarize(bench, results, floor, seeds, costs)
    with exclusive_lock(work / "setup.lock"):  # workers finishing together write one after the other
        if bench.extra is not None:
            summary["extra"] = bench.extra(bench, results, out_dir)
        write_outputs(bench, summary, out_dir, work, started, quick)
    return summary
