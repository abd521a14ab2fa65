"""`--method baseline --autoencoder AE_RUN`: DDPM/DDIM on an autoencoder's unit-std latents, decoded at sampling."""

import pytest
import torch

from diffaccel.cli import main
from diffaccel.errors import UserError
from diffaccel.methods.baseline import Baseline
from diffaccel.samplers import sample_epsilon

COMMON = ["--data", "digits", "--resolution", "8", "--data-limit", "48", "--preset", "tiny", "--batch-size", "8",
          "--log-every", "1", "--sample-every", "0", "--device", "cpu"]


@pytest.fixture(scope="module")
def ae_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("latent") / "ae"
    main(["train", "--method", "autoencoder", *COMMON, "--steps", "3", "--checkpoint-every", "3",
          "--ae-factor", "2", "--latent-channels", "2", "--out", str(out)])
    return out


@pytest.fixture(scope="module")
def latent_run(ae_run):
    out = ae_run.parent / "latent-baseline"
    main(["train", "--method", "baseline", "--autoencoder", str(ae_run), "--time-steps", "50", *COMMON,
          "--steps", "4", "--checkpoint-every", "2", "--out", str(out)])
    return out


def test_latent_baseline_trains_on_latents_and_decodes_its_samples(ae_run, latent_run):
    from diffaccel.runs import load_run

    method, nets = load_run(latent_run)
    assert method.latent and method.config()["autoencoder"] == str(ae_run)
    ae = method.autoencoder("cpu")
    assert ae.latent_shape == (2, 4, 4) and nets["net"].config.in_channels == 2  # the network sees latents
    x = method.sample(nets["net"], 3, (1, 8, 8), generator=torch.Generator().manual_seed(1), steps=5, progress=False)
    # the same DDIM run directly on the latent grid, then decoded: the method adds nothing but the decoder
    z = sample_epsilon(nets["net"], (3, 2, 4, 4), method.alpha_bars, steps=5, eta=1.0,
                       generator=torch.Generator().manual_seed(1), progress=False)
    torch.testing.assert_close(x, ae.decode_scaled(z).clamp(-1, 1))
    assert x.shape == (3, 1, 8, 8) and x.abs().max() <= 1
    # the training data it saw are the scaled latents, of unit std on the autoencoder's own data
    from diffaccel.data import ImageDataset
    from diffaccel.methods.autoencoder import training_images

    lat = method.prepare(ImageDataset(training_images(ae_run), "digits"), "cpu")
    assert lat.images.float().std().item() == pytest.approx(1.0, abs=1e-3)


def test_latent_baseline_samples_and_resumes_from_the_cli(latent_run, tmp_path):
    grid = tmp_path / "grid.png"
    main(["sample", str(latent_run), "--n", "4", "--steps", "3", "--out", str(grid), "--device", "cpu"])
    assert grid.is_file()
    main(["train", "--resume", "--out", str(latent_run), "--steps", "6"])
    from diffaccel.checkpoint import list_checkpoints

    assert list_checkpoints(latent_run / "checkpoints")[-1].name.endswith("6")


def test_pixel_only_sampler_options_are_refused_on_latents(latent_run, tmp_path, capsys):
    message = "--clip-x0 clips the predicted x0 to the pixel range"
    with pytest.raises(SystemExit) as e:
        main(["sample", str(latent_run), "--n", "2", "--out", str(tmp_path / "x.png"), "--clip-x0"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.png").exists()


def test_latent_baseline_refusals(ae_run, latent_run, tmp_path, capsys):
    cases = [(["train", "--method", "baseline", "--autoencoder", str(ae_run), *COMMON, "--steps", "1", "--clip-x0",
               "--out", str(tmp_path / "r")], "--clip-x0 clips"),
             (["train", "--method", "baseline", "--autoencoder", str(tmp_path / "none"), *COMMON, "--steps", "1",
               "--out", str(tmp_path / "r")], "no such run directory"),
             (["train", "--method", "ddgan", "--autoencoder", str(ae_run), *COMMON, "--steps", "1",
               "--out", str(tmp_path / "r")], "--autoencoder is not used by method 'ddgan'")]
    for argv, message in cases:
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "r").exists()
    with pytest.raises(UserError, match="is not an autoencoder run"):  # a run, but of another method
        Baseline(N=10, autoencoder=str(latent_run)).data_shape((1, 8, 8))

def test_latent_baseline_does_not_export(latent_run, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["export", str(latent_run), str(tmp_path / "o")])
    assert e.value.code == 2 and "latent baseline runs (--autoencoder) do not export" in capsys.readouterr().err


def test_latent_pds_preconditions_the_latents_with_their_own_spectrum(ae_run, latent_run):
    """--pds on a latent run: the frequency filter of the encoded training images, at the latent's shape."""
    from diffaccel.data import load_dataset
    from diffaccel.methods.pds import frequency_filter, representative_images
    from diffaccel.runs import load_run

    method, nets = load_run(latent_run)
    pre = method.pds_preconditioner((1, 8, 8), pds=True)
    images = representative_images(load_dataset("digits", 8), 200)  # as PDS reads the run's data
    latents = method.autoencoder("cpu").encode_scaled(images)
    assert pre.freq.shape == (2, 4, 4)
    torch.testing.assert_close(pre.freq, frequency_filter(latents))
    assert not torch.allclose(pre.freq, torch.ones_like(pre.freq))  # a filter, not the identity
    x = method.sample(nets["net"], 3, (1, 8, 8), generator=torch.Generator().manual_seed(0), steps=4, pds=True,
                      progress=False)
    assert x.shape == (3, 1, 8, 8) and torch.isfinite(x).all()
