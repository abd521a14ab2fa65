"""`diffaccel export` and the diffusers pipelines: what diffusers loads must sample what `diffaccel sample` does."""

import json
import re

import numpy as np
import pytest
import torch

from diffaccel.cli import main
from diffaccel.runs import load_run

TINY = ["--data", "digits", "--resolution", "16", "--preset", "tiny", "--batch-size", "4", "--log-every", "1",
        "--checkpoint-every", "2", "--steps", "2", "--sample-every", "0", "--ema-decay", "0.5"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for schedule in ("linear", "cosine", "vp"):
        out[schedule] = root / schedule
        main(["train", "--method", "baseline", "--schedule", schedule, "--time-steps", "50", *TINY,
              "--out", str(out[schedule])])
    return out


def _ours(run, n, seed, **options):
    method, nets = load_run(run)
    with torch.no_grad():
        x = method.sample(nets["net"], n, (1, 16, 16), generator=torch.Generator().manual_seed(seed),
                          progress=False, **options)
    return (x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def test_time_shift_folds_into_the_embedding_layer():
    import copy

    from diffaccel.export import shift_time_input
    from diffaccel.nets.unet import build_unet

    net = build_unet("tiny", 1, 1, 16).eval()
    unet = copy.deepcopy(net.unet)
    shift_time_input(unet, 1.0)
    x, t = torch.randn(3, 1, 16, 16), torch.tensor([0.0, 17.0, 999.0])
    with torch.no_grad():
        assert torch.allclose(unet(x, t).sample, net(x, t + 1), atol=1e-5)
        assert not torch.allclose(unet(x, t).sample, net(x, t), atol=1e-3)  # the shift matters


@pytest.mark.parametrize("schedule", ["linear", "cosine", "vp"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_exported_ddim_pipeline_equals_diffaccel_sample(runs, tmp_path, schedule, eta):
    from diffusers import DDIMPipeline

    out = tmp_path / "exported"
    main(["export", str(runs[schedule]), str(out)])
    files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert {"model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
            "scheduler/scheduler_config.json", "README.md"} <= files
    assert not any(f.endswith((".bin", ".pt", ".pth", ".ckpt")) for f in files)
    method, _ = load_run(runs[schedule])
    betas = json.loads((out / "scheduler" / "scheduler_config.json").read_text())["trained_betas"]
    assert np.allclose(np.cumprod(1 - np.array(betas)), method.alpha_bars[1:].numpy(), rtol=1e-12)
    pipe = DDIMPipeline.from_pretrained(out)
    images = pipe(batch_size=3, generator=torch.Generator().manual_seed(7), num_inference_steps=5, eta=eta,
                  output_type="np").images
    ours = _ours(runs[schedule], 3, 7, sampler="ddim", steps=5, eta=eta)
    assert images.shape == ours.shape == (3, 16, 16, 1)
    assert np.abs(images - ours).max() < 2e-4  # measured up to 6e-5: float32 alphas_cumprod in diffusers
    other = _ours(runs[schedule], 3, 8, sampler="ddim", steps=5, eta=eta)
    assert np.abs(images - other).max() > 1e-2  # the comparison can fail


def test_exported_folder_runs_as_ddpm_pipeline(runs, tmp_path):
    from diffusers import DDPMPipeline, DDPMScheduler

    out = tmp_path / "exported"
    main(["export", str(runs["linear"]), str(out)])
    pipe = DDPMPipeline.from_pretrained(out, scheduler=DDPMScheduler.from_pretrained(out, subfolder="scheduler"))
    images = pipe(batch_size=2, generator=torch.Generator().manual_seed(3), num_inference_steps=50,
                  output_type="np").images
    assert np.abs(images - _ours(runs["linear"], 2, 3, sampler="ddpm")).max() < 2e-4


def test_raw_weights_and_model_card(runs, tmp_path):
    from diffusers import UNet2DModel

    with open(runs["linear"] / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 2, "fid[digits]": 123.456}) + "\n")
    main(["export", "--raw", str(runs["linear"]), str(tmp_path / "raw")])
    main(["export", str(runs["linear"]), str(tmp_path / "ema")])
    _, raw = load_run(runs["linear"], ema=False)
    _, ema = load_run(runs["linear"])
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([3.0, 40.0])
    with torch.no_grad():
        for name, net in (("raw", raw["net"]), ("ema", ema["net"])):
            unet = UNet2DModel.from_pretrained(tmp_path / name / "unet")
            assert torch.allclose(unet(x, t).sample, net(x, t + 1), atol=1e-5)
        assert not torch.allclose(raw["net"](x, t), ema["net"](x, t), atol=1e-4)
    card = (tmp_path / "ema" / "README.md").read_text()
    assert "baseline" in card and "Ho, Jain & Abbeel" in card and "digits" in card and "EMA" in card
    assert "fid[digits] = 123.5" in card and '"steps": 20' in card and '"eta": 1.0' in card
    assert "raw" in (tmp_path / "raw" / "README.md").read_text()


def test_export_errors(runs, tmp_path, capsys):
    ae = tmp_path / "ae"
    ae.mkdir()
    config = (runs["linear"] / "config.yaml").read_text()  # a valid config, only its method changed
    (ae / "config.yaml").write_text(re.sub(r"(?m)^method: .*$", "method: autoencoder", config))
    for argv, message in ((["export", str(tmp_path), str(tmp_path / "o")], "not a diffaccel run directory"),
                          (["export", str(runs["linear"]), str(runs["cosine"])], "not an empty folder"),
                          (["export", str(ae), str(tmp_path / "o")], "'autoencoder' runs do not export")):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1


# --- the methods' own pipelines --------------------------------------------------------------------------------
METHOD_RUNS = {
    "kl": (["--method", "kl", "--kl-terms", "3", "--time-steps", "20"], "KLPipeline", dict(num_inference_steps=5)),
    "dvdp": (["--method", "dvdp", "--resolution", "16"], "DVDPPipeline", dict(num_inference_steps=5)),
    "score-ve": (["--method", "score-ve", "--num-scales", "4"], "ScoreVEPipeline", dict(num_inference_steps=3)),
}


@pytest.mark.parametrize("name", list(METHOD_RUNS))
def test_method_pipeline_equals_diffaccel_sample(tmp_path, name):
    import diffaccel.pipelines as pipelines

    flags, cls_name, call = METHOD_RUNS[name]
    run, out = tmp_path / "run", tmp_path / "exported"
    main(["train", *TINY, *flags, "--out", str(run)])
    main(["export", str(run), str(out)])
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == cls_name
    pipe = getattr(pipelines, cls_name).from_pretrained(out)
    result = pipe(batch_size=2, generator=torch.Generator().manual_seed(5), output_type="np", **call)
    method, nets = load_run(run)
    shape = tuple(pipe.config.image_shape)
    assert pipe.config.method_config == json.loads(json.dumps(method.config()))  # restored from model_index.json
    with torch.no_grad():
        ours = method.sample(nets[method.sampling_network], 2, shape, generator=torch.Generator().manual_seed(5),
                             progress=False, steps=call["num_inference_steps"])
    ours = (ours / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert result.images.shape == ours.shape
    assert np.abs(result.images - ours).max() < 1e-4
    pt = pipe(batch_size=2, generator=torch.Generator().manual_seed(5), output_type="pt", return_dict=False, **call)[0]
    assert torch.allclose(pt.permute(0, 2, 3, 1), torch.from_numpy(ours), atol=1e-4)
    pil = pipe(batch_size=1, generator=torch.Generator().manual_seed(5), **call).images
    assert pil[0].size == (shape[2], shape[1])
    saved = tmp_path / "resaved"
    pipe.save_pretrained(saved)
    again = getattr(pipelines, cls_name).from_pretrained(saved)
    assert again.config.method_config == pipe.config.method_config


# --- import: pretrained diffusers models as starting points ----------------------------------------------------
def _pipeline_folder(tmp_path, name, preset="tiny", size=16, unet_overrides=None, **scheduler):
    from diffusers import DDPMPipeline, DDPMScheduler

    from diffaccel.nets.unet import build_unet

    torch.manual_seed(11)
    unet = build_unet(preset, 1, 1, size, **(unet_overrides or {})).unet
    for p in unet.parameters():  # not the fresh initialisation our run would start from anyway
        p.data.add_(0.01 * torch.randn_like(p))
    folder = tmp_path / name
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(**scheduler)).save_pretrained(folder)
    return folder, unet.eval()


LINEAR50 = dict(num_train_timesteps=50, beta_schedule="linear", beta_start=1e-4 * 20, beta_end=0.02 * 20)
FROZEN = [*TINY, "--lr", "1e-30", "--weight-decay", "0"]  # training that leaves the weights where they started


def test_baseline_init_from_diffusers_pipeline_and_unet_folder(tmp_path):
    folder, unet = _pipeline_folder(tmp_path, "pipe", **LINEAR50)
    x, k = torch.randn(2, 1, 16, 16), torch.tensor([1.0, 37.0])
    for source in (folder, folder / "unet"):
        run = tmp_path / f"run-{source.name}"
        main(["train", "--method", "baseline", "--schedule", "linear", "--time-steps", "50", *FROZEN,
              "--init-from", str(source), "--out", str(run)])
        _, nets = load_run(run, ema=False)
        with torch.no_grad():  # our net(x, k) is the diffusers UNet at t = k − 1
            assert torch.allclose(nets["net"](x, k), unet(x, k - 1).sample, atol=1e-5)
    run = tmp_path / "trained"
    main(["train", "--method", "baseline", "--schedule", "linear", "--time-steps", "50", *TINY,
          "--init-from", str(folder), "--out", str(run)])
    _, nets = load_run(run, ema=False)
    with torch.no_grad():  # it trained on from there
        assert not torch.allclose(nets["net"](x, k), unet(x, k - 1).sample, atol=1e-5)


@pytest.mark.parametrize("flags, message", [
    (["--schedule", "linear", "--time-steps", "40"], "trained with 50 timesteps"),
    (["--schedule", "cosine", "--time-steps", "50"], "noise schedule differs"),
    (["--schedule", "linear", "--time-steps", "50", "--preset", "mini"], "--net-config"),
    (["--schedule", "linear", "--time-steps", "50", "--resolution", "32"], "--resolution 16"),
])
def test_init_from_mismatch_is_a_one_line_error(tmp_path, capsys, flags, message):
    folder, _ = _pipeline_folder(tmp_path, "pipe", **LINEAR50)
    with pytest.raises(SystemExit) as e:
        main(["train", "--method", "baseline", *TINY, *flags, "--init-from", str(folder), "--out", str(tmp_path / "r")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert message in err and err.startswith("diffaccel: error: --init-from")


def test_init_from_error_names_the_net_config_that_fits(tmp_path, capsys):
    """A UNet in the DDPM-CIFAR10 layout (cos/sin order, frequency shift, one attention head width): same shapes, other
    function. The error's --net-config builds it, and the copy is then exact (the time shift in the other layout)."""
    import re

    overrides = {"flip_sin_to_cos": False, "freq_shift": 1, "attention_head_dim": None, "downsample_padding": 0}
    folder, unet = _pipeline_folder(tmp_path, "pipe", unet_overrides=overrides, **LINEAR50)
    flags = ["--method", "baseline", "--schedule", "linear", "--time-steps", "50", *FROZEN, "--init-from", str(folder)]
    with pytest.raises(SystemExit):
        main(["train", *flags, "--out", str(tmp_path / "r1")])
    hint = json.loads(re.search(r"--net-config '(.*)'", capsys.readouterr().err).group(1))
    assert hint == overrides
    main(["train", *flags, "--net-config", json.dumps(hint), "--out", str(tmp_path / "r2")])
    _, nets = load_run(tmp_path / "r2", ema=False)
    x, k = torch.randn(2, 1, 16, 16), torch.tensor([1.0, 37.0])
    with torch.no_grad():
        assert torch.allclose(nets["net"](x, k), unet(x, k - 1).sample, atol=1e-5)


def test_kl_fine_tunes_from_a_ddpm_linear_pipeline(tmp_path, capsys):
    """§6.6 from a DDPM-style pipeline (linear betas 1e-4..0.02 over 1000 steps, the VP SDE's Euler steps): with the
    2nd variant and frozen weights, KL's epsilon at t_k = k/20 is the pretrained UNet at t = 50k − 1."""
    folder, unet = _pipeline_folder(tmp_path, "ddpm", num_train_timesteps=1000, beta_schedule="linear")
    run = tmp_path / "kl"
    main(["train", "--method", "kl", "--kl-variant", "2nd", "--kl-terms", "3", "--time-steps", "20", *FROZEN,
          "--init-from", str(folder), "--out", str(run)])
    method, nets = load_run(run, ema=False)
    assert method.time_scale == 50 and method.correction == "paper"
    x, k = torch.randn(2, 1, 16, 16), torch.tensor([1.0, 13.0])
    with torch.no_grad():
        assert torch.allclose(method.epsilon(nets["net"], x, k), unet(x, 50 * k - 1).sample, atol=1e-4)
    cosine, _ = _pipeline_folder(tmp_path, "cos", num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    with pytest.raises(SystemExit):
        main(["train", "--method", "kl", *TINY, "--time-steps", "20", "--init-from", str(cosine),
              "--out", str(tmp_path / "kl2")])
    assert "VP schedule" in capsys.readouterr().err


def _gan_cfg(out):
    from diffaccel.train import TrainConfig

    return TrainConfig(data="digits", resolution=8, data_limit=48, net={"preset": "tiny"}, batch_size=16, steps=2,
                       out=str(out), log_every=1, checkpoint_every=2, sample_every=0, device="cpu")


def test_ddgan_and_lddgan_pipelines_equal_diffaccel_sample(tmp_path):
    from diffaccel.methods.autoencoder import AutoencoderMethod
    from diffaccel.methods.ddgan import DDGAN, LDDGAN
    from diffaccel.pipelines import DDGANPipeline, LDDGANPipeline
    from diffaccel.train import train

    quiet = dict(progress=False, log=lambda *_: None)
    ae_run = train(_gan_cfg(tmp_path / "ae"), AutoencoderMethod(factor=2, latent_channels=2, perceptual_weight=0,
                                                                holdout=8), **quiet)
    runs = {"ddgan": (train(_gan_cfg(tmp_path / "dd"), DDGAN(T=2, lazy_reg=2), **quiet), DDGANPipeline),
            "lddgan": (train(_gan_cfg(tmp_path / "ld"), LDDGAN(autoencoder=str(ae_run), T=2, lazy_reg=2), **quiet),
                       LDDGANPipeline)}
    for name, (run, cls) in runs.items():
        out = tmp_path / f"{name}-exported"
        main(["export", str(run), str(out)])
        assert not any(p.suffix in (".bin", ".pt") for p in out.rglob("*"))
        method, nets = load_run(run)
        with torch.no_grad():
            ours = method.sample(nets["generator"], 3, (1, 8, 8), generator=torch.Generator().manual_seed(4))
        ours = (ours / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
        if name == "lddgan":
            import shutil

            shutil.rmtree(ae_run)  # the exported folder holds the autoencoder itself
        pipe = cls.from_pretrained(out)
        images = pipe(batch_size=3, generator=torch.Generator().manual_seed(4), output_type="np").images
        assert images.std() > 1e-3
        assert images.shape == ours.shape == (3, 8, 8, 1)
        assert np.abs(images - ours).max() < 1e-5, name
        with pytest.raises(Exception, match="T = 2"):
            pipe(batch_size=1, num_inference_steps=5)
