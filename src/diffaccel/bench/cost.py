"""Training cost of every model of a benchmark: seconds per optimisation step and peak memory.

Each model is measured in a fresh process (``spawn``), so one model's allocations never count for another's,
through the real trainer (every phase, EMA, clipping — what a training step costs a user): ``warmup`` steps,
then the median of ``steps`` timed steps. Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` during the
steps; on the CPU the growth of the resident set's high-water mark (``getrusage``) from before the first step.
The models run one after another, and the machine's load average is recorded with each figure: timings are
only comparable between models measured on the same, otherwise idle, machine.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import resource
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from diffaccel.bench.specs import Benchmark, ModelSpec, slug, train_key


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _measure(job: tuple) -> dict:
    """Worker: a Trainer for the model in a scratch folder, ``warmup`` + ``steps`` timed train steps."""
    from diffaccel.bench.runner import _method, train_config
    from diffaccel.data import load_dataset
    from diffaccel.metrics.timing import synchronize
    from diffaccel.train import Trainer

    bench, model, work, quick, warmup, steps, threads = job
    torch.set_num_threads(threads)
    dataset = load_dataset(bench.data, bench.resolution, limit=bench.data_limit)
    method, init_from = _method(model, work / "setup" / slug(model.label) / "seed0", 0, quick)
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        cfg = train_config(bench, model, 0, warmup + steps, Path(tmp) / "run", init_from)
        cfg.eval_every = 0
        trainer = Trainer(cfg, method, dataset=dataset, progress=False, log=lambda *_: None)
        device = trainer.accelerator.device
        for _ in range(warmup):
            trainer.train_step(trainer.stream.next())
            trainer.step += 1
        cuda = device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
        else:
            before = _rss_bytes()
        times = []
        for _ in range(steps):
            x0 = trainer.stream.next()
            synchronize(device)
            t0 = time.perf_counter()
            trainer.train_step(x0)
            synchronize(device)
            times.append(time.perf_counter() - t0)
            trainer.step += 1
        peak = (torch.cuda.max_memory_allocated(device) - before) if cuda else \
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    return {"sec_per_step": statistics.median(times), "peak_mem_mb": max(peak, 0) / 2 ** 20,
            "memory_kind": "cuda max_memory_allocated" if cuda else "CPU peak RSS increase",
            "load_average": os.getloadavg()[0], "threads": threads, "timed_steps": steps}


def measure_costs(bench: Benchmark, work: Path, quick: bool, models: list[ModelSpec] | None = None,
                  warmup: int = 2, steps: int = 8, threads: int | None = None) -> dict:
    """{label: cost} for every model, stored in ``work/cost.json`` by the model's settings (measured once)."""
    path = work / "cost.json"
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError):
        stored = {}
    threads = threads or min(2, os.cpu_count() or 1)
    for model in models or bench.models:
        key = train_key(bench, model, 0, 0)
        if stored.get(model.label, {}).get("key") == key:
            continue
        job = (bench, model, work, quick, warmup if not quick else 1, steps if not quick else 2, threads)
        with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
            stored[model.label] = {"key": key, **pool.submit(_measure, job).result()}
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(stored, indent=1))
        tmp.replace(path)
    return {m.label: stored[m.label] for m in (models or bench.models) if m.label in stored}
