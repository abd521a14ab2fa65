"""diffusers pipelines for the methods whose sampler is not a standard diffusers one (docs/diffusers.md).

``PIPELINES``: method name -> "module:Class", imported lazily as the method registry is.
"""

from __future__ import annotations

import importlib

from diffaccel.errors import UserError

PIPELINES: dict[str, str] = {
    "kl": "diffaccel.pipelines.kl:KLPipeline",
    "dvdp": "diffaccel.pipelines.dvdp:DVDPPipeline",
    "subspace": "diffaccel.pipelines.dvdp:SubspacePipeline",
    "score-ve": "diffaccel.pipelines.score_ve:ScoreVEPipeline",
    "ddgan": "diffaccel.pipelines.ddgan:DDGANPipeline",
    "lddgan": "diffaccel.pipelines.ddgan:LDDGANPipeline",
}


def __getattr__(name: str):
    for path in PIPELINES.values():
        module, cls = path.split(":")
        if cls == name:
            return getattr(importlib.import_module(module), cls)
    raise AttributeError(name)


def pipeline_for(config: dict, method, nets):
    """The pipeline object of a loaded run (``method``, ``nets`` from ``load_run``)."""
    name = config["method"]
    if name not in PIPELINES:
        raise UserError(f"{name!r} runs have no pipeline; exportable: baseline, {', '.join(PIPELINES)}")
    module, cls = PIPELINES[name].split(":")
    return getattr(importlib.import_module(module), cls).from_run(config, method, nets)
