"""`diffaccel bench lddgan`: LDDGAN's sampling-speed and generator-loss comparison (paper Tables 3, 6 and 7) on
the shared harness.

Rows, each trained for the same wall-clock budget on MNIST-32 with the same batch: pixel DDPM (sampled with
DDIM-20 and, on a subset, DDPM-1000), latent DDPM (the same baseline in the f = 4 autoencoder's latent space,
DDIM-20: it separates "latent" from "GAN"), pixel DDGAN (T = 4), and LDDGAN (T = 4) with the generator losses
adv, adv+rec and adv+rec+WL (the paper's LDDGAN) on the f = 4 autoencoder, plus adv+rec+WL on an f = 2 one and
on a KL-penalised f = 4 one (Table 7). Each autoencoder is trained once, by the rows' ``setup``, into the work
folder for a fixed number of steps and reused by every row and seed that names it (the seeds' spread is the
diffusion model's, not the autoencoder's). Reported per row with ``--seeds``: NFE, seconds per 100 images (median
of timed trials, decoder included: the method's sampler decodes), FID[digits], legible rate, coverage and recall
with intervals and the real-vs-real floor; the extra tables hold each autoencoder's held-out reconstruction PSNR
and every discriminator's logit gap |D(real) − D(fake)| at the end of its run (a dead D has ≈ 0).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from diffaccel.bench.runner import run_benchmark
from diffaccel.bench.specs import Benchmark, ModelSpec, SamplerSpec, slug
from diffaccel.checkpoint import list_checkpoints

REFERENCE = "LDDGAN adv+rec+WL"
AE_COMMON = {"perceptual_weight": 0.0, "adv_weight": 0.1, "disc_start": 0.5, "l2_weight": 1.0}
AUTOENCODERS = {"f4": {"factor": 4, "latent_channels": 4, **AE_COMMON},
                "f2": {"factor": 2, "latent_channels": 2, **AE_COMMON},
                "f4-kl": {"factor": 4, "latent_channels": 4, "kl_penalty": 1e-3, **AE_COMMON}}
AE_STEPS, QUICK_AE_STEPS = 1500, 2
UNET = {"preset": "tiny", "overrides": {"block_out_channels": [16, 32]}}
GAN = {"preset": "tiny"}
SECONDS = 200.0


def train_autoencoder(out: Path, settings: dict, quick: bool) -> Path:
    """Train (or resume, or reuse) one autoencoder run in ``out``; returns the run directory."""
    from diffaccel.methods.autoencoder import AutoencoderMethod
    from diffaccel.train import TrainConfig, train

    steps = QUICK_AE_STEPS if quick else AE_STEPS
    key = {"steps": steps, "settings": settings}
    done, started = out / "trained.json", out / "training.json"
    if done.is_file() and not list_checkpoints(out / "run" / "checkpoints"):
        shutil.rmtree(out)  # a record without its weights (a committed work folder): train it again
    if not done.is_file() or json.loads(done.read_text()) != key:
        if out.exists() and (not started.is_file() or json.loads(started.read_text()) != key):
            shutil.rmtree(out)  # a run of other settings: retrain, never resume it under these
        out.mkdir(parents=True, exist_ok=True)
        started.write_text(json.dumps(key))
        cfg = TrainConfig(data="mnist5k", resolution=32, data_limit=200 if quick else None,
                          net={"preset": "tiny"}, batch_size=16 if quick else 32, lr=1e-3, steps=steps,
                          ema_decay=0.995, seed=0, out=str(out / "run"), checkpoint_every=max(1, steps // 3),
                          keep_checkpoints=1, log_every=max(1, min(50, steps)), device="cpu")
        train(cfg, AutoencoderMethod(holdout=16 if quick else 500, **settings),
              resume=(out / "run" / "config.yaml").is_file(), progress=False, log=lambda *_: None)
        done.write_text(json.dumps(key))
    return out / "run"


def autoencoder_setup(name: str):
    """A row ``setup`` that trains (once, shared by every row and seed naming it) the autoencoder ``name``."""
    def setup(folder: Path, seed: int, quick: bool) -> dict:
        root = Path(folder).parent.parent / "autoencoder" / name
        return {"autoencoder": str(train_autoencoder(root, AUTOENCODERS[name], quick))}

    setup.__name__ = f"autoencoder_{slug(name)}"
    return setup


def latent(name: str, quick: bool) -> dict:
    steps = QUICK_AE_STEPS if quick else AE_STEPS
    return dict(setup=autoencoder_setup(name), setup_settings={**AUTOENCODERS[name], "steps": steps})


def models(quick: bool) -> list[ModelSpec]:
    gan = (SamplerSpec("T=4", {}),)
    ddim = SamplerSpec("DDIM-20", {"sampler": "ddim", "steps": 2 if quick else 20, "clip_x0": True})
    latent_ddim = SamplerSpec("DDIM-20", {"sampler": "ddim", "steps": 2 if quick else 20})  # latents: no clip
    ddpm = SamplerSpec("DDPM-1000", {"sampler": "ddpm", "clip_x0": True}, n=4 if quick else 100, final_only=True,
                       timing_n=2 if quick else 10)
    N = 50 if quick else 1000
    lddgan = [ModelSpec(f"LDDGAN {loss.replace('wl', 'WL')}", "lddgan", {"T": 4, "gen_loss": loss}, samplers=gan,
                        **latent("f4", quick)) for loss in ("adv", "adv+rec", "adv+rec+wl")]
    return [ModelSpec("DDPM", "baseline", {"N": N}, {"net": UNET}, (ddim, ddpm)),
            ModelSpec("Latent DDPM", "baseline", {"N": N}, {"net": UNET}, (latent_ddim,), **latent("f4", quick)),
            ModelSpec("DDGAN (pixel)", "ddgan", {"T": 4, "gen_loss": "adv"}, samplers=gan),
            *lddgan,
            ModelSpec("LDDGAN adv+rec+WL f=2", "lddgan", {"T": 4, "gen_loss": "adv+rec+wl"}, samplers=gan,
                      **latent("f2", quick)),
            ModelSpec("LDDGAN adv+rec+WL KL-AE", "lddgan", {"T": 4, "gen_loss": "adv+rec+wl"}, samplers=gan,
                      **latent("f4-kl", quick))]


def reconstruction_rows(bench: Benchmark, out_dir: Path) -> list[dict]:
    """Reconstruction PSNR of each autoencoder: on the images its training held out when the loaded method knows
    them, else on the first 64 data images (then seen in training, and said so)."""
    from diffaccel.data import ImageDataset
    from diffaccel.methods.autoencoder import evaluate_reconstruction, training_images
    from diffaccel.runs import load_run

    rows = []
    for folder in sorted((out_dir / "work" / "setup" / "autoencoder").iterdir()):
        if not (folder / "trained.json").is_file():
            continue
        if not list_checkpoints(folder / "run" / "checkpoints"):
            rows.append({"autoencoder": folder.name, "images": "weights not in this checkout (committed work folder)",
                         "PSNR dB": None, "patch D gap": final_logit_gap(folder / "run", "patch_")})
            continue
        method, nets = load_run(folder / "run")
        if method.holdout:  # a reloaded method knows its held-out images only once prepared on its data
            method.prepare(ImageDataset(training_images(folder / "run"), bench.data), "cpu")
        held = getattr(method, "heldout", None)
        which = "held out by its training"
        if held is None:
            which = "first 64 data images (seen in training)"
            from diffaccel.data import load_dataset

            held = load_dataset(bench.data, bench.resolution, limit=bench.data_limit).images[:64]
        rec = evaluate_reconstruction(nets["autoencoder"].eval(), held, "cpu", extractor=None)
        gap = final_logit_gap(folder / "run", "patch_")
        rows.append({"autoencoder": folder.name, "images": f"{rec['n']}, {which}", "PSNR dB": round(rec["psnr"], 2),
                     "patch D gap": gap})
    return rows


def final_logit_gap(run_dir: Path, prefix: str = "", tail: float = 0.2) -> float | None:
    """Mean |D(real) − D(fake)| over the last ``tail`` of a run's logged records (None: no discriminator)."""
    from diffaccel.gan_health import logit_gaps, mean_abs_gap
    from diffaccel.runs import read_metrics

    gaps = logit_gaps(read_metrics(run_dir), prefix)
    return mean_abs_gap(gaps[-max(1, int(len(gaps) * tail)):]) if gaps else None


def extra_tables(bench: Benchmark, results: dict, out_dir: Path) -> dict:
    from diffaccel.bench.harness import markdown_table
    from diffaccel.gan_health import DEAD_GAP

    gaps = []
    for (label, seed), _ in sorted(results.items()):
        run_dir = out_dir / "work" / slug(label) / f"seed{seed}" / "run"
        gap = final_logit_gap(run_dir)
        if gap is not None:
            gaps.append({"model": label, "seed": seed, "D logit gap (last 20 % of logs)": gap,
                         "alive": gap >= DEAD_GAP})
    ae = reconstruction_rows(bench, out_dir)
    md = ""
    if ae:
        md += "## Autoencoders\n\n" + markdown_table(ae, floatfmt=".3g") + "\n\n"
    if gaps:
        md += (f"## Discriminators at the end of training\n\n|D(real) − D(fake)| in logits, averaged over the last "
               f"20 % of logged records; below {DEAD_GAP} counts as dead (docs/lddgan.md).\n\n"
               + markdown_table(gaps, floatfmt=".3g"))
    return {"autoencoders": ae, "discriminators": gaps, "markdown": md}


def equal_time_benchmark(quick: bool, notes: str = "", **common) -> Benchmark:
    """The protocol `bench lddgan` and `bench stack` share: MNIST-32, ``SECONDS`` of training per model (batch 64,
    lr 2e-4, EMA 0.995 unless a row says otherwise), 1,000 samples per row against 3,000 real images, seconds per
    100 images from 5 timed trials."""
    common["train_defaults"] = {"net": GAN, "batch_size": 16 if quick else 64, "lr": 2e-4, "ema_decay": 0.995}
    if quick:
        return Benchmark(**common, data="mnist5k", resolution=32, data_limit=200, steps=2, eval_every=0,
                         n_samples=6, n_reference=64, sample_batch=6, measure_cost=False, timing_trials=2)
    return Benchmark(**common, data="mnist5k", resolution=32, seconds=SECONDS, eval_every=0, n_samples=1000,
                     n_reference=3000, sample_batch=100, measure_cost=False, timing_trials=5, notes=notes)


def benchmark(quick: bool = False) -> Benchmark:
    return equal_time_benchmark(
        quick, name="lddgan", title="LDDGAN vs pixel DDGAN vs latent and pixel DDPM (MNIST-32, equal training time)",
        reference_model=REFERENCE, models=models(quick), extra=extra_tables,
        notes=f"Equal wall-clock training per model ({SECONDS:.0f} s, turned into steps by a timing probe); every "
              "autoencoder trained once (1,500 steps, seed 0, not counted in any budget) and shared by its rows and "
              "seeds. GAN phases unclipped (DDPM rows: the trainer's clip 1.0); D/G learning rates 1.25e-4/1.6e-4, "
              "Adam (0.5, 0.9). s/100 img: median of 5 timed trials of 100 images (DDPM-1000: of 10 images), "
              "decoder included. DDPM-1000 scored on 100 samples.")


def run(out_dir: Path, quick: bool = False, seeds: int = 1, dry_run: bool = False,
        only_seed: int | None = None) -> dict:
    torch.set_num_threads(1)
    return run_benchmark(benchmark(quick), out_dir, seeds=seeds, dry_run_only=dry_run, quick=quick,
                         progress=not quick, only_seed=only_seed)
