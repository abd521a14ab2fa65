"""Denoising diffusion GAN (DDGAN) in pixel space and in the latent space of an autoencoder (LDDGAN).

Training (one iteration = D phase then G phase, both on the same data batch):
  real pair   x_{t-1} ~ q(x_{t-1}|x_0), x_t ~ q(x_t|x_{t-1}),  t ~ U{1..T}
  fake pair   x_0' = G(x_t, t, z), x_{t-1}' ~ q(x_{t-1}|x_t, x_0')   (the Gaussian posterior)
  D loss      softplus(-D(x_{t-1}, x_t, t)) + softplus(D(x_{t-1}', x_t, t)) + [every lazy_reg steps] γ/2·‖∇D(real)‖²
  G loss      softplus(-D(x_{t-1}', x_t, t)) + λ·‖x_0 - x_0'‖₁ with λ = 0, 1, or Weighted Learning (paper eq. 9)
Optimisation as in the official code: Adam betas (0.5, 0.9), separate learning rates for D and G, no gradient
clipping (clipping would rescale the R1 steps, changing γ's meaning; ``--gan-clip`` opts in). Each log record
carries D's mean logit on real and fake pairs and the R1 value; a dead discriminator is warned about.
Sampling (Algorithm 1): x_T ~ N(0, I); for t = T..1: x_0' = G(x_t, t, z), x_{t-1} ~ q(x_{t-1}|x_t, x_0');
then (LDDGAN) one decoder call.
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F
from torch import nn

from diffaccel.errors import UserError
from diffaccel.gan_health import DiscriminatorMonitor
from diffaccel.methods.base import Method, Phase
from diffaccel.methods.ddgan_schedule import ddgan_schedule
from diffaccel.methods.latent import LatentSpace, add_autoencoder_argument, check_autoencoder_run

GEN_LOSSES = ("adv", "adv+rec", "adv+rec+wl")


def weighted_learning_weight(epoch: float, num_epochs: float, delta: float = 6.0) -> float:
    """λ of Weighted Learning: 1 - sigmoid(φ), φ = -δ + 2δ·epoch/num_epochs.

    The paper prints φ = -δ + δ·epoch/num_epochs, which would end training at λ = 0.5; its text and Figure 2
    (λ ≈ 1 at the start, ≈ 0 at the end, 0.5 at mid-training) and the official code need the factor 2.
    """
    if num_epochs <= 0:
        raise UserError(f"Weighted Learning needs a positive number of epochs/steps, got {num_epochs}")
    phi = -delta + 2.0 * delta * float(epoch) / float(num_epochs)
    return 1.0 - 1.0 / (1.0 + math.exp(-phi))


def r1_penalty(d_out: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """Per-sample ‖∇_x D(x)‖² (differentiable, for the R1 regulariser); ``inputs`` must require grad."""
    (grad,) = torch.autograd.grad(d_out.sum(), inputs, create_graph=True)
    return grad.pow(2).flatten(1).sum(1)


def _set_requires_grad(net: nn.Module, flag: bool) -> None:
    # the G phase must not leave gradients in D (and vice versa the D phase runs G without a graph)
    for p in net.parameters():
        p.requires_grad_(flag)


def _adam(params, lr):
    """DDGAN's optimiser; the learning rate is the phase's (--lr-d / --lr-g), set by the trainer every step."""
    return torch.optim.Adam(params, lr=lr, betas=(0.5, 0.9))


class DDGAN(LatentSpace, Method):
    """Pixel-space denoising diffusion GAN (Xiao et al. 2022); the LDDGAN subclass runs it on latents."""

    name = "ddgan"
    composition_notes = {"latent": "DDGAN on latents is --method lddgan",
                         "pds": "a GAN sampler takes T <= 8 generator steps; there is no score to precondition"}
    ema_networks = ("generator",)
    sampling_network = "generator"
    default_gen_loss = "adv"

    def __init__(self, T: int = 4, gen_loss: str | None = None, wl_delta: float = 6.0, rec_weight: float = 1.0,
                 r1_gamma: float = 0.05, lazy_reg: int = 15, nz: int | None = None, beta_min: float = 0.1,
                 beta_max: float = 20.0, lr_d: float = 1.25e-4, lr_g: float = 1.6e-4, gan_clip: bool = False,
                 d_health_steps: int = 1000):
        gen_loss = gen_loss or self.default_gen_loss
        if gen_loss not in GEN_LOSSES:
            raise UserError(f"--gen-loss must be one of {', '.join(GEN_LOSSES)}, got {gen_loss!r}")
        if lazy_reg < 1:
            raise UserError(f"--lazy-reg must be >= 1, got {lazy_reg}")
        if r1_gamma < 0:
            raise UserError(f"--r1-gamma must be >= 0, got {r1_gamma}")
        if nz is not None and nz < 1:
            raise UserError(f"--nz must be >= 1, got {nz}")
        if not (lr_d > 0 and lr_g > 0 and math.isfinite(lr_d) and math.isfinite(lr_g)):
            raise UserError(f"--lr-d and --lr-g must be positive numbers, got {lr_d} and {lr_g}")
        if d_health_steps < 0:
            raise UserError(f"--d-health-steps must be >= 0 (0 turns the warning off), got {d_health_steps}")
        self.T, self.gen_loss, self.wl_delta, self.rec_weight = int(T), gen_loss, float(wl_delta), float(rec_weight)
        self.r1_gamma, self.lazy_reg, self.nz = float(r1_gamma), int(lazy_reg), nz
        self.beta_min, self.beta_max = float(beta_min), float(beta_max)
        self.schedule = ddgan_schedule(self.T, beta_min, beta_max)
        self.lr_d, self.lr_g, self.gan_clip = float(lr_d), float(lr_g), bool(gan_clip)
        self.d_health_steps = int(d_health_steps)
        self.health = DiscriminatorMonitor("", "discriminator", patience=self.d_health_steps)
        self.total_steps: int | None = None

    # --- configuration -------------------------------------------------------------------------------------
    def config(self) -> dict:
        return {"T": self.T, "gen_loss": self.gen_loss, "wl_delta": self.wl_delta, "rec_weight": self.rec_weight,
                "r1_gamma": self.r1_gamma, "lazy_reg": self.lazy_reg, "nz": self.nz, "beta_min": self.beta_min, "beta_max": self.beta_max,
                "lr_d": self.lr_d, "lr_g": self.lr_g, "gan_clip": self.gan_clip, "d_health_steps": self.d_health_steps}

    @staticmethod
    def add_arguments(group: argparse._ArgumentGroup) -> None:
        group.add_argument("--steps-T", type=int, default=4, help="DDGAN/LDDGAN: number of denoising steps T (<= 8)")
        group.add_argument("--gen-loss", choices=GEN_LOSSES, default=None,
                           help="DDGAN/LDDGAN generator loss: adversarial only, + fixed L1 reconstruction (λ=1), "
                                "or + Weighted Learning (default: adv for ddgan, adv+rec+wl for lddgan)")
        group.add_argument("--wl-delta", type=float, default=6.0, help="Weighted Learning δ (paper eq. 9)")
        group.add_argument("--r1-gamma", type=float, default=0.05, help="DDGAN/LDDGAN R1 penalty weight γ")
        group.add_argument("--lazy-reg", type=int, default=15, help="apply the R1 penalty every N steps")
        group.add_argument("--nz", type=int, default=None, help="DDGAN/LDDGAN latent z size (default: preset's)")
        group.add_argument("--lr-d", type=float, default=1.25e-4,
                           help="DDGAN/LDDGAN discriminator learning rate (official CIFAR-10 setting; --lr is not "
                                "used by the GAN phases)")
        group.add_argument("--lr-g", type=float, default=1.6e-4, help="DDGAN/LDDGAN generator learning rate")
        group.add_argument("--gan-clip", action="store_true",
                           help="DDGAN/LDDGAN: clip the GAN phases' gradients at --max-grad-norm (default: no "
                                "clipping, as the official code)")
        group.add_argument("--d-health-steps", type=int, default=1000,
                           help="GAN methods (ddgan, lddgan, autoencoder): warn when a discriminator's real/fake logit gap "
                                "stays ~0 for this many steps (0: off)")

    @classmethod
    def _common_args(cls, args: argparse.Namespace) -> dict:
        return dict(T=args.steps_T, gen_loss=args.gen_loss, wl_delta=args.wl_delta, r1_gamma=args.r1_gamma,
                    lazy_reg=args.lazy_reg, nz=args.nz, lr_d=args.lr_d, lr_g=args.lr_g, gan_clip=args.gan_clip,
                    d_health_steps=args.d_health_steps)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "DDGAN":
        return cls(**cls._common_args(args))

    def on_train_start(self, total_steps: int) -> None:
        """The trainer tells the method how long training will be (Weighted Learning's 'epoch' progress)."""
        self.total_steps = int(total_steps)

    # --- networks ------------------------------------------------------------------------------------------
    def build_networks(self, net_cfg: dict, image_shape: tuple[int, int, int]) -> dict[str, nn.Module]:
        from diffaccel.nets.ddgan import build_discriminator, build_generator

        c, h, _ = self.data_shape(image_shape)
        preset = net_cfg.get("preset", "small")
        overrides = dict(net_cfg.get("overrides", {}))
        if self.nz is not None:
            overrides["nz"] = self.nz
        if self.latent:
            overrides.setdefault("output", "identity")  # unit-std latents are not bounded to [-1, 1]
        return {"generator": build_generator(preset, c, h, **overrides),
                "discriminator": build_discriminator(preset, c, **net_cfg.get("discriminator", {}))}

    # --- training ------------------------------------------------------------------------------------------
    def phases(self) -> list[Phase]:
        return [Phase("discriminator", ("discriminator",), self.discriminator_loss, optimizer=_adam, lr=self.lr_d,
                      clip=self.gan_clip),
                Phase("generator", ("generator",), self.generator_loss, optimizer=_adam, lr=self.lr_g,
                      clip=self.gan_clip)]

    def on_log(self, record: dict, log) -> None:
        self.health.update(record, log)

    def _draw(self, x0: torch.Tensor):
        t = torch.randint(1, self.T + 1, (x0.shape[0],), device=x0.device)
        x_prev, x_t = self.schedule.q_pair(x0, t)
        return t, x_prev, x_t

    def _fake(self, G: nn.Module, x_t: torch.Tensor, t: torch.Tensor):
        z = torch.randn(x_t.shape[0], _unwrap(G).nz, device=x_t.device, dtype=x_t.dtype)
        x0_fake = G(x_t, t.to(x_t.dtype), z)
        return x0_fake, self.schedule.posterior_sample(x0_fake, x_t, t)

    def discriminator_loss(self, nets: dict[str, nn.Module], x0: torch.Tensor, step: int):
        G, D = nets["generator"], nets["discriminator"]
        _set_requires_grad(D, True)
        t, x_prev, x_t = self._draw(x0)
        tf = t.to(x0.dtype)
        do_r1 = self.r1_gamma > 0 and step % self.lazy_reg == 0
        x_prev.requires_grad_(do_r1)
        d_real = D(x_prev, x_t, tf)
        loss = F.softplus(-d_real).mean()
        health = {"d_real": d_real.detach().mean()}
        if do_r1:
            r1 = r1_penalty(d_real, x_prev).mean()
            loss = loss + self.r1_gamma / 2 * r1
            health["r1"] = r1.detach()
        with torch.no_grad():
            _, x_prev_fake = self._fake(G, x_t, t)
        d_fake = D(x_prev_fake, x_t, tf)
        health["d_fake"] = d_fake.detach().mean()
        return loss + F.softplus(d_fake).mean(), health

    def reconstruction_weight(self, step: int) -> float:
        if self.gen_loss == "adv":
            return 0.0
        if self.gen_loss == "adv+rec":
            return self.rec_weight
        if self.total_steps is None:
            raise RuntimeError("Weighted Learning needs the training length: call method.on_train_start(total_steps)")
        return self.rec_weight * weighted_learning_weight(step, self.total_steps, self.wl_delta)

    def generator_loss(self, nets: dict[str, nn.Module], x0: torch.Tensor, step: int) -> torch.Tensor:
        G, D = nets["generator"], nets["discriminator"]
        _set_requires_grad(D, False)
        t, _, x_t = self._draw(x0)
        x0_fake, x_prev_fake = self._fake(G, x_t, t)
        loss = F.softplus(-D(x_prev_fake, x_t, t.to(x0.dtype))).mean()
        lam = self.reconstruction_weight(step)
        if lam > 0:
            loss = loss + lam * (x0_fake - x0).abs().mean()
        return (loss, {"rec_weight": lam}) if self.gen_loss != "adv" else loss

    # --- sampling ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample_latents(self, net: nn.Module, n: int, shape: tuple[int, int, int], *,
                       generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        """Algorithm 1 without the decoder: T generator calls."""
        device = torch.device(device) if device is not None else next(net.parameters()).device
        gdev = generator.device if generator is not None else device
        sched = self.schedule.to(device)

        def randn(*size):
            return torch.randn(*size, generator=generator, device=gdev).to(device)

        x = randn(n, *shape)
        nz = _unwrap(net).nz
        for step in range(self.T, 0, -1):
            t = torch.full((n,), step, device=device, dtype=torch.long)
            x0 = net(x, t.float(), randn(n, nz))
            mean = sched.posterior_mean(x0, x, t)
            std = float(sched.posterior_var[step].sqrt())
            x = mean + std * randn(n, *shape) if step > 1 else mean
        return x

    def sample(self, net: nn.Module, n: int, image_shape, *, generator=None, device=None, progress: bool = False,
               **_) -> torch.Tensor:
        x = self.sample_latents(net, n, self.data_shape(image_shape), generator=generator, device=device)
        return self.decode(x).clamp(-1, 1)

    def nfe(self, **_) -> int:
        """Generator calls per sample (LDDGAN adds one decoder call, reported separately)."""
        return self.T

    def sampler_options(self, args: argparse.Namespace) -> dict:
        return {}


def _unwrap(net: nn.Module) -> nn.Module:
    """The generator inside an EMA (AveragedModel) or distributed wrapper."""
    while hasattr(net, "module"):
        net = net.module
    return net


class LDDGAN(DDGAN):
    """DDGAN on the scaled latents of a trained autoencoder run (``--autoencoder AE_RUN``)."""

    name = "lddgan"
    latent_only = True
    composition_notes = {"pixel": "LDDGAN without an autoencoder is --method ddgan",
                         "pds": DDGAN.composition_notes["pds"]}
    default_gen_loss = "adv+rec+wl"

    def __init__(self, autoencoder: str | None = None, **kwargs):
        if not autoencoder:
            raise UserError("lddgan needs --autoencoder AE_RUN (a run directory of `diffaccel train --method "
                            "autoencoder`)")
        self.autoencoder_run = check_autoencoder_run(autoencoder)
        super().__init__(**kwargs)

    def config(self) -> dict:
        return {"autoencoder": self.autoencoder_run, **super().config()}

    @staticmethod
    def add_arguments(group: argparse._ArgumentGroup) -> None:
        add_autoencoder_argument(group)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "LDDGAN":
        return cls(autoencoder=args.autoencoder, **cls._common_args(args))
