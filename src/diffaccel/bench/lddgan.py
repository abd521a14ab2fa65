"""`diffaccel bench lddgan`: LDDGAN's sampling-speed and Weighted Learning comparison (paper Tables 3 and 6) on
the shared harness.

Rows, each trained for the same wall-clock budget on MNIST-32 with the same batch: DDPM (sampled with DDIM-20
and, on a subset, DDPM-1000), pixel DDGAN (T = 4), and LDDGAN (T = 4) with the generator losses adv, adv+rec and
adv+rec+WL (the paper's LDDGAN). Every LDDGAN row of a seed shares one autoencoder (f = 4, 4 latent channels),
trained by the rows' ``setup`` into the work folder for a fixed number of steps and reused. Reported per row with
``--seeds``: NFE, seconds per 100 images (decoder included: the method's sampler decodes), FID[digits], legible
rate, coverage and recall with intervals and the real-vs-real floor; the extra table holds each autoencoder's
held-out reconstruction PSNR.
"""

from __future__ import annotations

from pathlib import Path

import torch

from diffaccel.bench.runner import run_benchmark
from diffaccel.bench.specs import Benchmark, ModelSpec, SamplerSpec

REFERENCE = "LDDGAN adv+rec+WL"
AE = {"factor": 4, "latent_channels": 4, "perceptual_weight": 0.0, "adv_weight": 0.1, "disc_start": 0.5,
      "l2_weight": 1.0}
AE_STEPS, QUICK_AE_STEPS = 3000, 2
UNET = {"preset": "tiny", "overrides": {"block_out_channels": [16, 32]}}
GAN = {"preset": "tiny"}


def autoencoder(folder: Path, seed: int, quick: bool) -> dict:
    """Train (or resume, or reuse) the seed's autoencoder under ``folder``; LDDGAN's extra method settings."""
    from diffaccel.methods.autoencoder import AutoencoderMethod
    from diffaccel.train import TrainConfig, train

    out = Path(folder).parent.parent / "autoencoder" / f"seed{seed}"  # shared by every LDDGAN row of the seed
    steps = QUICK_AE_STEPS if quick else AE_STEPS
    done = out / "trained.json"
    if not done.is_file():
        cfg = TrainConfig(data="mnist5k", resolution=32, data_limit=200 if quick else None,
                          net={"preset": "tiny"}, batch_size=16 if quick else 32, lr=1e-3, steps=steps,
                          ema_decay=0.995, seed=seed, out=str(out / "run"), checkpoint_every=max(1, steps // 3),
                          keep_checkpoints=1, log_every=max(1, min(50, steps)), device="cpu")
        train(cfg, AutoencoderMethod(holdout=16 if quick else 500, **AE), resume=(out / "run" / "config.yaml").is_file(),
              progress=False, log=lambda *_: None)
        done.write_text(f'{{"steps": {steps}}}')
    return {"autoencoder": str(out / "run")}


def models(quick: bool) -> list[ModelSpec]:
    gan = (SamplerSpec("T=4", {}),)
    ddim = SamplerSpec("DDIM-20", {"sampler": "ddim", "steps": 2 if quick else 20, "clip_x0": True})
    ddpm = SamplerSpec("DDPM-1000", {"sampler": "ddpm", "clip_x0": True}, n=4 if quick else 200, final_only=True)
    latent = dict(setup=autoencoder, setup_settings={**AE, "steps": QUICK_AE_STEPS if quick else AE_STEPS})
    return [ModelSpec("DDPM", "baseline", {"N": 50 if quick else 1000}, {"net": UNET}, (ddim, ddpm)),
            ModelSpec("DDGAN (pixel)", "ddgan", {"T": 4, "gen_loss": "adv"}, samplers=gan),
            *[ModelSpec(f"LDDGAN {loss.replace('wl', 'WL')}", "lddgan", {"T": 4, "gen_loss": loss}, samplers=gan,
                        **latent) for loss in ("adv", "adv+rec", "adv+rec+wl")]]


def reconstruction_table(bench: Benchmark, results: dict, out_dir: Path) -> dict:
    """Reconstruction PSNR of each seed's autoencoder: on the images its training held out when the loaded
    method knows them, else on the first 64 data images (then seen in training, and said so)."""
    from diffaccel.bench.harness import markdown_table
    from diffaccel.methods.autoencoder import evaluate_reconstruction
    from diffaccel.runs import load_run

    rows = []
    for folder in sorted((out_dir / "work" / "setup" / "autoencoder").glob("seed*")):
        method, nets = load_run(folder / "run")
        held = getattr(method, "heldout", None)
        which = "held out by its training"
        if held is None:
            which = "first 64 data images (seen in training)"
            from diffaccel.data import load_dataset

            held = load_dataset(bench.data, bench.resolution, limit=bench.data_limit).images[:64]
        rec = evaluate_reconstruction(nets["autoencoder"].eval(), held, "cpu", extractor=None)
        rows.append({"autoencoder": folder.name, "images": f"{rec['n']}, {which}", "PSNR dB": round(rec["psnr"], 2)})
    return {"autoencoders": rows, "markdown": "## Autoencoders\n\n" + markdown_table(rows) if rows else ""}


def benchmark(quick: bool = False) -> Benchmark:
    common = dict(name="lddgan", title="LDDGAN vs pixel DDGAN vs DDPM (MNIST-32, equal training time)",
                  reference_model=REFERENCE, models=models(quick), extra=reconstruction_table,
                  train_defaults={"net": GAN, "batch_size": 16 if quick else 64, "lr": 2e-4, "ema_decay": 0.995,
                                  "max_grad_norm": 5.0})
    if quick:
        return Benchmark(**common, data="mnist5k", resolution=32, data_limit=200, steps=2, eval_every=0,
                         n_samples=6, n_reference=64, sample_batch=6, measure_cost=False)
    return Benchmark(**common, data="mnist5k", resolution=32, seconds=330.0, eval_every=0, n_samples=1000,
                     n_reference=3000, sample_batch=100, measure_cost=False,
                     notes="Equal wall-clock training per model (330 s, turned into steps by a timing probe); "
                           "the LDDGAN rows share one autoencoder per seed (f = 4, 3,000 steps, not counted in "
                           "their budget). s/100 img includes the decoder. DDPM-1000 on 200 samples.")


def run(out_dir: Path, quick: bool = False, seeds: int = 1, dry_run: bool = False) -> dict:
    torch.set_num_threads(1)
    return run_benchmark(benchmark(quick), out_dir, seeds=seeds, dry_run_only=dry_run, quick=quick,
                         progress=not quick)
