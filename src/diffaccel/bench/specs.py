"""What a side-by-side benchmark compares: named model specs, their samplers, a budget, evaluation points.

A benchmark is data, not code: :class:`Benchmark` lists :class:`ModelSpec` rows (a method, its settings, the
trainer's settings and the samplers to evaluate it with) and the shared budget, data and evaluation. The
runner (:mod:`diffaccel.bench.runner`) trains every (model, seed) into the benchmark's work folder, evaluates
it and writes the tables; :func:`train_key` and :func:`eval_key` hash exactly the settings a stored result
depends on, so a changed setting invalidates only what it affects.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Callable


@dataclass(frozen=True)
class SamplerSpec:
    """One way of sampling a model: ``options`` go to ``method.sample`` (sampler, steps, eta, ...)."""

    label: str
    options: dict = field(default_factory=dict)
    n: int | None = None        # samples at the final evaluation (default: the benchmark's n_samples)
    final_only: bool = False    # not evaluated along training (expensive samplers such as DDPM-1000)
    timing_n: int = 100         # images per timing trial (the benchmark's ``timing_trials``); fewer for slow ones


@dataclass
class ModelSpec:
    """One row of a benchmark.

    ``train`` holds :class:`diffaccel.train.TrainConfig` fields that differ from the benchmark's
    ``train_defaults`` (batch_size, lr, net, ...). ``setup(folder, seed, quick) -> dict`` (optional) prepares
    what the method needs before training (e.g. an autoencoder for a latent method) in ``folder``, resumably,
    and returns extra method settings, and optionally ``init_from``: a run to start training from (e.g. a
    pretrained baseline to fine-tune); its ``__name__`` and ``setup_settings`` enter the training key.
    """

    label: str
    method: str
    method_kwargs: dict = field(default_factory=dict)
    train: dict = field(default_factory=dict)
    samplers: tuple[SamplerSpec, ...] = ()
    steps: int | None = None    # overrides the benchmark's equal-steps budget
    setup: Callable | None = None
    setup_settings: dict = field(default_factory=dict)


@dataclass
class Benchmark:
    """Models compared under one budget on one dataset, evaluated alike.

    Budget: ``steps`` optimisation steps per model, or, with ``seconds``, an equal wall-clock budget turned
    into a step count per model from a timing probe stored in the work folder (so a resumed benchmark trains
    to the same step). Evaluation: every ``eval_every`` steps (and at the end) on ``n_samples`` samples
    against ``n_reference`` real images, with every extractor of ``extractors``; the floor of each metric
    (two disjoint real sets of the same sizes) is computed in the same run.
    """

    name: str
    title: str
    models: list[ModelSpec]
    data: str = "mnist5k"
    resolution: int | None = None
    data_limit: int | None = None
    steps: int = 1000
    seconds: float | None = None
    eval_every: int = 0
    n_samples: int = 1000
    n_reference: int = 3000
    extractors: tuple[str, ...] = ("digits",)
    primary: str = "fid[digits]"
    reference_model: str | None = None
    train_defaults: dict = field(default_factory=dict)
    sample_batch: int = 250
    measure_cost: bool = True   # seconds per step and peak memory of every model, each in a fresh process
    timing_trials: int = 0      # > 0: seconds per 100 images is the median of this many timed generations
    notes: str = ""
    extra: Callable | None = None  # extra(benchmark, results, out_dir) -> dict: benchmark-specific measurements

    def model(self, label: str) -> ModelSpec:
        for m in self.models:
            if m.label == label:
                return m
        raise KeyError(label)


def _digest(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def train_settings(bench: Benchmark, model: ModelSpec, seed: int, steps: int) -> dict:
    """Everything the trained network of (model, seed) and its logged training curve depend on."""
    curve = next((asdict(s) for s in model.samplers if not s.final_only), None)
    return {"curve_sampler": curve, "n_samples": bench.n_samples, "n_reference": bench.n_reference,
            "extractors": list(bench.extractors), "method": model.method, "method_kwargs": model.method_kwargs,
            "train": {**bench.train_defaults, **model.train}, "seed": seed, "steps": steps,
            "data": [bench.data, bench.resolution, bench.data_limit], "eval_every": bench.eval_every,
            "setup": [getattr(model.setup, "__name__", None), model.setup_settings]}


def train_key(bench: Benchmark, model: ModelSpec, seed: int, steps: int) -> str:
    return _digest(train_settings(bench, model, seed, steps))


def eval_key(bench: Benchmark, sampler: SamplerSpec, n: int) -> str:
    """Everything one evaluation of a trained network depends on (besides the network)."""
    spec = asdict(sampler)
    if spec["timing_n"] == 100:  # the default leaves the keys of results stored before it existed unchanged
        del spec["timing_n"]
    timing = {"timing_trials": bench.timing_trials} if bench.timing_trials else {}
    return _digest({"sampler": spec, "n": n, "n_reference": bench.n_reference,
                    "extractors": list(bench.extractors), **timing})


def slug(label: str) -> str:
    out = "".join(c if c.isalnum() else "-" for c in label.lower())
    while "--" in out:
        out = out.replace("--", "-")
    return out.strip("-")
