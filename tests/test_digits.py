"""The digits classifier: shipped weights, accuracy, legibility and coverage scores, refusals, reproducibility."""

import math

import pytest
import torch

from diffaccel.errors import UserError
from diffaccel.evaluate import score_images
from diffaccel.metrics import digits
from diffaccel.metrics.features import build_extractor


@pytest.fixture(scope="module")
def split():
    return digits.labelled_split()


def test_shipped_weights_pass_checksum_and_reach_97_percent(split):
    net = digits.load_digits_classifier()
    assert net.sha256 == digits.WEIGHTS_SHA256 == digits.file_sha256(digits.WEIGHTS_PATH)
    _, _, x_te, y_te = split
    report = digits.evaluate_classifier(net, x_te, y_te)
    assert report["heldout_n"] == 1000
    assert report["heldout_accuracy"] >= 0.97


def test_split_is_disjoint_and_balanced(split):
    x_tr, y_tr, x_te, y_te = split
    assert len(x_tr) == 4000 and len(x_te) == 1000
    flat_tr = {bytes(x.numpy()) for x in x_tr}
    assert sum(bytes(x.numpy()) in flat_tr for x in x_te) <= 5  # mnist5k has a few exact duplicate digits at most
    assert torch.bincount(y_te, minlength=10).min() >= 70


def test_legible_rate_high_on_real_digits_and_zero_on_noise(split):
    _, _, x_te, _ = split
    real = digits.classifier_scores(x_te)
    assert real["legible_rate"] >= 0.9
    assert real["class_coverage"] >= 0.99
    noise = torch.rand(500, 1, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1
    assert digits.classifier_scores(noise)["legible_rate"] <= 0.02
    blobs = digits.non_digits(x_te.float() / 127.5 - 1, 500, torch.Generator().manual_seed(4))
    assert digits.classifier_scores(blobs)["legible_rate"] <= 0.1


def test_28x28_digits_are_padded_like_mnist5k(split):
    _, _, x_te, _ = split
    net = digits.load_digits_classifier()
    assert torch.equal(net.features(x_te[:50, :, 2:30, 2:30]), net.features(x_te[:50]))


def test_16x16_digits_are_upsampled_to_the_classifiers_grid_and_stay_legible(split):
    """mnist5k at 16x16 (a quarter of the pixels): bilinear upsampling to 32x32 before the classifier, and the
    held-out digits downsampled that way remain mostly legible (0.75 of them; 0.94 at 32x32)."""
    import torch.nn.functional as F

    _, _, x_te, _ = split
    small = F.interpolate(x_te.float() / 127.5 - 1, size=(16, 16), mode="bilinear", antialias=True,
                          align_corners=False)
    net = digits.load_digits_classifier()
    up = F.interpolate(small[:50], size=(32, 32), mode="bilinear", align_corners=False).clamp(-1, 1)
    assert torch.equal(net.features(small[:50]), net.features(up))
    scores = digits.classifier_scores(small)
    assert 0.7 <= scores["legible_rate"] < digits.classifier_scores(x_te)["legible_rate"]
    assert scores["class_coverage"] >= 0.99


def test_64x64_digits_are_area_averaged_to_the_classifiers_grid_and_stay_legible(split):
    """MNIST at 64x64 (DVDP's benchmark): 2x2 area averaging back to 32x32; digits upsampled to 64 and scored
    that way are about as legible as at 32x32."""
    import torch.nn.functional as F

    _, _, x_te, _ = split
    big = F.interpolate(x_te.float() / 127.5 - 1, size=(64, 64), mode="bilinear", align_corners=False)
    net = digits.load_digits_classifier()
    assert torch.equal(net.features(big[:50]), net.features(F.avg_pool2d(big[:50], 2)))
    scores, at_32 = digits.classifier_scores(big), digits.classifier_scores(x_te)
    assert scores["legible_rate"] >= at_32["legible_rate"] - 0.03 and scores["class_coverage"] >= 0.99


def test_class_coverage_closed_forms():
    assert digits.class_coverage(torch.arange(1000) % 10) == pytest.approx(1.0)
    assert digits.class_coverage(torch.full((100,), 3)) == 0.0
    two = digits.class_coverage(torch.tensor([0, 1] * 50))
    assert two == pytest.approx(math.log(2) / math.log(10))


def test_legible_rate_counts_rows_at_or_above_threshold():
    probs = torch.tensor([[0.9, 0.1] + [0.0] * 8, [0.5, 0.5] + [0.0] * 8, [1.0] + [0.0] * 9, [0.89, 0.11] + [0] * 8])
    assert digits.legible_rate(probs) == 0.5


def test_extractor_refuses_other_data():
    with pytest.raises(UserError, match="effnet"):
        build_extractor("digits", image_size=128)
    net = build_extractor("digits", image_size=32)
    with pytest.raises(UserError, match="1x32x32"):
        net(torch.zeros(2, 3, 32, 32))


def test_score_images_with_digits_reports_classifier_scores(split, tmp_path):
    x_tr, _, x_te, _ = split
    scores = score_images(x_tr[:600], x_te[:300], extractor="digits", cache=tmp_path)
    assert {"fid[digits]", "kid[digits]", "precision[digits]", "recall[digits]", "legible_rate",
            "class_coverage"} <= set(scores)
    noise = torch.rand(300, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    worse = score_images(x_tr[:600], noise, extractor="digits", cache=tmp_path)
    assert worse["fid[digits]"] > 10 * scores["fid[digits]"]
    assert worse["legible_rate"] < 0.05 < scores["legible_rate"]


def test_corrupt_weights_are_refused(tmp_path):
    bad = tmp_path / "w.safetensors"
    bad.write_bytes(digits.WEIGHTS_PATH.read_bytes()[:-10])
    digits._load.cache_clear()
    with pytest.raises(UserError, match="checksum"):
        digits._load(str(bad), digits.WEIGHTS_SHA256)
    with pytest.raises(UserError, match="cannot load"):
        digits.load_digits_classifier(bad)


def test_training_is_reproducible_bit_for_bit():
    a, _ = digits.train_digits_classifier(epochs=1, limit=200, progress=False)
    b, _ = digits.train_digits_classifier(epochs=1, limit=200, progress=False)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
