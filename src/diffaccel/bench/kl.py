"""`diffaccel bench kl`: the KL paper's central comparison (Fig. 2 / Tables 1-2) on the shared harness.

Baseline-b16 (N = 1000), Baseline-b128 (the batch KL-1st pays for), KL-8d-b16 (1st), KL-8d-b16 (2nd),
KL-8d4-b16 (partial, plain and normalised by M'·H_N) and the ablations that isolate KL's mechanism:
the baseline on KL's N = 20 grid, the baseline with KL's noise variance v(t) = Σ phi_m²/t, and KL-1st with a
learned embedding of m added to the time embedding of k. Same UNet (``NET``: 128 sinusoids in its time
embedding, as the paper's networks), data (mnist5k at ``RESOLUTION``), optimiser and steps; DDIM(S = 20, η = 1,
x0 clipped) samples scored every ``eval_every`` steps. Reported per model (mean ± 95 % interval over ``--seeds``): the curve of FID[digits]
and legible rate against steps, training seconds and images processed, the final scores, the first step
at which a model reaches Baseline-b16's best FID (only once Baseline-b16's curve has flattened), seconds per
step and peak training memory.
"""

from __future__ import annotations

import json
from pathlib import Path

from diffaccel.bench.runner import run_benchmark
from diffaccel.bench.specs import Benchmark, ModelSpec, SamplerSpec
from diffaccel.checkpoint import list_checkpoints

REFERENCE = "Baseline-b16"
# Ten rows of three seeds must fit about four hours of a 2-core CPU, and the M = 8 rows cost 6-8x a baseline step
# and sample, so the size goes to resolution and width (16x16 digits, a 42k-parameter UNet) rather than to the
# training length; the time embedding keeps the paper's 128 sinusoids.
NET = {"preset": "tiny", "overrides": {"block_out_channels": [8, 16], "norm_num_groups": 4,
                                       "time_embedding_width": 128}}
RESOLUTION, STEPS, EVAL_EVERY = 16, 8000, 1000
QUICK_NET = {"preset": "tiny", "overrides": {"block_out_channels": [8, 16], "norm_num_groups": 4,
                                            "time_embedding_width": 32}}


def pretrained_baseline(folder: Path, seed: int, quick: bool) -> dict:
    """§6.6's starting point, shared by a seed's fine-tuning rows: Baseline-b16 trained with the same settings and
    seed for half the benchmark's steps; the row then trains from its EMA weights for the other half."""
    from diffaccel.bench.runner import exclusive_lock, train_config
    from diffaccel.methods.baseline import Baseline
    from diffaccel.methods.kl import fine_tune_settings
    from diffaccel.train import train

    bench = benchmark(quick)
    half = max(1, bench.steps // 2)
    root = Path(folder).parent.parent / "pretrained-baseline" / f"seed{seed}"
    root.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(root / "lock"):  # benchmark workers may reach two rows of one seed at once
        done = root / "trained.json"
        if not list_checkpoints(root / "run" / "checkpoints"):
            done.unlink(missing_ok=True)  # a record without its weights (a committed work folder): train again
        if not done.is_file() or json.loads(done.read_text()) != {"steps": half}:
            cfg = train_config(bench, bench.model(REFERENCE), seed, half, root / "run")
            cfg.eval_every = 0
            train(cfg, Baseline(N=1000), resume=(root / "run" / "config.yaml").is_file(), progress=False,
                  log=lambda *_: None)
            done.write_text(json.dumps({"steps": half}))
    return {"init_from": str(root / "run"), **fine_tune_settings(root / "run", 20)}


def models(sample_steps: int = 20, eta: float = 1.0, steps: int = STEPS) -> list[ModelSpec]:
    ddim = SamplerSpec(f"DDIM-{sample_steps}", {"sampler": "ddim", "steps": sample_steps, "eta": eta,
                                                "clip_x0": True})
    return [
        ModelSpec(REFERENCE, "baseline", {"N": 1000}, {"batch_size": 16}, (ddim,)),
        ModelSpec("Baseline-b128", "baseline", {"N": 1000}, {"batch_size": 128}, (ddim,)),
        ModelSpec("KL-8d-b16 (1st)", "kl", {"M": 8, "N": 20}, {"batch_size": 16}, (ddim,)),
        ModelSpec("KL-8d-b16 (2nd)", "kl", {"M": 8, "N": 20, "variant": "2nd"}, {"batch_size": 16}, (ddim,)),
        ModelSpec("KL-8d4-b16 (partial)", "kl", {"M": 8, "N": 20, "partial": 4}, {"batch_size": 16}, (ddim,)),
        ModelSpec("KL-8d4-b16 (partial, normalised)", "kl", {"M": 8, "N": 20, "partial": 4,
                                                             "partial_normalized": True}, {"batch_size": 16}, (ddim,)),
        # ablations: which ingredient of KL-1st (grid, noise variance, index layout) does what
        ModelSpec("Baseline-b16 N=20", "baseline", {"N": 20}, {"batch_size": 16}, (ddim,)),
        ModelSpec("Baseline-b16 N=20 v(t)-noise", "baseline", {"N": 20, "noise_variance": "kl", "kl_terms": 8},
                  {"batch_size": 16}, (ddim,)),
        ModelSpec("KL-8d-b16 (1st, m-embedding)", "kl", {"M": 8, "N": 20, "term_embedding": True},
                  {"batch_size": 16}, (ddim,)),
        # §6.6: continue Baseline-b16 from half its budget as KL-2nd; Baseline-b16's own curve is the
        # "continued as baseline" side (its steps = this row's steps + half)
        ModelSpec("KL-8d-b16 (2nd) from Baseline-b16 at half", "kl", {"M": 8, "N": 20, "variant": "2nd"},
                  {"batch_size": 16}, (ddim,), steps=max(1, steps // 2), setup=pretrained_baseline,
                  setup_settings={"from": REFERENCE, "steps": max(1, steps // 2)}),
    ]


def benchmark(quick: bool = False) -> Benchmark:
    resolution = 32 if quick else RESOLUTION
    common = dict(name="kl", title=f"KL diffusion vs baseline (MNIST-{resolution})", reference_model=REFERENCE)
    if quick:
        return Benchmark(**common, models=models(sample_steps=2, steps=2), data="mnist5k", resolution=resolution,
                         data_limit=200, steps=2, eval_every=1, n_samples=8, n_reference=64, sample_batch=8, measure_cost=False,
                         train_defaults={"net": QUICK_NET, "lr": 1e-3, "ema_decay": 0.995})
    return Benchmark(**common, models=models(steps=STEPS), data="mnist5k", resolution=resolution, steps=STEPS,
                     eval_every=EVAL_EVERY,
                     n_samples=2000, n_reference=3000,
                     train_defaults={"net": NET, "lr": 1e-3, "ema_decay": 0.995},
                     notes="KL's losses evaluate the network M = 8 times per image (one batched call), so a KL "
                           "step costs more than a baseline step: read the curves against training seconds as "
                           "well as steps.")


def run(out_dir: Path, quick: bool = False, seeds: int = 1, dry_run: bool = False,
        only_seed: int | None = None) -> dict:
    return run_benchmark(benchmark(quick), out_dir, seeds=seeds, dry_run_only=dry_run, quick=quick,
                         progress=not quick, only_seed=only_seed)
