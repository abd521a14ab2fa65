"""Latent space as a setting on KL, DVDP, subspace and score-VE: each trains on the autoencoder's unit-std latents
and its sampler is the pixel sampler run at the latent's shape, then decoded. PDS on DVDP's stages, pixel and
latent: one filter per stage from the stage's data."""

import pytest
import torch

from diffaccel.cli import main
from diffaccel.methods.autoencoder import training_images
from diffaccel.runs import load_run

COMMON = ["--data", "digits", "--resolution", "16", "--data-limit", "48", "--preset", "tiny", "--batch-size", "8",
          "--steps", "2", "--checkpoint-every", "2", "--log-every", "1", "--sample-every", "0", "--device", "cpu"]
FLAGS = {"kl": ["--kl-terms", "3", "--time-steps", "20"], "dvdp": ["--time-steps", "100", "--turning-points", "60"],
         "subspace": ["--time-steps", "100", "--turning-points", "60"], "score-ve": ["--num-scales", "5"]}
LATENT_SHAPE = (2, 8, 8)


@pytest.fixture(scope="module")
def ae_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("latent-methods") / "ae"
    main(["train", "--method", "autoencoder", *COMMON, "--ae-factor", "2", "--latent-channels", "2", "--out", str(out)])
    return out


@pytest.fixture(scope="module")
def runs(ae_run):
    made = {}

    def get(method):
        if method not in made:
            out = ae_run.parent / method
            main(["train", "--method", method, *COMMON, *FLAGS[method], "--autoencoder", str(ae_run), "--out", str(out)])
            made[method] = out
        return made[method]

    return get


def latents_of(method, ae_run) -> torch.Tensor:
    from diffaccel.data import ImageDataset

    return method.prepare(ImageDataset(training_images(ae_run), "digits"), "cpu").images


def pixel_twin(method):
    """The same method without the autoencoder (its config minus the autoencoder entry)."""
    cfg = {k: v for k, v in method.config().items() if k != "autoencoder"}
    return type(method)(**cfg)


@pytest.mark.parametrize("name", ["kl", "dvdp", "subspace"])
def test_latent_sampler_is_the_pixel_sampler_on_the_latent_shape_then_decoded(name, runs, ae_run):
    method, nets = load_run(runs(name))
    assert method.latent and method.config()["autoencoder"] == str(ae_run)
    net = nets["net"]
    assert method.data_shape((1, 16, 16)) == LATENT_SHAPE
    x = method.sample(net, 3, (1, 16, 16), generator=torch.Generator().manual_seed(2), steps=4, progress=False)
    z = pixel_twin(method).sample(net, 3, LATENT_SHAPE, generator=torch.Generator().manual_seed(2), steps=4,
                                  progress=False)
    torch.testing.assert_close(x, method.autoencoder("cpu").decode_scaled(z).clamp(-1, 1))
    assert x.shape == (3, 1, 16, 16)


def test_latent_subspace_fits_its_jump_on_the_latents(runs, ae_run):
    method, _ = load_run(runs("subspace"))
    twin = pixel_twin(method)
    twin.detail_variance = None
    assert method.detail_variance == pytest.approx(twin.fit_detail_variance(latents_of(method, ae_run)))


def test_latent_score_ve_takes_sigma_max_and_its_pds_filter_from_the_latents(runs, ae_run):
    from diffaccel.data import load_dataset
    from diffaccel.methods.pds import frequency_filter, representative_images
    from diffaccel.methods.score_ve import max_pairwise_distance

    method, nets = load_run(runs("score-ve"))
    lat = latents_of(method, ae_run)
    assert method.sigma_max == pytest.approx(max_pairwise_distance((lat.double() + 1) / 2))
    pre = method.preconditioner((1, 16, 16))
    images = representative_images(load_dataset("digits", 16), 200)
    torch.testing.assert_close(pre.freq, frequency_filter(method.autoencoder("cpu").encode_scaled(images)))
    for pds in (False, True):
        x = method.sample(nets["net"], 2, (1, 16, 16), generator=torch.Generator().manual_seed(0), steps=3, pds=pds,
                          progress=False)
        assert x.shape == (2, 1, 16, 16) and torch.isfinite(x).all()


@pytest.mark.parametrize("name", ["kl", "dvdp", "score-ve"])
def test_latent_runs_refuse_pixel_only_options_and_export_in_one_line(name, runs, tmp_path, capsys):
    run = runs(name)
    capsys.readouterr()
    cases = [(["export", str(run), str(tmp_path / "o")], f"latent {name} runs (--autoencoder) do not export")]
    if name != "score-ve":  # score-ve has no --clip-x0 at all (refused as a flag its sampler does not use)
        cases.append((["sample", str(run), "--n", "2", "--clip-x0", "--out", str(tmp_path / "x.png")],
                      "--clip-x0 clips the predicted x0 to the pixel range"))
    for argv, message in cases:
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "o").exists() and not (tmp_path / "x.png").exists()


def test_kl_fine_tuning_needs_the_same_space(ae_run, runs, tmp_path, capsys):
    pixel = tmp_path / "pixel-baseline"
    main(["train", "--method", "baseline", *COMMON, "--time-steps", "20", "--out", str(pixel)])
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["train", "--method", "kl", *COMMON, *FLAGS["kl"], "--autoencoder", str(ae_run), "--init-from",
              str(pixel), "--out", str(tmp_path / "kl")])
    assert e.value.code == 2
    assert "both must use the same space" in capsys.readouterr().err


def test_a_short_time_grid_still_gets_its_preview_grid(tmp_path):
    """The end-of-training sample grid fits DDIM's default 20 steps to a grid of N < 20."""
    out = tmp_path / "kl10"
    main(["train", "--method", "kl", *COMMON, "--kl-terms", "2", "--time-steps", "10", "--out", str(out)])
    assert (out / "samples.png").is_file()


@pytest.mark.parametrize("space", ["pixel", "latent"])
def test_dvdp_pds_builds_one_filter_per_stage_from_that_stages_data(space, runs, ae_run, tmp_path, capsys):
    import torch.nn.functional as F

    from diffaccel.data import load_dataset
    from diffaccel.methods.pds import frequency_filter, representative_images

    if space == "latent":
        run = runs("dvdp")
    else:
        run = tmp_path / "dvdp"
        main(["train", "--method", "dvdp", *COMMON, *FLAGS["dvdp"], "--out", str(run)])
    method, nets = load_run(run)
    images = method.to_diffusion_space(representative_images(load_dataset("digits", 16), 200))
    pres = method.stage_preconditioners((1, 16, 16))
    assert len(pres) == 2
    for k, pre in enumerate(pres):
        torch.testing.assert_close(pre.freq, frequency_filter(F.avg_pool2d(images, 2**k) if k else images))
    capsys.readouterr()
    grid = tmp_path / "pds.png"
    main(["sample", str(run), "--n", "2", "--steps", "4", "--pds", "--out", str(grid), "--device", "cpu"])
    assert grid.is_file()
    capsys.readouterr()  # the sampler's progress bar
    for flags, message in ((["--pds", "--pds-filter", "f.safetensors"], "builds one per stage"),
                           (["--pds", "--sampler", "ddpm"], "works with --sampler ddim"),
                           (["--pds-space"], "need --pds")):
        with pytest.raises(SystemExit) as e:
            main(["sample", str(run), "--n", "2", *flags, "--out", str(tmp_path / "x.png")])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err


def test_the_timed_sampling_of_a_latent_run_includes_its_decoder(runs, monkeypatch):
    """The harness's seconds per 100 images time method.sample, which decodes every batch once; NFE counts the
    diffusion network's calls only (the decoder's one call per sample is in the time, as for LDDGAN)."""
    import time

    from diffaccel.bench.runner import _generate

    method, nets = load_run(runs("kl"))
    ae = method.autoencoder("cpu")
    decode, calls = ae.decode_scaled, []

    def slow_decode(z):
        calls.append(len(z))
        time.sleep(0.25)
        return decode(z)

    monkeypatch.setattr(ae, "decode_scaled", slow_decode)
    images, seconds = _generate(method, nets["net"], 4, (1, 16, 16), 0, 2, {"steps": 2})
    assert calls == [2, 2] and seconds >= 0.5 and images.shape[0] == 4
    assert method.nfe(steps=2) == 3 * 2  # M = 3 coefficients per step (1st variant), no decoder term
