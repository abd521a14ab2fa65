"""Method registry: name -> "module:Class", imported lazily so one method's imports never slow another."""

from __future__ import annotations

import importlib

from diffaccel.errors import UserError

METHODS: dict[str, str] = {
    "baseline": "diffaccel.methods.baseline:Baseline",
    "kl": "diffaccel.methods.kl:KLDiffusion",
    "dvdp": "diffaccel.methods.dvdp:DVDP",
    "subspace": "diffaccel.methods.dvdp:SubspaceDiffusion",
    "autoencoder": "diffaccel.methods.autoencoder:AutoencoderMethod",
    "ddgan": "diffaccel.methods.ddgan:DDGAN",
    "lddgan": "diffaccel.methods.ddgan:LDDGAN",
    "score-ve": "diffaccel.methods.score_ve:ScoreVE",
}


def method_class(name: str):
    """The class registered under ``name``."""
    if name not in METHODS:
        raise UserError(f"unknown method {name!r}; choose one of: {', '.join(sorted(METHODS))}")
    module, cls = METHODS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def build_method(name: str, config: dict | None = None):
    """Rebuild a method from its registry name and the dict its ``config()`` returned."""
    return method_class(name)(**(config or {}))
