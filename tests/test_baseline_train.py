
import pytest
import torch
from PIL import Image

from diffaccel.cli import main
from diffaccel.methods.baseline import Baseline
from diffaccel.runs import load_run, read_metrics

TINY = ["--data", "digits", "--resolution", "16", "--preset", "tiny", "--batch-size", "8", "--time-steps", "50",
        "--log-every", "2", "--checkpoint-every", "3"]


def test_baseline_loss_of_zero_network_is_noise_power():
    """E‖z − 0‖² per pixel = 1: the loss is a mean over pixels of the epsilon error."""
    m = Baseline(N=100)
    x0 = torch.rand(4096, 1, 2, 2) * 2 - 1
    loss = m.loss(lambda x, t: torch.zeros_like(x), x0)
    assert abs(float(loss) - 1) < 0.03  # 16k unit-variance terms: std of the mean ≈ 0.011


def test_baseline_noised_marginal():
    m = Baseline(N=10)
    x0 = torch.full((20000, 1, 1, 1), 0.5)
    k = torch.full((20000,), 5)
    xt = m.noised(x0, k, torch.randn_like(x0))
    ab = float(m.alpha_bars[5])
    assert abs(float(xt.mean()) - 0.5 * ab**0.5) < 0.02
    assert abs(float(xt.var()) - (1 - ab)) < 0.03


def test_train_resume_sample_info(tmp_path, capsys):
    run = tmp_path / "run"
    main(["train", "--method", "baseline", *TINY, "--steps", "3", "--out", str(run)])
    assert (run / "config.yaml").is_file() and (run / "samples.png").is_file() and (run / "loss.png").is_file()
    assert [c.name for c in sorted((run / "checkpoints").iterdir())] == ["step_0000003"]
    main(["train", "--resume", "--out", str(run), "--steps", "6"])
    steps = [r["step"] for r in read_metrics(run) if "loss" in r]
    assert steps == [2, 3, 4, 6]
    method, nets = load_run(run)
    assert isinstance(method, Baseline) and method.N == 50
    grid = tmp_path / "grid.png"
    main(["sample", str(run), "--n", "5", "--steps", "4", "--out", str(grid), "--save-images", str(tmp_path / "imgs")])
    assert Image.open(grid).format == "PNG" and len(list((tmp_path / "imgs").glob("*.png"))) == 5
    main(["info", str(run)])
    out = capsys.readouterr().out
    assert "step_0000006: ok" in out and "NFE 4" in out


def test_config_file_and_flag_precedence(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("batch_size: 4\nsteps: 2\nlr: 0.001\n")
    run = tmp_path / "run"
    main(["train", "--config", str(cfg), *TINY[:6], "--steps", "1", "--out", str(run)])
    import yaml

    saved = yaml.safe_load((run / "config.yaml").read_text())["train"]
    assert saved["batch_size"] == 4 and saved["lr"] == 0.001 and saved["steps"] == 1  # the flag wins


@pytest.mark.parametrize("argv, message", [
    (["train", "--data", "nowhere"], "dataset not found"),
    (["train", "--lr", "-1"], "--lr"),
    (["train", "--method", "nope"], "unknown method"),
    (["sample", "/nonexistent/run"], "not a diffaccel run directory"),
    (["bench", "nope"], "unknown benchmark"),
    (["bench", "lddgan", "--only-seed", "1"], "--only-seed K needs --seeds"),
    (["bench", "lddgan", "--seeds", "2", "--only-seed", "2"], "--only-seed must be one of the seeds 0..1"),
    (["bench", "samplers", "--seeds", "2", "--only-seed", "0"], "does not take --seeds"),
])
def test_cli_errors_are_one_message(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        main([*argv, *(["--out", str(tmp_path / "r")] if argv[0] == "train" else [])])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()


def test_existing_run_dir_is_not_overwritten(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "keep.txt").write_text("x")
    with pytest.raises(SystemExit):
        main(["train", *TINY, "--steps", "1", "--out", str(run)])
    assert "already exists" in capsys.readouterr().err and (run / "keep.txt").read_text() == "x"


def test_epsilon_sampler_with_identity_preconditioner_is_plain_ddim():
    from diffaccel.methods.pds import Preconditioner
    from diffaccel.samplers import sample_epsilon
    from diffaccel.schedules import VPSchedule

    ab = VPSchedule().grid(100)

    def eps(x, k):
        return torch.tanh(x) * k.view(-1, 1, 1, 1) / 100

    kwargs = dict(sampler="ddim", steps=10, eta=1.0, progress=False)
    plain = sample_epsilon(eps, (3, 1, 8, 8), ab, generator=torch.Generator().manual_seed(5), **kwargs)
    identity = Preconditioner(freq=torch.ones(1, 8, 8))
    pre = sample_epsilon(eps, (3, 1, 8, 8), ab, generator=torch.Generator().manual_seed(5),
                         preconditioner=identity, **kwargs)
    torch.testing.assert_close(pre, plain, rtol=1e-4, atol=1e-5)  # FFT round trip in float32


def test_sample_with_pds_on_a_baseline_run(tmp_path, capsys):
    run = tmp_path / "run"
    main(["train", "--method", "baseline", *TINY, "--steps", "1", "--out", str(run)])
    grid = tmp_path / "pds.png"
    main(["sample", str(run), "--n", "3", "--steps", "3", "--pds", "--out", str(grid)])
    assert Image.open(grid).format == "PNG" and "'pds': True" in capsys.readouterr().out
