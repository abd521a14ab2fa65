"""Reliability guarantees: exact resume after SIGKILL, atomic verified checkpoints, clear errors for bad input,
the non-finite guard and disk-full handling. Everything runs on CPU with 8×8 digits and a two-level 16/32 UNet."""

from __future__ import annotations

import argparse
import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from safetensors import SafetensorError
from safetensors.torch import load_file

import diffaccel.checkpoint as checkpoint
from diffaccel import cli
from diffaccel.checkpoint import latest_valid, list_checkpoints, load_checkpoint, save_checkpoint, verify
from diffaccel.data import IMAGE_SUFFIXES, load_dataset
from diffaccel.errors import UserError
from diffaccel.methods.base import Method, Phase
from diffaccel.methods.baseline import Baseline
from diffaccel.runs import load_run, read_config, read_metrics
from diffaccel.train import TrainConfig, Trainer, train

SRC = Path(__file__).resolve().parents[1] / "src"
NET = {"block_out_channels": [16, 32], "norm_num_groups": 8}
CLI_TINY = ["--method", "baseline", "--time-steps", "50", "--data", "digits", "--data-limit", "64", "--preset", "tiny",
            "--net-config", json.dumps(NET), "--batch-size", "8", "--device", "cpu", "--log-every", "1"]


def tiny_cfg(out: Path, **kw) -> TrainConfig:
    base = dict(data="digits", data_limit=64, net={"preset": "tiny", "overrides": NET}, batch_size=8, steps=4,
                log_every=1, checkpoint_every=2, device="cpu", out=str(out), sample_n=4,
                sample_options={"steps": 2})
    return TrainConfig(**{**base, **kw})


def quiet(*_args, **_kw):
    pass


def run_cli(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "diffaccel.cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def losses(run_dir: Path) -> list[tuple]:
    """The loss trajectory of a run: (step, loss, lr) of every logged step (timings differ between runs)."""
    return [(r["step"], r["loss"], r["lr"]) for r in read_metrics(run_dir) if "loss" in r]


def assert_same_checkpoint(a: Path, b: Path) -> None:
    for name in ("weights.safetensors", "ema.safetensors"):
        ta, tb = load_file(a / name), load_file(b / name)
        assert ta.keys() == tb.keys()
        for k in ta:
            assert torch.equal(ta[k], tb[k]), f"{name}:{k} differs"
    sa, sb = (torch.load(p / "state.pt", weights_only=True) for p in (a, b))
    for (ka, va), (kb, vb) in zip(_leaves(sa), _leaves(sb), strict=True):
        assert ka == kb
        if isinstance(va, torch.Tensor):
            assert torch.equal(va, vb), f"state {ka} differs"
        else:
            assert va == vb, f"state {ka} differs"


def _leaves(obj, prefix=""):
    if isinstance(obj, dict):
        for k in sorted(obj, key=str):
            yield from _leaves(obj[k], f"{prefix}.{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _leaves(v, f"{prefix}[{i}]")
    else:
        yield prefix, obj


# --- 1. crash and resume ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("space", ["pixel", "latent"])
def test_sigkill_at_a_random_step_then_resume_equals_uninterrupted_run(tmp_path, space):
    """A real `diffaccel train` is SIGKILLed mid-run; --resume gives the same losses and bitwise the same weights,
    EMA, optimiser, data-order and RNG state as an uninterrupted run with the same seed. The latent case is KL
    diffusion on an autoencoder's latents (two runs reading one autoencoder run at once)."""
    steps = 12
    args = [*CLI_TINY, "--steps", str(steps), "--checkpoint-every", "3", "--seed", "7", "--hflip"]
    if space == "latent":
        ae = tmp_path / "ae"
        cli.main(["train", "--method", "autoencoder", "--data", "digits", "--data-limit", "64", "--preset", "tiny",
                  "--batch-size", "8", "--steps", "2", "--checkpoint-every", "2", "--ae-factor", "2",
                  "--latent-channels", "2", "--sample-every", "0", "--device", "cpu", "--out", str(ae)])
        args += ["--method", "kl", "--time-steps", "20", "--kl-terms", "3", "--autoencoder", str(ae)]
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    ref_out, crash_out = tmp_path / "reference", tmp_path / "crashed"
    reference = subprocess.Popen([sys.executable, "-m", "diffaccel.cli", "train", *args, "--out", str(ref_out)],
                                 env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    kill_after = random.Random().randint(2, steps - 2)  # logged step after which the kill lands (a random step)
    crashed = subprocess.Popen([sys.executable, "-m", "diffaccel.cli", "train", *args, "--out", str(crash_out)],
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and crashed.poll() is None:
        if any(r.get("step", 0) >= kill_after for r in read_metrics(crash_out)):
            break
        time.sleep(0.02)
    assert crashed.poll() is None, "the run ended before it could be killed"
    crashed.send_signal(signal.SIGKILL)
    crashed.wait()
    killed_at = max(r["step"] for r in read_metrics(crash_out))
    assert killed_at < steps
    resumed = run_cli(["train", "--resume", "--out", str(crash_out)])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed" in resumed.stdout or "no checkpoint yet" in resumed.stdout
    _, ref_err = reference.communicate(timeout=300)
    assert reference.returncode == 0, ref_err[-3000:]

    assert losses(crash_out) == losses(ref_out), f"loss trajectory differs after a kill at step {killed_at}"
    assert [r["step"] for r in read_metrics(crash_out) if "loss" in r] == list(range(1, steps + 1))
    final = f"step_{steps:07d}"
    assert_same_checkpoint(crash_out / "checkpoints" / final, ref_out / "checkpoints" / final)


def test_a_killed_subspace_run_resumes_with_a_freshly_built_method(tmp_path, monkeypatch):
    """The fitted jump's detail variance is fitted when training starts and saved in the config; resuming with a
    method built afresh (as a benchmark or a library user does) adopts it instead of refusing the run or refitting,
    and ends bitwise where the uninterrupted run does."""
    from diffaccel.methods.dvdp import SubspaceDiffusion

    def method():
        return SubspaceDiffusion(turning_points=(25,), T=50, jump="fitted")

    cfg = dict(resolution=16, steps=4, checkpoint_every=2, sample_every=0)
    ref, crashed = tmp_path / "reference", tmp_path / "crashed"
    train(tiny_cfg(ref, **cfg), method(), progress=False, log=quiet)
    train(tiny_cfg(crashed, **cfg), method(), progress=False, log=quiet)
    shutil.rmtree(crashed / "checkpoints" / "step_0000004")  # a kill after the step-2 checkpoint
    saved = read_config(crashed, rebuild=False)["method_config"]["detail_variance"]

    def refit(*_a, **_kw):
        raise AssertionError("a resumed run must keep the detail variance it was trained with")

    monkeypatch.setattr(SubspaceDiffusion, "fit_detail_variance", refit)
    fresh = method()
    train(tiny_cfg(crashed, **cfg), fresh, resume=True, progress=False, log=quiet)
    assert list(fresh.detail_variance) == saved
    assert losses(crashed) == losses(ref)
    assert_same_checkpoint(crashed / "checkpoints" / "step_0000004", ref / "checkpoints" / "step_0000004")


def test_resuming_a_fitted_subspace_run_with_a_noise_jump_is_refused(tmp_path):
    from diffaccel.methods.dvdp import SubspaceDiffusion

    cfg = tiny_cfg(tmp_path / "run", resolution=16, steps=2, checkpoint_every=2, sample_every=0)
    train(cfg, SubspaceDiffusion(turning_points=(25,), T=50, jump="fitted"), progress=False, log=quiet)
    with pytest.raises(UserError, match="method settings"):
        train(cfg, SubspaceDiffusion(turning_points=(25,), T=50, jump="noise"), resume=True, progress=False,
              log=quiet)


# --- 2. atomic, verified checkpoints ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def good_run(tmp_path_factory) -> Path:
    """A finished tiny baseline run with checkpoints at steps 2 and 4 (copy it before damaging it)."""
    out = tmp_path_factory.mktemp("good") / "run"
    train(tiny_cfg(out), Baseline(N=50), progress=False, log=quiet)
    return out


def copy_run(run: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    return dst


def snapshot(ckpt: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(ckpt.iterdir())}


@pytest.mark.parametrize("failing", ["safetensors", "torch.save"])
def test_checkpoint_write_interrupted_midway_never_replaces_the_previous_one(good_run, tmp_path, monkeypatch,
                                                                           failing):
    run = copy_run(good_run, tmp_path)
    root = run / "checkpoints"
    before = {c.name: snapshot(c) for c in list_checkpoints(root)}
    meta, weights, ema, state = load_checkpoint(root / "step_0000004")

    def write_half_then_fail(obj, path, *a, **kw):  # the disk fails half-way through a file, as each library reports it
        Path(path).write_bytes(b"\x00" * 100)
        if failing == "safetensors":
            raise SafetensorError("Error while serializing: IoError(Os { code: 5, kind: Uncategorized })")
        raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")

    monkeypatch.setattr(checkpoint if failing == "safetensors" else checkpoint.torch,
                        "save_file" if failing == "safetensors" else "save", write_half_then_fail)
    with pytest.raises(UserError, match="could not write checkpoint .*step_0000004.*previous checkpoints are intact"):
        save_checkpoint(root, 4, {"method": "baseline"}, weights, ema, state)  # rewriting the same step is the
    # hardest case: the good step_0000004 must still be there, byte for byte
    assert {c.name: snapshot(c) for c in list_checkpoints(root)} == before
    assert not [p for p in root.iterdir() if p.name.startswith(".")], "temporary folder left behind"
    monkeypatch.undo()
    assert latest_valid(root, log=quiet) == root / "step_0000004"


def test_a_killed_write_leaves_only_a_temporary_folder_that_resume_ignores(good_run, tmp_path):
    run = copy_run(good_run, tmp_path)
    root = run / "checkpoints"
    shutil.copytree(root / "step_0000004", root / ".tmp_step_0000006")  # what SIGKILL during save leaves
    (root / ".tmp_step_0000006" / "state.pt").write_bytes(b"cut")
    assert list_checkpoints(root)[-1].name == "step_0000004"
    logs = []
    trainer = Trainer(tiny_cfg(run, steps=6), Baseline(N=50), resume=True, progress=False, log=logs.append)
    assert trainer.step == 4
    trainer.run()
    assert verify(root / "step_0000006")["step"] == 6
    assert not (root / ".tmp_step_0000006").exists()


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "meta"])
def test_damaged_checkpoint_is_named_and_resume_falls_back_to_the_previous_one(good_run, tmp_path, capsys, damage):
    run = copy_run(good_run, tmp_path)
    newest = run / "checkpoints" / "step_0000004"
    target = newest / ("meta.json" if damage == "meta" else "weights.safetensors")
    data = target.read_bytes()
    if damage == "truncate":
        target.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        target.write_bytes(data[:-10] + bytes(b ^ 0xFF for b in data[-10:]))
    elif damage == "delete":
        target.unlink()
    else:
        target.write_text('{"step": 4, "sha2')
    with pytest.raises(UserError) as info:
        load_checkpoint(newest)
    assert str(newest) in str(info.value) and target.name in str(info.value)

    # `diffaccel train --resume` says what is broken, falls back to step 2 and redoes steps 3-4
    cli.main(["train", "--resume", "--out", str(run), "--steps", "4"])  # (a copy: resume must write here)
    out = capsys.readouterr().out
    assert target.name in out and "falling back to the previous checkpoint" in out
    assert "resumed" in out and "step_0000002" in out
    assert verify(newest)["step"] == 4
    assert losses(run)[:2] == losses(good_run)[:2] and len(losses(run)) == 4
    assert (run / "checkpoints" / ".broken_step_0000004").is_dir()  # kept for inspection, out of the way


def test_a_broken_newer_checkpoint_cannot_push_good_ones_out(good_run, tmp_path):
    run = copy_run(good_run, tmp_path)
    root = run / "checkpoints"
    (root / "step_0000004" / "state.pt").write_bytes(b"cut")
    # resumed from step 2 with checkpoints every 3 steps: the broken step 4 is never rewritten
    train(tiny_cfg(run, steps=6, checkpoint_every=3, keep_checkpoints=2), Baseline(N=50), resume=True,
          progress=False, log=quiet)
    assert [c.name for c in list_checkpoints(root)] == ["step_0000003", "step_0000006"]
    assert all(verify(c) for c in list_checkpoints(root))


def test_state_file_is_never_unpickled_with_code(good_run, tmp_path):
    run = copy_run(good_run, tmp_path)
    ckpt = run / "checkpoints" / "step_0000004"
    witness = tmp_path / "code-was-run"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (witness,))

    torch.save({"step": 4, "payload": Payload()}, ckpt / "state.pt")
    meta = json.loads((ckpt / "meta.json").read_text())  # a forged checkpoint whose checksums match
    meta["sha256"]["state.pt"] = checkpoint._sha256(ckpt / "state.pt")
    (ckpt / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="state.pt"):
        load_checkpoint(ckpt)
    assert not witness.exists()
    with pytest.raises(UserError, match="state.pt"):
        Trainer(tiny_cfg(run, steps=6), Baseline(N=50), resume=True, progress=False, log=quiet)
    assert not witness.exists()


def test_checkpoint_of_another_architecture_is_refused_saying_which(good_run, tmp_path):
    other = tmp_path / "wide"
    train(tiny_cfg(other, steps=2, net={"preset": "tiny", "overrides": {**NET, "block_out_channels": [16, 48]}}),
          Baseline(N=50), progress=False, log=quiet)
    with pytest.raises(UserError, match=r"do not fit this network architecture \(.*shape of .* is .*48"):
        load_run(good_run, checkpoint=other / "checkpoints" / "step_0000002")
    # resuming a run whose checkpoint folder holds the other network's weights
    run = copy_run(good_run, tmp_path)
    shutil.copytree(other / "checkpoints" / "step_0000002", run / "checkpoints" / "step_0000009")
    with pytest.raises(UserError, match="step_0000009.*do not fit this network architecture"):
        Trainer(tiny_cfg(run, steps=10), Baseline(N=50), resume=True, progress=False, log=quiet)


def test_checkpoint_of_another_method_is_refused_saying_which(good_run, tmp_path):
    from diffaccel.methods.kl import KLDiffusion

    kl_run = tmp_path / "kl"
    train(tiny_cfg(kl_run, steps=2), KLDiffusion(M=2, N=10), progress=False, log=quiet)
    with pytest.raises(UserError, match="from method 'kl'.*'baseline'"):
        load_run(good_run, checkpoint=kl_run / "checkpoints" / "step_0000002")
    run = copy_run(good_run, tmp_path)
    shutil.copytree(kl_run / "checkpoints" / "step_0000002", run / "checkpoints" / "step_0000009")
    with pytest.raises(UserError, match="from method 'kl', not 'baseline'"):
        Trainer(tiny_cfg(run, steps=10), Baseline(N=50), resume=True, progress=False, log=quiet)
    with pytest.raises(UserError, match="trained with method 'baseline', not 'kl'"):
        Trainer(tiny_cfg(run, steps=10), KLDiffusion(M=2, N=10), resume=True, progress=False, log=quiet)


# --- 4. non-finite guard ----------------------------------------------------------------------------------------
class Toy(Method):
    """A deterministic toy method (net(x0/2) ≈ x0) whose loss or gradient is made non-finite on chosen steps.

    ``kind``: "loss" multiplies the loss by NaN; "grad" adds sqrt(0·Σθ), finite in value but NaN in gradient;
    "weights" overwrites a weight with NaN before the forward pass (a diverged network)."""

    name = "toy"

    def __init__(self, poison=(), kind="loss"):
        self.poison, self.kind = set(poison), kind

    def phases(self):
        return [Phase("main", ("net",), self._loss)]

    def _loss(self, nets, x0, step):
        net = nets["net"]
        bad = step in self.poison
        if bad and self.kind == "weights":
            with torch.no_grad():
                next(net.parameters()).view(-1)[0] = float("nan")
        loss = F.mse_loss(net(x0 * 0.5, torch.ones(len(x0))), x0)
        if bad and self.kind == "loss":
            loss = loss * float("nan")
        if bad and self.kind == "grad":
            loss = loss + torch.sqrt(0 * sum(p.sum() for p in net.parameters()))
        return loss

    def sample(self, net, n, image_shape, **_):
        return torch.zeros(n, *image_shape)


def all_finite(ckpt: Path) -> bool:
    return all(torch.isfinite(t).all() for f in ("weights.safetensors", "ema.safetensors")
               for t in load_file(ckpt / f).values())


@pytest.mark.parametrize("kind", ["loss", "grad"])
def test_nonfinite_steps_are_skipped_and_logged(tmp_path, kind):
    out = tmp_path / "run"
    cfg = tiny_cfg(out, steps=6, checkpoint_every=1, keep_checkpoints=10, max_nonfinite=3)
    train(cfg, Toy(poison={2, 3}, kind=kind), progress=False, log=quiet)  # 2 in a row < 3: the run goes on
    records = read_metrics(out)
    assert [r["step"] for r in records if "skipped" in r] == [3, 4]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 5, 6]
    root = out / "checkpoints"
    a, b = load_checkpoint(root / "step_0000002"), load_checkpoint(root / "step_0000004")
    for k in a[1]:  # skipped steps leave weights, EMA and optimiser untouched
        assert torch.equal(a[1][k], b[1][k]) and torch.equal(a[2][k], b[2][k])
    assert all(torch.equal(x, y) for x, y in zip(a[3]["optimizers"]["main"]["state"][0].values(),
                                                  b[3]["optimizers"]["main"]["state"][0].values()))
    assert all(all_finite(c) for c in list_checkpoints(root))


@pytest.mark.parametrize("kind", ["loss", "weights"])
def test_too_many_nonfinite_steps_stop_with_the_last_good_checkpoint_intact(tmp_path, kind):
    out = tmp_path / "run"
    cfg = tiny_cfg(out, steps=20, checkpoint_every=1, keep_checkpoints=2, max_nonfinite=3)
    with pytest.raises(UserError, match=r"3 non-finite steps in a row at step 5; last good checkpoint: .*step_000000"):
        train(cfg, Toy(poison=set(range(2, 100)), kind=kind), progress=False, log=quiet)
    good = latest_valid(out / "checkpoints", log=quiet)
    assert good is not None and all_finite(good)
    ref = tmp_path / "ref"
    train(tiny_cfg(ref, steps=2, checkpoint_every=1), Toy(), progress=False, log=quiet)
    assert_weights_equal(good, ref / "checkpoints" / "step_0000002")  # exactly the state before the trouble
    assert sum("skipped" in r for r in read_metrics(out)) == 3


def assert_weights_equal(a: Path, b: Path) -> None:
    for name in ("weights.safetensors", "ema.safetensors"):
        ta, tb = load_file(a / name), load_file(b / name)
        assert all(torch.equal(ta[k], tb[k]) for k in ta), name


# --- 5. disk full and unwritable output -------------------------------------------------------------------------
def enospc(*_a, **_kw):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("where", ["checkpoint", "metrics"])
def test_disk_full_gives_a_clear_error_and_keeps_the_previous_checkpoint(good_run, tmp_path, monkeypatch, where):
    run = copy_run(good_run, tmp_path)
    root = run / "checkpoints"
    before = {c.name: snapshot(c) for c in list_checkpoints(root)}
    trainer = Trainer(tiny_cfg(run, steps=8), Baseline(N=50), resume=True, progress=False, log=quiet)
    if where == "checkpoint":
        monkeypatch.setattr(checkpoint.torch, "save", enospc)
    else:
        monkeypatch.setattr("diffaccel.train.append_metrics", enospc)
    with pytest.raises(UserError, match="No space left on device") as info:
        trainer.run()
    assert str(run) in str(info.value)
    assert {c.name: snapshot(c) for c in list_checkpoints(root)} == before
    assert not [p for p in root.iterdir() if p.name.startswith(".")]


def test_unwritable_output_folder_is_a_clear_error(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(SystemExit) as done:
        cli.main(["train", *CLI_TINY, "--steps", "2", "--out", str(blocker / "run")])
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("diffaccel: error:") and str(blocker / "run") in err and "Traceback" not in err


@pytest.mark.skipif(os.geteuid() == 0, reason="permissions do not bind root")
def test_read_only_output_folder_is_a_clear_error(tmp_path):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        with pytest.raises(UserError, match="ro/run"):
            train(tiny_cfg(parent / "run"), Baseline(N=50), progress=False, log=quiet)
    finally:
        parent.chmod(0o755)


# --- 3. bad data and configuration ------------------------------------------------------------------------------
def png_bytes(size=8, mode="L") -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (size, size), dtype=np.uint8)).convert(mode).save(
        buf, format="PNG")
    return buf.getvalue()


def image_folder(root: Path, extra: dict[str, bytes]) -> Path:
    root.mkdir()
    for i in range(3):
        (root / f"ok{i}.png").write_bytes(png_bytes())
    for name, data in extra.items():
        (root / name).write_bytes(data)
    return root


def npz(path: Path, array: np.ndarray) -> Path:
    np.savez(path, images=array)
    return path


def bad_inputs(tmp: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (extra train flags, a regex the one-line message must match)."""
    digits = np.random.default_rng(0).random((16, 8, 8)).astype(np.float32)
    nan, inf = digits.copy(), digits.copy()
    nan[3, 2, 2], inf[5, 0, 1] = np.nan, np.inf
    return {
        "truncated image": (["--data", str(image_folder(tmp / "trunc", {"bad.png": png_bytes()[:40]}))],
                            r"cannot read image .*bad\.png"),
        "garbage image": (["--data", str(image_folder(tmp / "garbage", {"bad.png": os.urandom(300)}))],
                          r"cannot read image .*bad\.png"),
        "two channels": (["--data", str(npz(tmp / "c2.npz", np.zeros((4, 2, 8, 8), np.uint8)))],
                         r"c2\.npz.*shape \(4, 2, 8, 8\)"),
        "NaN in npz": (["--data", str(npz(tmp / "nan.npz", nan))], r"nan\.npz.*NaN or Inf"),
        "Inf in npz": (["--data", str(npz(tmp / "inf.npz", inf))], r"inf\.npz.*NaN or Inf"),
        "empty folder": (["--data", str((tmp / "empty").mkdir() or tmp / "empty")], r"no images .* found under"),
        "empty npz": (["--data", str(npz(tmp / "none.npz", np.zeros((0, 8, 8), np.uint8)))], r"empty"),
        "M < 1": (["--method", "kl", "--kl-terms", "0"], r"--kl-terms \(M\) must be a positive integer, got 0"),
        "partial > M": (["--method", "kl", "--kl-terms", "2", "--kl-partial", "3"], r"--kl-partial .* got 3"),
        "T > 8": (["--method", "ddgan", "--steps-T", "9"], r"T.*8"),
        "unsorted turning points": (["--method", "dvdp", "--turning-points", "600,300"],
                                    r"turning points must be strictly increasing"),
        "negative lr": (["--lr", "-0.001"], r"--lr must be a positive number, got -0\.001"),
        "NaN lr": (["--lr", "nan"], r"--lr must be a positive number, got nan"),
        "zero batch": (["--batch-size", "0"], r"--batch-size must be >= 1"),
        "bad net config": (["--net-config", "{block_out"], r"--net-config is not valid JSON"),
    }


def test_bad_data_and_config_give_one_clear_message_and_exit_code_2(tmp_path, capsys):
    cases = bad_inputs(tmp_path)
    for name, (flags, message) in cases.items():
        out = tmp_path / "runs" / name.replace(" ", "-")
        with pytest.raises(SystemExit) as done:
            cli.main(["train", *CLI_TINY, "--steps", "2", *flags, "--out", str(out)])
        err = capsys.readouterr().err.strip()
        assert done.value.code == 2, name
        assert err.startswith("diffaccel: error:") and "\n" not in err and "Traceback" not in err, (name, err)
        assert __import__("re").search(message, err), (name, err)
        assert not out.exists(), f"{name}: a run directory was left behind"


def test_bad_input_in_a_real_process_exits_2_without_traceback(tmp_path):
    data = npz(tmp_path / "nan.npz", np.full((4, 8, 8), np.nan, np.float32))
    result = run_cli(["train", *CLI_TINY, "--steps", "2", "--data", str(data), "--out", str(tmp_path / "run")])
    assert result.returncode == 2
    assert result.stderr.strip().startswith("diffaccel: error:") and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


# --- 3b. property-based fuzzing: only UserError (or argparse's own exit 2) may come out ---------------------------
FUZZ = settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", 40)), deadline=None, suppress_health_check=list(HealthCheck))
TRAIN_KEYS = ["method", "data", "resolution", "channels", "hflip", "data_limit", "preset", "net_config", "batch_size",
              "lr", "weight_decay", "warmup_steps", "max_grad_norm", "steps", "grad_accum", "ema_decay",
              "mixed_precision", "seed", "device", "log_every", "checkpoint_every", "keep_checkpoints",
              "sample_every", "max_nonfinite", "time_steps", "schedule", "kl_terms", "kl_partial", "kl_variant",
              "steps_T", "gen_loss", "r1_gamma", "lazy_reg", "nz", "turning_points", "lambda_at_turn", "resume"]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10, 3000), st.floats(allow_nan=True, allow_infinity=True),
                    st.text(max_size=12), st.sampled_from(["kl", "ddgan", "dvdp", "baseline", "tiny", "cpu", "1e-3"]))
values = st.one_of(scalars, st.lists(scalars, max_size=3), st.dictionaries(st.text(max_size=5), scalars, max_size=2))
configs = st.one_of(st.dictionaries(st.sampled_from(TRAIN_KEYS), values, max_size=6),
                    st.dictionaries(st.text(max_size=10), values, max_size=2), values)


@FUZZ
@given(config=configs)
def test_fuzz_config_file(config, tmp_path_factory):
    import yaml

    folder = tmp_path_factory.mktemp("cfg")
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    built = []

    def fake_train(cfg, method, resume=False, callback=None, **_):
        cfg.validate()  # everything the real trainer checks before touching the disk
        built.append((cfg, method))
        return Path(cfg.out)

    import diffaccel.train as train_module

    real, train_module.train = train_module.train, fake_train
    try:
        cli.main(["train", "--config", str(path), "--out", str(folder / "run"), "--eval-every", "0"])
    except SystemExit as e:
        assert e.code == 2
    finally:
        train_module.train = real
    for cfg, method in built:  # what got through is well-typed
        assert isinstance(cfg.batch_size, int) and isinstance(cfg.lr, float) and isinstance(cfg.steps, int)
        assert isinstance(method.config(), dict)


def mutated(data: bytes, cuts: list[int], flips: list[tuple[int, int]]) -> bytes:
    b = bytearray(data)
    for pos, val in flips:
        b[pos % len(b)] = val
    return bytes(b[: max(cuts) % (len(b) + 1)]) if cuts else bytes(b)


@FUZZ
@given(files=st.lists(st.tuples(st.sampled_from(sorted(IMAGE_SUFFIXES)),
                                st.one_of(st.binary(max_size=200),
                                          st.builds(mutated, st.sampled_from([png_bytes(), png_bytes(8, "RGB"),
                                                                              png_bytes(6, "LA")]),
                                                    st.lists(st.integers(0, 400), max_size=1),
                                                    st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)),
                                                             max_size=4)))),
                      min_size=1, max_size=3),
       resolution=st.sampled_from([None, 4, 8]), channels=st.sampled_from([None, 1, 3]))
def test_fuzz_image_folder_loader(files, resolution, channels, tmp_path_factory):
    folder = tmp_path_factory.mktemp("imgs")
    for i, (suffix, data) in enumerate(files):
        (folder / f"{i}{suffix}").write_bytes(data)
    try:
        ds = load_dataset(str(folder), resolution=resolution, channels=channels)
    except UserError:
        return
    x = ds.get_batch(torch.arange(len(ds)))
    assert torch.isfinite(x).all() and x.min() >= -1 and x.max() <= 1


@FUZZ
@given(array=hnp.arrays(st.sampled_from([np.uint8, np.int16, np.int64, np.float16, np.float32, np.float64, np.bool_,
                                         np.complex64]),
                        hnp.array_shapes(min_dims=0, max_dims=5, min_side=0, max_side=6)),
       key=st.sampled_from(["images", "x", "other"]), channels=st.sampled_from([None, 1, 3]),
       raw=st.one_of(st.none(), st.binary(max_size=300)))
def test_fuzz_npz_loader(array, key, channels, raw, tmp_path_factory):
    path = tmp_path_factory.mktemp("npz") / "data.npz"
    if raw is not None:
        path.write_bytes(raw)
    else:
        np.savez(path, **{key: array})
    try:
        ds = load_dataset(str(path), channels=channels)
    except UserError:
        return
    x = ds.get_batch(torch.arange(len(ds)))
    assert x.ndim == 4 and torch.isfinite(x).all() and x.min() >= -1 and x.max() <= 1


# --- diffaccel doctor -------------------------------------------------------------------------------------------
def test_doctor_reports_versions_and_a_healthy_run(good_run, capsys):
    from diffaccel.doctor import doctor

    assert doctor(good_run) is True
    out = capsys.readouterr().out
    for word in ("torch", "diffusers", "accelerate", "torchmetrics", "mnist5k", "digits", "effnet", "inception",
                 "step_0000002", "step_0000004", "metrics.jsonl"):
        assert word in out
    assert "everything looks fine" in out


def test_doctor_finds_broken_checkpoints_foreign_weights_and_bad_metrics_lines(good_run, tmp_path, capsys):
    from diffaccel.doctor import doctor

    run = copy_run(good_run, tmp_path)
    weights = run / "checkpoints" / "step_0000004" / "ema.safetensors"
    weights.write_bytes(weights.read_bytes()[:-7])
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "lo\n')
    assert doctor(run, out=print) is False
    out = capsys.readouterr().out
    assert "step_0000004" in out and "BROKEN" in out and "ema.safetensors" in out
    assert "PARSE ERRORS" in out and "lines [5]" in out
    assert "step_0000002                      ok" in out


def test_several_trainers_in_one_process_may_change_mixed_precision(tmp_path):
    logs = []
    for i, precision in enumerate(["no", "bf16", "fp16"]):
        train(tiny_cfg(tmp_path / f"run{i}", steps=1, mixed_precision=precision), Toy(), progress=False,
              log=logs.append)
        assert verify(tmp_path / f"run{i}" / "checkpoints" / "step_0000001")["step"] == 1
    # fp16 autocast does not exist on the CPU in accelerate: say so rather than silently train in float32
    assert sum("fp16 has no effect on the CPU" in line for line in logs) == 1


def test_metrics_reader_skips_cut_and_damaged_lines(tmp_path):
    from diffaccel.runs import truncate_metrics

    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n5\n[1, 2]\n{"step": 2, "loss": 0.5}\n{"step": 3, "lo')
    assert read_metrics(tmp_path) == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}]
    truncate_metrics(tmp_path, 1)
    assert read_metrics(tmp_path) == [{"step": 1, "loss": 1.0}]


@pytest.mark.parametrize("flags", [["--method", "baseline", "--time-steps", "0"],
                                   ["--method", "dvdp", "--time-steps", "0"],
                                   ["--method", "score-ve", "--num-scales", "0"]])
def test_a_zero_step_count_is_refused_not_replaced_by_the_default(tmp_path, flags):
    """0 is a value, not "unset": it must be refused (exit 2, one line), never silently become 1000."""
    out = tmp_path / "run"
    result = run_cli(["train", *flags, "--data", "digits", "--steps", "1", "--out", str(out)])
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert ", got 0" in result.stderr and not out.exists()


@pytest.mark.parametrize("eta", ["nan", "-0.5", "inf", "1.5"])
def test_an_eta_outside_zero_one_is_refused_before_the_run_is_read(tmp_path, eta):
    result = run_cli(["sample", str(tmp_path), "--eta", eta])
    assert result.returncode == 2 and "--eta: must be a number in [0, 1]" in result.stderr


def test_grad_accum_larger_than_the_batch_and_empty_turning_points_are_refused(tmp_path):
    from diffaccel.methods.dvdp import parse_turning_points

    with pytest.raises(UserError, match="--grad-accum 64 is larger than --batch-size 8"):
        tiny_cfg(tmp_path / "run", batch_size=8, grad_accum=64).validate()
    for text in (",", "300,,600"):
        with pytest.raises(argparse.ArgumentTypeError, match="empty entry"):
            parse_turning_points(text)
