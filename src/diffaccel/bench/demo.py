"""`diffaccel bench demo` (what `make demo` runs): LDDGAN trained in a few CPU minutes on the bundled digits, and
what it gains, measured in the same run, against the DDPM sampling it replaces.

LDDGAN (adv+rec generator loss, T = 4, on the 4 × 8 × 8 latents of a small autoencoder trained first) draws
an image with 4 generator calls and one decoder call; DDPM draws one with 1,000 UNet calls. Both times are
measured here on the same batch: LDDGAN's whole sampler, and DDPM-1000 as 1,000 × the mean time of one call
of the DDPM UNet of `bench lddgan` (widths 16/32; a call's cost does not depend on its weights, so that UNet
is not trained). The legible rate is the digits classifier's share of confident samples (docs/evaluation.md).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from diffaccel.bench.lddgan import AUTOENCODERS, GAN, UNET

AE = AUTOENCODERS["f4"]

FULL = {"ae_steps": 400, "gan_steps": 1200, "n": 64, "ddpm_calls": 5}
QUICK = {"ae_steps": 2, "gan_steps": 2, "n": 8, "ddpm_calls": 1}


def _train(method, out: Path, steps: int, batch: int, net: dict, lr: float, quick: bool, **extra) -> Path:
    from diffaccel.train import TrainConfig, train

    cfg = TrainConfig(data="mnist5k", resolution=32, data_limit=200 if quick else None, net=net, batch_size=batch,
                      lr=lr, steps=steps, ema_decay=0.995, out=str(out), checkpoint_every=steps, keep_checkpoints=1,
                      log_every=max(1, min(100, steps)), device="cpu", sample_n=16, **extra)
    return train(cfg, method, progress=not quick, log=lambda *_: None)


def _seconds(fn, repeat: int = 1) -> float:
    fn()  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t0) / repeat


def run(out_dir: Path, quick: bool = False) -> dict:
    from diffaccel.bench.harness import machine_info, markdown_table
    from diffaccel.data import load_dataset, save_grid
    from diffaccel.evaluate import score_images
    from diffaccel.methods.autoencoder import AutoencoderMethod
    from diffaccel.methods.ddgan import LDDGAN
    from diffaccel.nets.unet import build_unet
    from diffaccel.runs import load_run

    started = time.time()
    s = QUICK if quick else FULL
    out_dir = Path(out_dir)
    ae_run = _train(AutoencoderMethod(holdout=16 if quick else 200, **AE), out_dir / "autoencoder", s["ae_steps"],
                    16 if quick else 32, {"preset": "tiny"}, 1e-3, quick)
    t_ae = time.time() - started
    gan_run = _train(LDDGAN(autoencoder=str(ae_run), T=4, gen_loss="adv+rec"), out_dir / "lddgan", s["gan_steps"],
                     16 if quick else 64, GAN, 2e-4, quick, max_grad_norm=5.0)
    t_gan = time.time() - started - t_ae

    method, nets = load_run(gan_run)
    net = nets[method.sampling_network].eval()
    n = s["n"]
    with torch.inference_mode():
        def lddgan_sample():
            return method.sample(net, n, (1, 32, 32), generator=torch.Generator().manual_seed(0), progress=False)

        lddgan_s = _seconds(lddgan_sample)
        images = lddgan_sample()
        unet = build_unet(UNET["preset"], 1, 1, 32, **UNET["overrides"]).eval()
        x, k = torch.randn(n, 1, 32, 32), torch.full((n,), 500.0)
        ddpm_s = 1000 * _seconds(lambda: unet(x, k), repeat=s["ddpm_calls"])
    grid = out_dir / "samples.png"
    save_grid(images, grid)
    real = load_dataset("mnist5k", 32, limit=1000 if not quick else 200).images
    scores = score_images(real, images, extractor="digits", cache=False)
    results = {"n": n, "autoencoder_steps": s["ae_steps"], "lddgan_steps": s["gan_steps"],
               "autoencoder_train_s": round(t_ae, 1), "lddgan_train_s": round(t_gan, 1),
               "lddgan_sample_s": lddgan_s, "ddpm1000_sample_s": ddpm_s, "speedup": ddpm_s / lddgan_s,
               "legible_rate": scores["legible_rate"], "class_coverage": scores.get("class_coverage"),
               "machine": machine_info(), "wall_s": round(time.time() - started, 1)}
    (out_dir / "results.json").write_text(json.dumps(results, indent=1, default=float))
    rows = [{"sampler": "LDDGAN, T = 4 (+ decoder)", "network calls / image": 4, f"seconds for {n} images": lddgan_s},
            {"sampler": "DDPM-1000 (the baseline it replaces)", "network calls / image": 1000,
             f"seconds for {n} images": ddpm_s}]
    report = [
        "# diffaccel demo: LDDGAN on MNIST-32", "",
        f"Machine: {results['machine']['device']}, torch {results['machine']['torch']}, "
        f"{results['machine']['date']}; wall time {results['wall_s']} s.", "",
        f"Trained here: an autoencoder ({s['ae_steps']} steps, {t_ae:.0f} s), then LDDGAN on its 4 × 8 × 8 latents "
        f"({s['gan_steps']} steps, {t_gan:.0f} s).", "",
        f"**Sampling {n} images: LDDGAN {lddgan_s:.2f} s, DDPM-1000 {ddpm_s:.1f} s: {ddpm_s / lddgan_s:.0f}× "
        "faster**, measured in this run on this machine (DDPM-1000 as 1,000 × one call of its UNet on the same "
        "batch).", "", markdown_table(rows), "",
        f"Legible rate of these {n} samples (digits classifier, top class probability ≥ 0.9): "
        f"**{scores['legible_rate']:.2f}**" + (f"; class coverage {scores['class_coverage']:.2f}"
                                               if "class_coverage" in scores else "") + ".", "",
        "![samples](samples.png)", ""]
    (out_dir / "report.md").write_text("\n".join(report))
    print("\n".join(report[:9]) + f"\nreport: {out_dir / 'report.md'}\nsamples: {grid}")
    return results
