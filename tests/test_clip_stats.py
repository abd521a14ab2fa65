"""Gradient-clipping statistics in metrics.jsonl: how often clipping fired and how large the pre-clip norm was."""

import math

import pytest

from diffaccel.methods.baseline import Baseline
from diffaccel.methods.ddgan import DDGAN
from diffaccel.runs import read_metrics
from diffaccel.train import TrainConfig, train


def _cfg(out, **kw):
    base = dict(data="digits", resolution=8, data_limit=48, net={"preset": "tiny"}, batch_size=8, steps=4,
                out=str(out), log_every=2, checkpoint_every=4, device="cpu")
    return TrainConfig(**{**base, **kw})


def _records(run):
    return [r for r in read_metrics(run) if "loss" in r or any(k.startswith("loss_") for k in r)]


@pytest.mark.parametrize("max_norm, rate", [(1e-8, 1.0), (1e8, 0.0)])
def test_clip_rate_is_one_below_every_norm_and_zero_above(tmp_path, max_norm, rate):
    run = train(_cfg(tmp_path / "run", max_grad_norm=max_norm), Baseline(N=50), progress=False, log=lambda *_: None)
    records = _records(run)
    assert [r["step"] for r in records] == [2, 4]
    for r in records:
        assert r["clip_rate"] == rate
        assert math.isfinite(r["grad_norm_mean"]) and r["grad_norm_mean"] > 0
        assert r["grad_norm_max"] >= r["grad_norm_mean"]
        # the logged norm is the one before clipping: far above a tiny threshold, far below a huge one
        assert (r["grad_norm_mean"] > 1e3 * max_norm) if rate == 1.0 else (r["grad_norm_max"] < 1e-3 * max_norm)


def test_several_phases_are_logged_per_phase_and_unclipped_phases_have_no_clip_rate(tmp_path):
    run = train(_cfg(tmp_path / "gan", max_grad_norm=1e-8), DDGAN(T=2, gan_clip=True), progress=False,
                log=lambda *_: None)
    names = [p.name for p in DDGAN(T=2).phases()]
    assert len(names) > 1
    for r in _records(run):
        for n in names:
            assert r[f"clip_rate_{n}"] == 1.0
            assert math.isfinite(r[f"grad_norm_mean_{n}"]) and r[f"grad_norm_mean_{n}"] > 0
    run = train(_cfg(tmp_path / "gan-unclipped"), DDGAN(T=2), progress=False, log=lambda *_: None)
    for r in _records(run):
        assert not any(k.startswith("clip_rate") for k in r)
        assert all(r[f"grad_norm_max_{n}"] > 0 for n in names)
