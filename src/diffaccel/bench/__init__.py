"""Benchmark registry: name -> "module:function", imported lazily.

Each function has the signature ``run(out_dir: Path, quick: bool) -> dict`` and writes its results with
``diffaccel.bench.harness``.
"""

from __future__ import annotations

import importlib

from diffaccel.errors import UserError

BENCHMARKS: dict[str, str] = {
    "kl": "diffaccel.bench.kl:run",
    "dvdp": "diffaccel.bench.dvdp:run",
    "dvdp-64": "diffaccel.bench.dvdp:run_64",
    "baseline-speed": "diffaccel.bench.baseline_speed:run",
    "pds": "diffaccel.bench.pds:run",
    "pds-filters": "diffaccel.bench.pds:run_filter_sweep",
    "pds-exact": "diffaccel.bench.pds_exact:run",
    "fid-sanity": "diffaccel.bench.fid_sanity:run",
    "lddgan": "diffaccel.bench.lddgan:run",
    "stack": "diffaccel.bench.stack:run",
    "samplers": "diffaccel.bench.samplers:run",
    "samplers-t1": "diffaccel.bench.samplers:run_t1_sweep",
    "demo": "diffaccel.bench.demo:run",
}


def benchmark_function(name: str):
    if name not in BENCHMARKS:
        raise UserError(f"unknown benchmark {name!r}; choose one of: {', '.join(sorted(BENCHMARKS))}")
    module, fn = BENCHMARKS[name].split(":")
    return getattr(importlib.import_module(module), fn)
