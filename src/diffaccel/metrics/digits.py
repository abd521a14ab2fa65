"""``digits``: a small digit classifier trained here, as a domain feature extractor and a judge of legibility.

ImageNet features (``effnet``) barely separate a young model's blobs from digits: FIDs in the thousands,
far above any floor, with rankings that flip between reruns. A classifier trained on the digits themselves
measures what matters on MNIST-like data:

- **features** — the 128-d penultimate layer (after ReLU), for ``fid[digits]``, ``kid[digits]``,
  precision and recall;
- **legible rate** — share of samples whose top class probability is >= 0.9;
- **class coverage** — entropy of the histogram of predicted classes over ln 10 (1 = all ten digits
  equally often, 0 = a single class).

Training (:func:`train_digits_classifier`, ``diffaccel train-extractor digits``) uses the labelled
``mnist5k`` digits, 4,000 for training and 1,000 held out (a fixed permutation), with random shifts of up
to 2 pixels, and *outlier exposure* (Hendrycks et al., 2019): each batch also carries non-digits — uniform
noise, smoothed noise blobs, block-shuffled digits and two superposed digits — whose target is the uniform
distribution over the ten classes. Without it a CNN is confidently wrong on noise, and the legible rate of
an untrained generator would not be near 0. The weights ship with the package
(``weights/digits_classifier.safetensors``) and are verified by their SHA-256 when loaded; the command
reproduces them bit for bit (one CPU thread, fixed seeds).
"""

from __future__ import annotations

import functools
import hashlib
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from diffaccel.errors import UserError

WEIGHTS_PATH = Path(__file__).parent / "weights" / "digits_classifier.safetensors"
WEIGHTS_SHA256 = "1eecf48a9a6c85c55b720cdea1527393fc2e0e71204193a12c36c0bcca160190"
LEGIBLE_THRESHOLD = 0.9
NUM_CLASSES = 10
SPLIT_SEED = 0
N_TRAIN = 4000  # the remaining 1,000 of the 5,000 labelled digits are held out


class DigitClassifier(nn.Module):
    """LeNet-like CNN on 1x32x32 digits in [-1, 1] (28x28 inputs are padded with background, as mnist5k; 16x16
    inputs, mnist5k at a quarter of the pixels, are upsampled bilinearly to 32x32)."""

    name = "digits"
    num_features = 128
    SIDES = (64, 32, 28, 16)

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),   # 16x16
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 8x8
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 4x4
            nn.Flatten(), nn.Linear(64 * 4 * 4, self.num_features), nn.ReLU())
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(self.num_features, NUM_CLASSES)
        self.sha256 = ""

    def spec(self) -> str:
        return f"digits-{self.sha256[:12] or 'untrained'}"

    @classmethod
    def prepare(cls, images: torch.Tensor) -> torch.Tensor:
        """uint8 or [-1, 1] float ``[B, 1, S, S]``, S in 64, 32, 28, 16 -> float [-1, 1] ``[B, 1, 32, 32]``."""
        side = images.shape[-1] if images.dim() == 4 and images.shape[-2] == images.shape[-1] else None
        if images.dim() != 4 or images.shape[1] != 1 or side not in cls.SIDES:
            raise UserError(f"the digits extractor is made for 1x64x64, 1x32x32, 1x28x28 or 1x16x16 digit images, got shape "
                            f"{tuple(images.shape[1:])}; use --extractor effnet for other data")
        x = images.float() / 127.5 - 1 if images.dtype == torch.uint8 else images.float()
        if side == 28:
            return F.pad(x, (2, 2, 2, 2), value=-1.0)
        if side == 64:  # 2x2 area averaging back to the classifier's grid (DVDP's 64x64 MNIST)
            return F.avg_pool2d(x, 2)
        if side == 16:  # real 16x16 digits score a legible rate of 0.75-0.85 this way (0.94-0.96 at 32x32)
            return F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False).clamp(-1.0, 1.0)
        return x

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(self.prepare(images))

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(images)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # the extractor interface: features
        return self.features(images)


# --- scores from the classifier ---------------------------------------------------------------------------------
def legible_rate(probabilities: torch.Tensor, threshold: float = LEGIBLE_THRESHOLD) -> float:
    """Share of rows whose top class probability is >= ``threshold``."""
    return float((probabilities.max(dim=1).values >= threshold).float().mean())


def class_coverage(predicted: torch.Tensor, num_classes: int = NUM_CLASSES) -> float:
    """Entropy of the histogram of predicted classes, normalised by ln(num_classes) to [0, 1]."""
    p = torch.bincount(predicted.long(), minlength=num_classes).double()
    p = p[p > 0] / p.sum()
    return max(0.0, float(-(p * p.log()).sum() / math.log(num_classes)))  # max: no "-0.0" for one class


def classifier_scores_from_features(features: torch.Tensor, classifier: DigitClassifier | None = None) -> dict:
    """``{"legible_rate", "class_coverage"}`` from penultimate features (the head is one linear layer)."""
    classifier = classifier or load_digits_classifier()
    with torch.inference_mode():
        head = classifier.head
        probs = torch.softmax(F.linear(features.to(head.weight), head.weight, head.bias), dim=1).cpu()
    return {"legible_rate": legible_rate(probs), "class_coverage": class_coverage(probs.argmax(dim=1))}


def classifier_scores(images: torch.Tensor, batch_size: int = 500) -> dict:
    """Legible rate and class coverage of images ``[N, 1, S, S]``, S in 32, 28, 16 (uint8 or [-1, 1] float)."""
    classifier = load_digits_classifier()
    with torch.inference_mode():
        feats = torch.cat([classifier.features(b) for b in images.split(batch_size)])
    return classifier_scores_from_features(feats, classifier)


# --- weights ----------------------------------------------------------------------------------------------------
def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@functools.lru_cache(maxsize=2)
def _load(path: str, expected_sha256: str | None) -> DigitClassifier:
    from safetensors.torch import load_file

    p = Path(path)
    if not p.is_file():
        raise UserError(f"digits classifier weights not found: {p}; run `diffaccel train-extractor digits`")
    digest = file_sha256(p)
    if expected_sha256 is not None and digest != expected_sha256:
        raise UserError(f"digits classifier weights {p} fail their checksum (sha256 {digest[:12]}…, expected "
                        f"{expected_sha256[:12]}…); reinstall diffaccel or run `diffaccel train-extractor digits`")
    net = DigitClassifier()
    try:
        net.load_state_dict(load_file(str(p)))
    except Exception as e:
        raise UserError(f"cannot load digits classifier weights from {p}: {e}") from e
    net.sha256 = digest
    return net.eval().requires_grad_(False)


def load_digits_classifier(path: str | Path | None = None) -> DigitClassifier:
    """The shipped classifier (checksum verified), or one from ``path`` (checksum recorded, not enforced)."""
    if path is None:
        return _load(str(WEIGHTS_PATH), WEIGHTS_SHA256)
    return _load(str(Path(path).resolve()), None)


# --- training ---------------------------------------------------------------------------------------------------
def labelled_split() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(train_images, train_labels, heldout_images, heldout_labels)``: mnist5k as uint8 1x32x32, split 4000/1000."""
    from diffaccel.data import load_dataset, mnist5k_labels

    images = load_dataset("mnist5k").images
    labels = torch.from_numpy(mnist5k_labels())
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(SPLIT_SEED))
    tr, te = order[:N_TRAIN], order[N_TRAIN:]
    return images[tr], labels[tr], images[te], labels[te]


def _shift(x: torch.Tensor, g: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Random translation by up to ``max_shift`` pixels, background-filled (pad with -1, crop)."""
    b, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, b), generator=g)
    rows = (dy.view(b, 1) + torch.arange(h)).view(b, 1, h, 1).expand(b, 1, h, w + 2 * max_shift)
    cropped = padded.gather(2, rows)
    cols = (dx.view(b, 1) + torch.arange(w)).view(b, 1, 1, w).expand(b, 1, h, w)
    return cropped.gather(3, cols)


def non_digits(digits: torch.Tensor, n: int, g: torch.Generator) -> torch.Tensor:
    """``n`` images that are not digits, made from noise and from ``digits`` ([-1, 1], 1x32x32): uniform noise,
    smoothed noise blobs, digits with their 8x8 blocks shuffled, and the pixelwise max of two digits."""
    kinds = torch.randint(0, 4, (n,), generator=g)
    out = torch.rand(n, 1, 32, 32, generator=g) * 2 - 1                         # 0: uniform noise
    blobs = F.avg_pool2d(torch.randn(n, 1, 32, 32, generator=g), 7, stride=1, padding=3)
    blobs = (blobs / blobs.flatten(1).std(dim=1).view(-1, 1, 1, 1) - 0.5).clamp(-1, 1)
    out = torch.where((kinds == 1).view(-1, 1, 1, 1), blobs, out)                  # 1: noise blobs
    pick = digits[torch.randint(0, len(digits), (n,), generator=g)]
    blocks = pick.unfold(2, 8, 8).unfold(3, 8, 8).reshape(n, 16, 8, 8)
    perm = torch.argsort(torch.rand(n, 16, generator=g), dim=1)
    shuffled = blocks.gather(1, perm.view(n, 16, 1, 1).expand(n, 16, 8, 8))
    shuffled = shuffled.view(n, 4, 4, 8, 8).permute(0, 1, 3, 2, 4).reshape(n, 1, 32, 32)
    out = torch.where((kinds == 2).view(-1, 1, 1, 1), shuffled, out)               # 2: block-shuffled digit
    other = digits[torch.randint(0, len(digits), (n,), generator=g)]
    out = torch.where((kinds == 3).view(-1, 1, 1, 1), torch.maximum(pick, other), out)  # 3: two superposed
    return out


def train_digits_classifier(epochs: int = 30, batch_size: int = 100, lr: float = 2e-3, seed: int = 0,
                            outlier_weight: float = 0.25, limit: int | None = None,
                            progress: bool = True) -> tuple[DigitClassifier, dict]:
    """Train the classifier on the 4,000 training digits; returns it and its held-out report.

    One CPU thread and fixed seeds: rerunning reproduces the weights bit for bit on the same torch build.
    ``limit`` trains on the first ``limit`` training digits only (tests)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(seed)
        g = torch.Generator().manual_seed(seed)
        x_tr, y_tr, x_te, y_te = labelled_split()
        if limit is not None:
            x_tr, y_tr = x_tr[:limit], y_tr[:limit]
        x_tr = x_tr.float() / 127.5 - 1
        net = DigitClassifier()
        opt = torch.optim.Adam(net.parameters(), lr=lr)
        steps_per_epoch = max(1, len(x_tr) // batch_size)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch)
        for _ in tqdm(range(epochs), desc="digits classifier", disable=not progress):
            net.train()
            order = torch.randperm(len(x_tr), generator=g)
            for i in range(steps_per_epoch):
                idx = order[i * batch_size:(i + 1) * batch_size]
                x, y = _shift(x_tr[idx], g), y_tr[idx]
                junk = non_digits(x_tr, len(idx) // 2, g)
                logits = net.logits(torch.cat([x, junk]))
                loss = F.cross_entropy(logits[:len(idx)], y)
                # outlier exposure: cross-entropy to the uniform distribution on non-digits
                loss = loss - outlier_weight * F.log_softmax(logits[len(idx):], dim=1).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
        net.eval().requires_grad_(False)
        return net, evaluate_classifier(net, x_te, y_te, seed=seed)
    finally:
        torch.set_num_threads(threads)


@torch.inference_mode()
def evaluate_classifier(net: DigitClassifier, images: torch.Tensor, labels: torch.Tensor, seed: int = 0) -> dict:
    """Held-out accuracy, legible rate on real digits and on uniform noise, and class coverage."""
    net.eval()
    probs = torch.softmax(net.logits(images), dim=1)
    noise = torch.rand(len(images), 1, 32, 32, generator=torch.Generator().manual_seed(seed + 1)) * 2 - 1
    noise_probs = torch.softmax(net.logits(noise), dim=1)
    return {"heldout_n": len(images), "heldout_accuracy": float((probs.argmax(1) == labels).float().mean()),
            "heldout_legible_rate": legible_rate(probs), "noise_legible_rate": legible_rate(noise_probs),
            "heldout_class_coverage": class_coverage(probs.argmax(1))}


def save_classifier(net: DigitClassifier, path: str | Path, report: dict) -> str:
    """Write the weights as safetensors (report in the metadata) atomically; returns the file's SHA-256."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    state = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
    save_file(state, str(tmp), metadata={k: f"{v:.6f}" if isinstance(v, float) else str(v)
                                         for k, v in report.items()})
    tmp.chmod(0o644)  # a shipped package file, readable by everyone
    tmp.replace(path)
    return file_sha256(path)
