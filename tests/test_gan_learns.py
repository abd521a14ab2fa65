"""A GAN that learns: on a toy two-mode data set, D separates real from fake and G covers both modes.

Shape tests cannot catch a discriminator that outputs the same logit for everything (the generator then learns
from nothing); this test trains a tiny DDGAN with the adversarial loss alone, so only D can teach G.
"""

import json

import pytest

import torch

from diffaccel.data import ImageDataset
from diffaccel.gan_health import DiscriminatorMonitor, dead_discriminators
from diffaccel.methods.ddgan import DDGAN
from diffaccel.runs import load_run
from diffaccel.train import TrainConfig, train


def _two_modes(scale: float, n: int = 512) -> torch.Tensor:
    """Every image is +scale or -scale (equal odds) plus N(0, (0.1·scale)²) noise."""
    g = torch.Generator().manual_seed(0)
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    return scale * (sign.view(n, 1, 1, 1) * torch.ones(n, 2, 4, 4) + 0.1 * torch.randn(n, 2, 4, 4, generator=g))


def _train_toy(tmp_path, scale: float):
    torch.manual_seed(0)
    method = DDGAN(T=4, gen_loss="adv", lr_d=2e-4, lr_g=2e-4)  # no clipping, as the official code
    cfg = TrainConfig(data="toy", net={"preset": "tiny", "overrides": {"output": "identity"}}, batch_size=32,
                      steps=600, out=str(tmp_path / f"run{scale}"), log_every=50, checkpoint_every=600,
                      device="cpu", ema_decay=0.9)
    run = train(cfg, method, dataset=ImageDataset(_two_modes(scale), "toy"), progress=False, log=lambda *_: None)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    _, nets = load_run(run)
    samples = method.sample_latents(nets["generator"], 400, (2, 4, 4), generator=torch.Generator().manual_seed(1))
    return records, samples / scale


def test_adversarial_loss_alone_teaches_the_generator_both_modes_at_unit_scale(tmp_path):
    records, samples = _train_toy(tmp_path, 1.0)
    gaps = [r["d_real"] - r["d_fake"] for r in records if "d_real" in r]
    assert len(gaps) == 12 and all("r1" in r for r in records if "d_real" in r)
    assert max(abs(g) for g in gaps) > 10 * 1e-3, gaps  # D told real from fake while G was learning
    # G, taught by D alone, draws both modes at the right place with about the right spread
    means = samples.mean(dim=(1, 2, 3))
    assert 0.25 < (means > 0).float().mean().item() < 0.75
    assert abs(means.abs().mean().item() - 1.0) < 0.2
    assert (samples - means.view(-1, 1, 1, 1)).std().item() < 0.5  # an untrained G: ≈ 1 or more


def test_the_same_gan_learns_nothing_on_data_of_std_0_12(tmp_path):
    """The old latent convention (scaled by the maximum into [-1, 1], std ≈ 0.12): x_t hides x_0 and D goes flat."""
    records, samples = _train_toy(tmp_path, 0.12)
    means = samples.mean(dim=(1, 2, 3))
    assert means.abs().mean().item() < 0.5  # the modes at ±1 (in units of the scale) are not found
    assert set(dead_discriminators(records)) == {""}  # and the health check says so


def test_dead_discriminator_is_warned_about_once_and_reported():
    logs = []
    monitor = DiscriminatorMonitor(patience=200, warmup=100)
    for step in range(50, 1001, 50):
        alive = step < 400
        monitor.update({"step": step, "d_real": 0.8 if alive else 5e-4, "d_fake": -0.5 if alive else 0.0},
                       logs.append)
    assert len(logs) == 1 and "dead" in logs[0] and "since step 400" in logs[0]
    records = [{"step": s, "d_real": 0.3, "d_fake": -0.3, "patch_d_real": 2e-4, "patch_d_fake": 0.0}
               for s in range(0, 500, 50)]
    assert set(dead_discriminators(records)) == {"patch_"}


def test_weighted_learning_on_resume_with_more_steps_follows_the_longer_schedule(tmp_path):
    """λ(step) = WL(step / --steps) of the run's current length: a run resumed to 8 steps weights steps 5-8 as an
    uninterrupted 8-step run does (its first 4 steps were trained under the 4-step schedule, as they happened)."""
    from diffaccel.methods.ddgan import weighted_learning_weight

    images = ImageDataset(_two_modes(1.0, 64), "toy")

    def cfg(out, steps):
        return TrainConfig(data="toy", net={"preset": "tiny", "overrides": {"output": "identity"}}, batch_size=8,
                           steps=steps, out=str(out), log_every=1, checkpoint_every=4, device="cpu")

    def weights(run):
        return {r["step"]: r["rec_weight"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
                if "rec_weight" in r}

    full = train(cfg(tmp_path / "full", 8), DDGAN(T=2, gen_loss="adv+rec+wl"), dataset=images, progress=False,
                 log=lambda *_: None)
    train(cfg(tmp_path / "part", 4), DDGAN(T=2, gen_loss="adv+rec+wl"), dataset=images, progress=False,
          log=lambda *_: None)
    resumed = train(cfg(tmp_path / "part", 8), DDGAN(T=2, gen_loss="adv+rec+wl"), dataset=images, resume=True,
                    progress=False, log=lambda *_: None)
    w_full, w_resumed = weights(full), weights(resumed)
    # the record of step s holds the weight used at trainer step s - 1
    assert w_full == {s: pytest.approx(weighted_learning_weight(s - 1, 8)) for s in range(1, 9)}
    assert {s: w_resumed[s] for s in range(5, 9)} == {s: w_full[s] for s in range(5, 9)}
    assert {s: w_resumed[s] for s in range(1, 5)} == {s: pytest.approx(weighted_learning_weight(s - 1, 4))
                                                     for s in range(1, 5)}
