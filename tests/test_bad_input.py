"""Bad input, as a careful new user and an adversarial tester give it: every refusal is exit 2 and one short
message (no traceback), nothing is created or changed by a refused command, and no explicit flag is dropped.

Everything runs in-process (``cli.main``) on a tiny 8×8 digits run."""

from __future__ import annotations

import builtins
import errno
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from diffaccel import cli
from diffaccel.checkpoint import _sha256
from diffaccel.methods.baseline import Baseline
from diffaccel.train import TrainConfig, train

NET = {"block_out_channels": [16, 32], "norm_num_groups": 8}


def quiet(*_a, **_k):
    pass


@pytest.fixture(scope="module")
def good_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("good") / "run"
    cfg = TrainConfig(data="digits", data_limit=64, net={"preset": "tiny", "overrides": NET}, batch_size=8, steps=4,
                      log_every=1, checkpoint_every=2, device="cpu", out=str(out), sample_n=4,
                      sample_options={"steps": 2})
    train(cfg, Baseline(N=50), progress=False, log=quiet)
    return out


def tree(root: Path) -> dict:
    """Every path under ``root`` with its kind, mode and content hash (what "unchanged" means)."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = os.lstat(p)
            digest = None
            if p.is_symlink():
                digest = os.readlink(p)
            elif p.is_file() and not p.is_fifo():
                digest = hashlib.sha256(p.read_bytes()).hexdigest()
            found[str(p.relative_to(root))] = (st.st_mode, digest)
    return found


def call(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        cli.main(argv)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


# --- 1. damaged run directories ----------------------------------------------------------------------------------
def _yaml(run: Path, edit) -> None:
    import yaml

    config = yaml.safe_load((run / "config.yaml").read_text())
    edit(config)
    (run / "config.yaml").write_text(yaml.safe_dump(config))


def _each_checkpoint(run: Path, edit) -> None:
    for ckpt in sorted((run / "checkpoints").glob("step_*")):
        edit(ckpt)


def _meta(edit):
    def apply(ckpt: Path):
        meta = json.loads((ckpt / "meta.json").read_text())
        (ckpt / "meta.json").write_text(json.dumps(edit(meta)))
    return lambda run: _each_checkpoint(run, apply)


def _state(edit):
    """Replace state.pt by ``edit(state)`` and forge the checksum so that only the schema can catch it."""
    def apply(ckpt: Path):
        state = torch.load(ckpt / "state.pt", weights_only=True)
        new = edit(state)
        if isinstance(new, bytes):
            (ckpt / "state.pt").write_bytes(new)
        else:
            torch.save(new, ckpt / "state.pt")
        meta = json.loads((ckpt / "meta.json").read_text())
        meta["sha256"]["state.pt"] = _sha256(ckpt / "state.pt")
        (ckpt / "meta.json").write_text(json.dumps(meta))
    return lambda run: _each_checkpoint(run, apply)


def _drop(key):
    return lambda c: c.pop(key)


def _set(path: str, value):
    def edit(c):
        *parents, last = path.split(".")
        for p in parents:
            c = c[p]
        c[last] = value
    return edit


def _replace_file(name: str, data: bytes):
    return lambda run: (run / name).write_bytes(data)


def _symlink_loop(run: Path):
    (run / "config.yaml").unlink()
    os.symlink("config.yaml", run / "config.yaml")


def _config_folder(run: Path):
    (run / "config.yaml").unlink()
    (run / "config.yaml").mkdir()


def _checkpoints_file(run: Path):
    shutil.rmtree(run / "checkpoints")
    (run / "checkpoints").write_text("not a folder")


BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 9)}]\n" for i in range(8))

ALL, NO_INFO, NO_SAMPLE = ("info", "sample", "doctor", "resume"), ("sample", "doctor", "resume"), \
    ("info", "doctor", "resume")
# name -> (how to damage a copy of a good run, the commands that must refuse it, a word the message must hold)
DAMAGE = {
    "config lacks train": (lambda r: _yaml(r, _drop("train")), ALL, "train"),
    "config lacks image_shape": (lambda r: _yaml(r, _drop("image_shape")), ALL, "image_shape"),
    "config lacks method": (lambda r: _yaml(r, _drop("method")), ALL, "method"),
    "train is a number": (lambda r: _yaml(r, _set("train", 3)), ALL, "train"),
    "batch_size is text": (lambda r: _yaml(r, _set("train.batch_size", "big")), ALL, "batch_size"),
    "batch_size is 0": (lambda r: _yaml(r, _set("train.batch_size", 0)), ALL, "batch-size"),
    "image_shape too short": (lambda r: _yaml(r, _set("image_shape", [1, 8])), ALL, "image_shape"),
    "image_shape is text": (lambda r: _yaml(r, _set("image_shape", "abc")), ALL, "image_shape"),
    "method is a number": (lambda r: _yaml(r, _set("method", 5)), ALL, "method"),
    "method unknown": (lambda r: _yaml(r, _set("method", "nope")), ALL, "unknown method"),
    "method_config is a list": (lambda r: _yaml(r, _set("method_config", [1])), ALL, "method_config"),
    "method_config unknown key": (lambda r: _yaml(r, _set("method_config.bogus", 1)), ALL, "bogus"),
    "net is a list": (lambda r: _yaml(r, _set("train.net", [1])), ALL, "net"),
    "net overrides negative": (lambda r: _yaml(r, _set("train.net.overrides.block_out_channels", [-16, 32])),
                               ALL, "block_out_channels"),
    "unknown train entry": (lambda r: _yaml(r, _set("train.bogus", 1)), ALL, "bogus"),
    "config random bytes": (_replace_file("config.yaml", bytes(range(256)) * 4), ALL, "UTF-8"),
    "config is a list": (_replace_file("config.yaml", b"- 1\n- 2\n"), ALL, "method"),
    "config empty": (_replace_file("config.yaml", b""), ALL, "method"),
    "config bad yaml": (_replace_file("config.yaml", b"method: [\n"), ALL, "YAML"),
    "config yaml bomb": (_replace_file("config.yaml", BOMB.encode()), ALL, "aliases"),
    "config symlink loop": (_symlink_loop, ALL, "symlink loop"),
    "config is a folder": (_config_folder, ALL, "folder"),
    "checkpoints is a file": (_checkpoints_file, NO_INFO + ("info",), "not a folder"),
    "meta is a list": (_meta(lambda m: [m]), NO_INFO, "meta.json"),
    "meta lacks sha256": (_meta(lambda m: {k: v for k, v in m.items() if k != "sha256"}), NO_INFO, "sha256"),
    "meta sha256 is a list": (_meta(lambda m: {**m, "sha256": [1]}), NO_INFO, "sha256"),
    "meta step is text": (_meta(lambda m: {**m, "step": "x"}), NO_INFO, "step"),
    "state wrong keys": (_state(lambda s: {"step": 4}), NO_INFO, "state.pt"),
    "state is a list": (_state(lambda s: [1, 2]), NO_INFO, "state.pt"),
    "state random bytes": (_state(lambda s: os.urandom(500)), NO_INFO, "state.pt"),
    "state data wrong type": (_state(lambda s: {**s, "data": 3}), NO_INFO, "data"),
    "state perm of another size": (_state(lambda s: {**s, "data": {**s["data"], "perm": torch.arange(7)}}),
                                   ("resume",), "data order"),
    "state optimizer names": (_state(lambda s: {**s, "optimizers": {"other": s["optimizers"]["main"]}}),
                              ("resume",), "optimizers"),
    "metrics random bytes": (_replace_file("metrics.jsonl", bytes(range(128, 256)) * 8), NO_SAMPLE, "metrics"),
}
COMMANDS = {
    "info": lambda run: ["info", str(run)],
    "sample": lambda run: ["sample", str(run), "--n", "1", "--steps", "1", "--device", "cpu",
                           "--out", str(run.parent / "grid.png")],
    "doctor": lambda run: ["doctor", str(run)],
    "resume": lambda run: ["train", "--resume", "--out", str(run), "--steps", "6"],
}
CASES = [(name, cmd) for name, (_, cmds, _) in DAMAGE.items() for cmd in cmds]


@pytest.mark.parametrize("name,command", CASES, ids=[f"{c}-{n.replace(' ', '_')}" for n, c in CASES])
def test_damaged_run_directory_is_refused_in_one_line_and_left_as_it_was(good_run, tmp_path, capsys, name,
                                                                        command):
    run = tmp_path / "run"
    shutil.copytree(good_run, run)
    damage, _, word = DAMAGE[name]
    damage(run)
    before = tree(run)
    code, out, err = call(COMMANDS[command](run), capsys)
    assert code == 2, (out[-2000:], err)
    assert "Traceback" not in out + err
    assert err.startswith("diffaccel: error:") and len(err.strip().splitlines()) <= 3, err
    if command != "doctor":  # doctor prints its report first, then the one-line verdict
        assert len((out + err).strip().splitlines()) <= 3, out + err
    assert word.lower() in err.lower(), err
    assert len(err) < 600, err
    assert tree(run) == before, "the run directory was changed"
    assert not (run.parent / "grid.png").exists()


def test_a_run_directory_that_cannot_be_read_names_the_path_and_the_reason(good_run, tmp_path, capsys,
                                                                          monkeypatch):
    """Permissions do not bind root (the tests may run as root): the OS error is injected at open()."""
    run = tmp_path / "run"
    shutil.copytree(good_run, run)
    real_open = builtins.open
    locked = {str(run / "config.yaml"), str(run / "checkpoints" / "step_0000004" / "meta.json"),
              str(run / "checkpoints" / "step_0000002" / "meta.json")}

    def guarded(file, *a, **kw):
        if str(file) in locked:
            raise PermissionError(errno.EACCES, "Permission denied", str(file))
        return real_open(file, *a, **kw)

    monkeypatch.setattr(builtins, "open", guarded)
    for command in ("info", "sample", "doctor", "resume"):
        code, out, err = call(COMMANDS[command](run), capsys)
        assert code == 2 and "Traceback" not in out + err
        assert f"{run / 'config.yaml'}: permission denied" in err, err
    locked.discard(str(run / "config.yaml"))  # now only the checkpoints: not "no usable checkpoint"
    code, out, err = call(COMMANDS["sample"](run), capsys)
    assert code == 2 and "meta.json: permission denied" in err and "no usable checkpoint" not in err, err


@pytest.mark.parametrize("what", ["missing", "file"])
def test_commands_on_something_that_is_not_a_run_exit_2(tmp_path, capsys, what):
    target = tmp_path / "x"
    if what == "file":
        target.write_text("hello")
    for argv in (["info", str(target)], ["doctor", str(target)], ["sample", str(target)], ["eval", str(target)]):
        code, out, err = call(argv, capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in out + err, (argv, err)
    assert not target.exists() or target.read_text() == "hello"


def test_doctor_on_a_folder_that_is_not_a_run_exits_2(tmp_path, capsys):
    code, out, err = call(["doctor", str(tmp_path)], capsys)
    assert code == 2 and "not a diffaccel run directory" in err and out == ""


def test_an_os_error_is_one_line_exit_2_and_a_bug_asks_for_a_report(tmp_path, capsys, monkeypatch):
    def refuse(_args):
        raise PermissionError(errno.EACCES, "Permission denied", "/somewhere/file")

    monkeypatch.setattr(cli, "cmd_info", refuse)
    code, _, err = call(["info", str(tmp_path)], capsys)
    assert code == 2 and err.strip() == "diffaccel: error: /somewhere/file: permission denied"

    def bug(_args):
        raise ZeroDivisionError("oops")

    monkeypatch.setattr(cli, "cmd_info", bug)
    code, _, err = call(["info", str(tmp_path)], capsys)
    assert code == 1 and "Traceback" in err and "internal error" in err.splitlines()[-1] and "report" in err


# --- 6. validate before work; create nothing until valid ----------------------------------------------------------
def _no_sampling(monkeypatch):
    import diffaccel.evaluate as evaluate

    def refuse(*_a, **_k):
        raise AssertionError("sampling started before the inputs were checked")

    monkeypatch.setattr(evaluate, "generate", refuse)


@pytest.mark.parametrize("flags,word", [(["--extractor", "nope"], "unknown feature extractor"),
                                        (["--extractor", "inception", "--inception-weights", "/nonexistent/w.pth"],
                                         "Inception weights file not found")])
def test_eval_refuses_a_bad_extractor_before_sampling_and_leaves_nothing(good_run, tmp_path, capsys, monkeypatch,
                                                                        flags, word):
    run = tmp_path / "run"
    shutil.copytree(good_run, run)
    before = tree(run)
    _no_sampling(monkeypatch)
    code, out, err = call(["eval", str(run), "--n", "8", "--device", "cpu", *flags], capsys)
    assert code == 2 and word in err and len(err.strip().splitlines()) == 1, err
    assert tree(run) == before  # no eval_samples/, no eval.json


def test_train_eval_every_with_a_bad_extractor_is_refused_at_the_start(tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = call(["train", "--method", "baseline", "--data", "digits", "--steps", "1", "--eval-every", "1",
                         "--extractor", "nope", "--device", "cpu", "--out", str(out)], capsys)
    assert code == 2 and "unknown feature extractor" in err and not out.exists()


@pytest.mark.parametrize("target", ["folder", "under a file", "proc"])
@pytest.mark.parametrize("command", ["sample", "eval"])
def test_an_unwritable_out_is_refused_before_work_and_leaves_no_temporary_file(good_run, tmp_path, capsys,
                                                                              monkeypatch, target, command):
    run = tmp_path / "run"
    shutil.copytree(good_run, run)
    (tmp_path / "afile").write_text("x")
    out = {"folder": tmp_path, "under a file": tmp_path / "afile" / "o.png", "proc": Path("/proc/o.png")}[target]
    _no_sampling(monkeypatch)
    before, outside = tree(run), sorted(p.name for p in tmp_path.iterdir())
    code, _, err = call([command, str(run), "--n", "8", "--device", "cpu", "--out", str(out)], capsys)
    assert code == 2 and "--out" in err and len(err.strip().splitlines()) == 1, err
    assert tree(run) == before and sorted(p.name for p in tmp_path.iterdir()) == outside
    assert not list(Path("/proc").glob("*.tmp*")) and not list(tmp_path.rglob("*tmp*"))


def test_a_fresh_run_refused_at_its_first_step_leaves_no_folder_that_blocks_the_rerun(tmp_path):
    from diffaccel.errors import UserError
    from diffaccel.methods.base import Phase

    class Refusing(Baseline):
        def phases(self):
            def loss(nets, x0, step):
                raise UserError("this setting cannot train")
            return [Phase("main", ("net",), loss)]

    out = tmp_path / "run"
    cfg = dict(data="digits", data_limit=16, net={"preset": "tiny", "overrides": NET}, batch_size=8, steps=1,
               device="cpu", out=str(out), sample_n=2, sample_options={"steps": 1})
    with pytest.raises(UserError, match="cannot train"):
        train(TrainConfig(**cfg), Refusing(N=10), progress=False, log=quiet)
    assert not out.exists()
    out.mkdir()  # a folder the user made beforehand is kept, empty
    with pytest.raises(UserError, match="cannot train"):
        train(TrainConfig(**cfg), Refusing(N=10), progress=False, log=quiet)
    assert out.is_dir() and not any(out.iterdir())
    train(TrainConfig(**cfg), Baseline(N=10), progress=False, log=quiet)  # the corrected rerun goes through
    assert (out / "checkpoints" / "step_0000001").is_dir()


# --- 4. a flag the user gave is honoured or refused, never dropped -------------------------------------------------
TRAIN = ["train", "--data", "digits", "--data-limit", "16", "--preset", "tiny", "--net-config", json.dumps(NET),
         "--batch-size", "8", "--steps", "1", "--device", "cpu"]


@pytest.mark.parametrize("flags,message", [
    (["--method", "ddgan", "--autoencoder", "AE"], "--autoencoder is not used by method 'ddgan'"),
    (["--method", "baseline", "--kl-terms", "3"], "--kl-terms is not used by method 'baseline'"),
    (["--method", "subspace", "--lambda-at-turn", "0.1"], "--lambda-at-turn is not used by method 'subspace'"),
    (["--method", "dvdp", "--subspace-jump", "noise"], "--subspace-jump is not used by method 'dvdp'"),
    (["--method", "dvdp", "--subspace-networks", "per-stage"], "--subspace-networks is not used by method 'dvdp'"),
    (["--method", "kl", "--kl-correction", "posterior"], "--kl-correction is not used"),  # read only with --init-from
    (["--method", "ddgan", "--schedule", "cosine"], "--schedule is not used by method 'ddgan'"),
    (["--method", "baseline", "--extractor", "digits"], "--extractor only matter with --eval-every"),
    (["--method", "baseline", "--eval-n", "10"], "--eval-n only matter with --eval-every"),
])
def test_train_refuses_a_flag_the_method_does_not_read(tmp_path, capsys, flags, message):
    out = tmp_path / "run"
    code, _, err = call([*TRAIN, *flags, "--out", str(out)], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_a_config_file_setting_the_method_does_not_read_is_refused_too(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("method: baseline\nkl_terms: 4\n")
    code, _, err = call([*TRAIN, "--config", str(config), "--out", str(tmp_path / "run")], capsys)
    assert code == 2 and "--kl-terms is not used by method 'baseline'" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_train_device_cuda_without_cuda_is_refused_not_run_on_the_cpu(tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = call([*TRAIN[:-2], "--device", "cuda", "--out", str(out)], capsys)
    assert code == 2 and "no CUDA device" in err and not out.exists()


@pytest.mark.parametrize("flags,word", [(["--lr", "0.1"], "--lr was 0.0002"), (["--method", "kl"], "--method was"),
                                        (["--data", "mnist5k"], "--data was 'digits'"),
                                        (["--time-steps", "10"], "--time-steps is a setting of the method"),
                                        (["--preset", "small"], "--preset was 'tiny'")])
def test_resume_refuses_a_changed_setting(good_run, tmp_path, capsys, flags, word):
    run = tmp_path / "run"
    shutil.copytree(good_run, run)
    before = tree(run)
    code, _, err = call(["train", "--resume", "--out", str(run), "--steps", "6", *flags], capsys)
    assert code == 2 and word in err and "--steps" in err, err
    assert tree(run) == before


def test_resume_accepts_a_repeated_setting_and_a_flag_that_may_change(good_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(good_run, run)
    code, out, err = call(["train", "--resume", "--out", str(run), "--steps", "5", "--data", "digits",
                           "--lr", "0.0002", "--log-every", "1"], capsys)
    assert code == 0, err
    assert (run / "checkpoints" / "step_0000005").is_dir()


@pytest.mark.parametrize("flags,message", [
    (["--sampler", "ddpm", "--steps", "5"], "--steps not used by --sampler ddpm"),
    (["--sampler", "ddpm", "--eta", "0.5"], "--eta not used by --sampler ddpm"),
    (["--sampler", "euler"], "unknown sampler 'euler'"),
    (["--stage-steps", "2,2"], "--stage-steps is not used by the sampler of this baseline run"),
    (["--snr", "0.2"], "score-ve runs only"),
])
@pytest.mark.parametrize("command", ["sample", "eval"])
def test_sampling_refuses_a_flag_the_sampler_does_not_use(good_run, tmp_path, capsys, monkeypatch, flags, message,
                                                          command):
    _no_sampling(monkeypatch)
    before = tree(good_run)
    code, _, err = call([command, str(good_run), "--n", "8", "--device", "cpu", *flags,
                         "--out", str(tmp_path / "o.png")], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert tree(good_run) == before and not list(tmp_path.iterdir())


def test_a_method_without_sampler_settings_refuses_them(good_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(good_run, run)
    _yaml(run, lambda c: c.update(method="ddgan", method_config={}))
    for flags in (["--steps", "3"], ["--sampler", "ddim"], ["--eta", "0"]):
        code, _, err = call(["sample", str(run), "--n", "1", *flags], capsys)
        assert code == 2 and f"{flags[0]} is not used by the sampler of this ddgan run" in err, err


def test_score_ve_refuses_an_empty_sampler_name():
    import argparse

    from diffaccel.errors import UserError
    from diffaccel.methods.score_ve import ScoreVE

    with pytest.raises(UserError, match="unknown sampler ''"):
        ScoreVE(sigma_max=1.0).sampler_options(argparse.Namespace(sampler="", steps=None, eta=None))


def test_kl_time_steps_zero_is_refused_not_replaced_by_the_default(tmp_path, capsys):
    code, _, err = call([*TRAIN, "--method", "kl", "--time-steps", "0", "--out", str(tmp_path / "r")], capsys)
    assert code == 2 and "got 0" in err


# --- 2. data files -------------------------------------------------------------------------------------------------
def _npz_claiming(path: Path, shape: tuple) -> Path:
    """A valid small .npz whose array header is rewritten to claim ``shape`` (e.g. terabytes)."""
    import zipfile

    import numpy as np

    np.savez(path, images=np.zeros((2, 8, 8), np.uint8))
    with zipfile.ZipFile(path) as zf:
        data = zf.read("images.npy")
    header_len = int.from_bytes(data[8:10], "little")
    header = data[10:10 + header_len].decode("latin1").replace("(2, 8, 8)", str(shape))
    header = header.ljust(header_len - 1) + "\n" if len(header) < header_len else header
    new = data[:8] + len(header).to_bytes(2, "little") + header.encode("latin1") + data[10 + header_len:]
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("images.npy", new)
    return path


def _idx_file(path: Path, n: int, h: int, w: int, pixels: bytes = b"") -> Path:
    import struct

    path.write_bytes(struct.pack(">IIII", 0x803, n, h, w) + pixels)
    return path


DATA = {
    "not-gzip .gz": (lambda t: (t / "train-images-idx3-ubyte.gz").write_bytes(b"plain text, not gzip") and
                     t / "train-images-idx3-ubyte.gz", "not gzip-compressed"),
    "corrupt gzip": (lambda t: (t / "x-idx3-ubyte.gz").write_bytes(b"\x1f\x8b\x08\x00garbage") and
                     t / "x-idx3-ubyte.gz", "corrupt gzip"),
    "0x0 idx": (lambda t: _idx_file(t / "z-idx3-ubyte", 5, 0, 0), "at least 1x1"),
    "0 images idx": (lambda t: _idx_file(t / "n-idx3-ubyte", 0, 8, 8), "at least one image"),
    "idx claiming terabytes": (lambda t: _idx_file(t / "big-idx3-ubyte", 2**31, 2**15, 2**15, b"\0" * 64),
                               "cap"),
    "npz claiming terabytes": (lambda t: _npz_claiming(t / "big.npz", (10**6, 10**6, 1000)), "claims shape"),
    "text named .npz": (lambda t: (t / "t.npz").write_text("1,2,3\n4,5,6\n") and t / "t.npz", "not a zip archive"),
    "named pipe": (lambda t: os.mkfifo(t / "p.npz") or t / "p.npz", "named pipe"),
}


@pytest.mark.parametrize("name", list(DATA))
def test_a_bad_data_file_is_refused_before_training_without_hanging(tmp_path, capsys, name):
    import time

    make, word = DATA[name]
    data = make(tmp_path)
    out = tmp_path / "run"
    t0 = time.perf_counter()
    code, _, err = call([*TRAIN, "--method", "baseline", "--data", str(data), "--out", str(out)], capsys)
    assert time.perf_counter() - t0 < 10
    assert code == 2 and word in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_a_data_file_larger_than_the_memory_cap_is_refused_stating_the_cap(tmp_path, capsys, monkeypatch):
    import numpy as np

    path = tmp_path / "ok.npz"
    np.savez(path, images=np.zeros((64, 8, 8), np.uint8))  # 4 kB of pixels
    monkeypatch.setenv("DIFFACCEL_MEMORY_LIMIT", "4kB")
    code, _, err = call([*TRAIN, "--data", str(path), "--out", str(tmp_path / "run")], capsys)
    assert code == 2 and "cap (half the available memory)" in err and "2.0 KB" in err, err


@pytest.mark.parametrize("limit", ["0", "-5"])
def test_a_data_limit_below_one_is_refused(tmp_path, capsys, limit):
    code, _, err = call([*TRAIN[:3], *TRAIN[5:], "--data-limit", limit, "--out", str(tmp_path / "run")], capsys)
    assert code == 2 and "--data-limit must be >= 1" in err


# --- 3. every numeric flag at its boundaries -----------------------------------------------------------------------
def _numeric_flags():
    parser = cli.build_parser()
    subs = parser._subparsers._group_actions[0].choices
    found = []
    for command in ("train", "sample", "eval"):
        for group in subs[command]._action_groups:
            method = group.title[len("method "):] if (group.title or "").startswith("method ") else None
            for action in group._group_actions:
                if action.option_strings and getattr(action.type, "__name__", "") in ("int", "float", "_eta"):
                    found.append((command, action.option_strings[0], action.type.__name__, method))
    return found


BOUNDARY = {"int": ["0", "-1", "99999999999"], "float": ["0", "-1", "nan", "inf", "-inf", "1e308"],
            "_eta": ["nan", "-1", "inf", "2"]}


class Reached(BaseException):
    """Raised where sampling would start: every check before it passed."""


@pytest.mark.parametrize("command,flag,kind,method", _numeric_flags(),
                         ids=[f"{c}{f}" for c, f, _, _ in _numeric_flags()])
def test_every_numeric_flag_at_its_boundaries_is_refused_in_one_line_or_accepted_as_valid(
        good_run, tmp_path, capsys, monkeypatch, command, flag, kind, method):
    import math

    import diffaccel.runs as runs
    import diffaccel.train as train_module

    accepted = []

    def fake_train(cfg, m, resume=False, callback=None, **_):
        cfg.validate()
        accepted.append(cfg)
        return Path(cfg.out)

    def reached(*_a, **_k):
        raise Reached

    monkeypatch.setattr(train_module, "train", fake_train)
    monkeypatch.setattr(runs, "load_run", reached)
    for value in BOUNDARY[kind]:
        if command == "train":
            argv = [*TRAIN, "--method", method or "baseline", "--out", str(tmp_path / "run"), flag, value]
            if flag in ("--eval-n", "--extractor"):
                argv += ["--eval-every", "1"]
        else:
            argv = [command, str(good_run), "--device", "cpu", flag, value]
        try:
            code, out, err = call(argv, capsys)
        except Reached:
            capsys.readouterr()
            code, out, err = 0, "", ""
        assert code in (0, 2), (flag, value, err[-800:])
        assert "Traceback" not in out + err, (flag, value, err[-800:])
        if code == 2:
            assert len(err.strip().splitlines()) == 1 and flag in err, (flag, value, err)
        elif kind != "int":
            assert math.isfinite(float(value)), f"{flag} {value} was accepted"
    for cfg in accepted:
        assert all(math.isfinite(v) for v in vars(cfg).values() if isinstance(v, float))
        assert cfg.batch_size >= 1 and cfg.steps >= 1


@pytest.mark.parametrize("value", ["-1", "nan", "inf", "99999999999"])
def test_numeric_values_in_a_config_file_follow_the_same_bounds(tmp_path, capsys, value):
    config = tmp_path / "c.yaml"
    config.write_text(f"seed: {value}\n")
    code, _, err = call([*TRAIN, "--config", str(config), "--out", str(tmp_path / "run")], capsys)
    assert code == 2 and "seed" in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("net_config,word", [('{"foo": 1}', "unexpected keyword argument 'foo'"),
                                             ("[16, 32]", "must be a JSON object"),
                                             ('{"block_out_channels": [-16, 32]}', ">= 0"),
                                             ('{"block_out_channels": [16, 0]}', "widths must be >= 1"),
                                             ('{"norm_num_groups": 7}', "divisible"),
                                             ('{"layers_per_block": 0}', "fails on its first batch"),
                                             ('{"block_out_channels": [1e400, 1]}', "finite")])
def test_a_bad_net_config_is_one_line_and_leaves_no_run_directory(tmp_path, capsys, net_config, word):
    out = tmp_path / "run"
    code, _, err = call([*TRAIN[:7], "--batch-size", "8", "--steps", "1", "--device", "cpu",
                         "--net-config", net_config, "--out", str(out)], capsys)
    assert code == 2 and word in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


# --- 5. resources ----------------------------------------------------------------------------------------------------
def test_the_preflight_check_refuses_a_configuration_above_the_memory_limit_before_allocating(tmp_path, capsys,
                                                                                          monkeypatch):
    import time

    monkeypatch.setenv("DIFFACCEL_MEMORY_LIMIT", "20MB")
    out = tmp_path / "run"
    t0 = time.perf_counter()
    code, _, err = call([*TRAIN, "--method", "kl", "--kl-terms", "64", "--batch-size", "512", "--out", str(out)],
                        capsys)
    assert time.perf_counter() - t0 < 10
    assert code == 2 and "needs about" in err and "more than the 20.0 MB available" in err, err
    assert "micro-batch of 512" in err and not out.exists()
    monkeypatch.setenv("DIFFACCEL_MEMORY_LIMIT", "64GB")  # the same run with enough memory goes through
    code, _, err = call([*TRAIN, "--method", "kl", "--kl-terms", "2", "--out", str(out)], capsys)
    assert code == 0, err


def test_the_estimate_grows_with_the_batch_and_the_kl_terms():
    from diffaccel.methods.kl import KLDiffusion
    from diffaccel.validation import preflight

    net = {"preset": "tiny", "overrides": NET}
    small = preflight(KLDiffusion(M=2, N=10), net, (1, 8, 8), 4)
    wide = preflight(KLDiffusion(M=8, N=10), net, (1, 8, 8), 4)
    big = preflight(KLDiffusion(M=2, N=10), net, (1, 8, 8), 16)
    assert small["parameters"] == wide["parameters"] > 0
    assert wide["activation_bytes"] == pytest.approx(4 * small["activation_bytes"], rel=0.05)  # M network calls
    assert big["activation_bytes"] == pytest.approx(4 * small["activation_bytes"], rel=0.05)
    assert small["estimate_bytes"] == 5 * small["parameter_bytes"] + 2 * small["activation_bytes"]


@pytest.mark.parametrize("where", ["config", "net_config"])
def test_a_yaml_bomb_is_refused_quickly_with_a_short_message(tmp_path, capsys, where):
    import time

    text = BOMB if where == "config" else "net_config:\n" + "".join("  " + line + "\n" for line in
                                                                    BOMB.splitlines())
    config = tmp_path / "bomb.yaml"
    config.write_text(text)
    t0 = time.perf_counter()
    code, _, err = call([*TRAIN, "--config", str(config), "--out", str(tmp_path / "run")], capsys)
    assert time.perf_counter() - t0 < 3
    assert code == 2 and "aliases" in err and len(err) < 400, err


def test_a_huge_value_is_echoed_cut_short(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("lr: [" + ", ".join(["x" * 50] * 2000) + "]\n")
    code, _, err = call([*TRAIN, "--config", str(config), "--out", str(tmp_path / "run")], capsys)
    assert code == 2 and len(err) < 1100, len(err)


def test_an_empty_out_and_a_missing_checkpoint_folder_are_named(good_run, tmp_path, capsys):
    code, _, err = call([*TRAIN, "--out", ""], capsys)
    assert code == 2 and "--out is empty" in err
    code, _, err = call(["sample", str(good_run), "--checkpoint", str(tmp_path / "nope"), "--n", "1"], capsys)
    assert code == 2 and "does not exist" in err
    code, _, err = call([*TRAIN, "--method", "score-ve", "--sigma-max", "1e300", "--out", str(tmp_path / "r")], capsys)
    assert code == 2 and "--sigma-max must be in [0, 100000]" in err


@pytest.mark.parametrize("options,message", [
    ({"sampler": "pc", "snr": float("inf")}, "snr must be a finite number > 0"),
    ({"sampler": "pc", "snr": float("nan")}, "snr must be a finite number > 0"),
    ({"sampler": "ald", "step_lr": float("inf")}, "a finite --step-lr > 0"),
    ({"sampler": "ald", "step_lr": float("nan")}, "a finite --step-lr > 0"),
    ({"sampler": "ald", "steps_each": 0}, "--steps-each >= 1"),
])
def test_score_ve_refuses_non_finite_sampler_steps(options, message):
    import argparse

    from diffaccel.errors import UserError
    from diffaccel.methods.score_ve import ScoreVE

    args = argparse.Namespace(steps=None, eta=None, **options)
    with pytest.raises(UserError, match=message) as info:
        ScoreVE(sigma_max=1.0).sampler_options(args)
    assert len(str(info.value).splitlines()) == 1
