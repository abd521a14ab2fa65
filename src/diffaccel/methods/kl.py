"""KL diffusion (Ren et al., "Efficient Diffusion Training through Parallelization with Truncated
Karhunen-Loève Expansion"): the Brownian motion of the VP forward process is replaced by its expansion
truncated to M terms, W_t ≈ Σ_m phi_m(t) Z_m, and the network predicts the M coefficients Z_m.

Equation map (paper numbering):
  phi, phi_dot       eq. 8-10   basis phi_m(t) = 2√2/((2m−1)π) sin((2m−1)πt/2) and its derivative
  h                  eq. 12-13  exact coefficients of the KL forward ODE, by Gauss-Legendre quadrature
  KLDiffusion.noise  eq. 16     Z'_t = Σ_m phi_m(t)/√t Z_m,  x̃ = mu(t) x + sigma(t) Z'_t
  kl_loss            eq. 19     (1/t)‖Σ_m phi_m(t)(Z_m − Ẑ_m)‖²           ("KL-Md", variant 1st)
                     eq. 25     same sum with the M·C-channel network     (variant 2nd)
  kl_partial_loss    eq. 20     (1/t) Σ_j ‖Z_{m_j} − Ẑ_{m_j}‖²             ("KL-MdM'")
  KLDiffusion.epsilon eq. 24    ε̂ = (1/√t) Σ_m phi_m(t) Ẑ_m  — a drop-in epsilon predictor for any sampler
  init_from_baseline §6.6       fine-tuning from a trained epsilon model (weight copy + output correction)
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

from diffaccel.errors import UserError
from diffaccel.methods.base import Method
from diffaccel.methods.latent import LatentSpace, add_autoencoder_argument, check_autoencoder_run
from diffaccel.methods.pds import EpsilonPDS
from diffaccel.samplers import sample_epsilon
from diffaccel.schedules import VPSchedule

VARIANTS = ("1st", "2nd")
CORRECTIONS = ("none", "paper", "posterior")


# --- the Karhunen-Loève basis of Brownian motion on [0, 1] ------------------------------------------------
def _as_float(t) -> torch.Tensor:
    t = torch.as_tensor(t)
    return t if t.is_floating_point() else t.to(torch.get_default_dtype())


def phi(t, M: int) -> torch.Tensor:
    """phi_m(t) = 2√2/((2m−1)π)·sin((2m−1)πt/2) for m = 1..M, shape ``[*t.shape, M]`` (eq. 8)."""
    t = _as_float(t)
    w = (2 * torch.arange(1, M + 1, dtype=t.dtype, device=t.device) - 1) * math.pi
    return 2 * math.sqrt(2) / w * torch.sin(w * t.unsqueeze(-1) / 2)


def phi_dot(t, M: int) -> torch.Tensor:
    """d/dt phi_m(t) = √2·cos((2m−1)πt/2), shape ``[*t.shape, M]`` (eq. 10); orthonormal on [0, 1]."""
    t = _as_float(t)
    w = (2 * torch.arange(1, M + 1, dtype=t.dtype, device=t.device) - 1) * math.pi
    return math.sqrt(2) * torch.cos(w * t.unsqueeze(-1) / 2)


def h(t, M: int, schedule: VPSchedule | None = None, nodes: int | None = None) -> torch.Tensor:
    """h_m(t) = ∫_0^t √beta(s)·mu(t)/mu(s)·phi_m'(s) ds (eq. 12), shape ``[*t.shape, M]``, float64.

    Gauss-Legendre with ``nodes`` points on [0, t] (default 128 + 2M): the integrand is smooth and
    oscillates at most (2M−1)/4 times, so this is exact to float64 rounding. No library offers this integral
    batched over t and m, hence the few lines here.
    """
    schedule = schedule or VPSchedule()
    t = torch.as_tensor(t, dtype=torch.float64)
    x, w = (torch.from_numpy(a) for a in np.polynomial.legendre.leggauss(nodes or 128 + 2 * M))
    s = t.unsqueeze(-1) * (x + 1) / 2                                # [..., nodes]
    ws = t.unsqueeze(-1) * w / 2
    integrand = (schedule.beta(s).sqrt() * torch.exp(schedule.log_mu(t).unsqueeze(-1) - schedule.log_mu(s)))
    return torch.einsum("...n,...nm->...m", ws * integrand, phi_dot(s, M))


# --- the losses as pure functions (tested directly) -------------------------------------------------------
def _pixel_mean(x: torch.Tensor, start: int) -> torch.Tensor:
    return x.flatten(start).mean(-1)


def kl_loss(z: torch.Tensor, z_hat: torch.Tensor, phi_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Eq. 19 / 25 per image: (1/t)·mean_pixels((Σ_m phi_m(t)(Z_m − Ẑ_m))²).

    ``z``, ``z_hat``: ``[B, M, C, H, W]``; ``phi_t``: ``[B, M]``; ``t``: ``[B]``. The squared norm is taken as a
    mean over pixels, as the baseline's MSE is, so that a zero network scores Σ phi²/t ≈ 1 in both.
    """
    residual = torch.einsum("bm,bm...->b...", phi_t.to(z.dtype), z - z_hat)
    return _pixel_mean(residual.square(), 1) / t.to(z.dtype)


def kl_partial_loss(z: torch.Tensor, z_hat: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Eq. 20 per image: (1/t)·Σ_j mean_pixels((Z_{m_j} − Ẑ_{m_j})²) over the M' selected terms ``[B, M', ...]``."""
    return _pixel_mean((z - z_hat).square(), 2).sum(1) / t.to(z.dtype)


# --- the method -------------------------------------------------------------------------------------------
class KLDiffusion(LatentSpace, EpsilonPDS, Method):
    """KL diffusion training (eq. 19, 20, 25) and sampling through the epsilon of eq. 24.

    M: terms of the truncated expansion; N: time grid t_k = k/N; partial: M' terms per image for eq. 20
    (1st variant only); variant: "1st" (one network, time index N(m−1)+k, M evaluations batched) or "2nd"
    (one evaluation of a network with M·C output channels). ``time_scale`` multiplies the time index fed to
    the network and ``correction`` is a fixed per-(m, t) output gain; both stay at their neutral values
    except when fine-tuning from a baseline (see ``init_from_baseline`` and docs/kl.md). With ``autoencoder``
    set, the expansion runs on that autoencoder's unit-std latents and every sample is decoded.
    """

    name = "kl"

    def __init__(self, M: int = 8, N: int = 20, partial: int | None = None, variant: str = "1st",
                 schedule="vp", time_scale: float = 1.0, correction: str = "none",
                 partial_normalized: bool = False, term_embedding: bool = False, autoencoder: str | None = None):
        if int(M) != M or M < 1:
            raise UserError(f"--kl-terms (M) must be a positive integer, got {M}")
        if int(N) != N or N < 1:
            raise UserError(f"--time-steps (N) must be a positive integer, got {N}")
        if variant not in VARIANTS:
            raise UserError(f"--kl-variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
        if partial is not None:
            if variant != "1st":
                raise UserError("--kl-partial applies to the 1st variant only (the 2nd makes one network call)")
            if int(partial) != partial or not 1 <= partial <= M:
                raise UserError(f"--kl-partial (M') must be an integer in [1, M={M}], got {partial}")
        if partial_normalized and partial is None:
            raise UserError("--kl-partial-normalized needs --kl-partial M' (it rescales the partial loss, eq. 20)")
        if term_embedding and variant != "1st":
            raise UserError("--kl-term-embedding applies to the 1st variant only (the 2nd has one output per term)")
        if term_embedding and correction != "none":
            raise UserError("--kl-term-embedding cannot fine-tune from a baseline (--init-from): the baseline has "
                            "no term embedding")
        if correction not in CORRECTIONS:
            raise UserError(f"KL correction must be one of {', '.join(CORRECTIONS)}, got {correction!r}")
        if not time_scale > 0:
            raise UserError(f"KL time_scale must be > 0, got {time_scale}")
        if isinstance(schedule, VPSchedule):
            self.schedule = schedule
        elif schedule == "vp":
            self.schedule = VPSchedule()
        elif isinstance(schedule, dict):
            self.schedule = VPSchedule(**schedule)
        else:
            # the KL expansion is derived for the continuous VP SDE (§3.1); a discrete table has no mu(t)
            raise UserError(f"KL diffusion needs the continuous VP schedule, got {schedule!r}")
        self.M, self.N, self.variant = int(M), int(N), variant
        self.partial = None if partial is None else int(partial)
        self.time_scale, self.correction = float(time_scale), correction
        self.partial_normalized = bool(partial_normalized)
        self.term_embedding = bool(term_embedding)
        self.alpha_bars = self.schedule.grid(self.N)  # float64 [N+1] for the samplers
        self.autoencoder_run = check_autoencoder_run(autoencoder) if autoencoder else None

    # --- configuration -----------------------------------------------------------------------------------
    def config(self) -> dict:
        sched = self.schedule.config()
        return {"M": self.M, "N": self.N, "partial": self.partial, "variant": self.variant,
                "schedule": "vp" if sched == VPSchedule().config() else sched,
                "time_scale": self.time_scale, "correction": self.correction,
                **({"partial_normalized": True} if self.partial_normalized else {}),
                **({"term_embedding": True} if self.term_embedding else {}),
                **({"autoencoder": self.autoencoder_run} if self.latent else {})}

    @staticmethod
    def add_arguments(group: argparse._ArgumentGroup) -> None:
        # --time-steps is shared with the baseline (default there: 1000; here: 20)
        group.add_argument("--kl-terms", type=int, default=8, help="KL: number M of expansion terms (default 8)")
        group.add_argument("--kl-partial", type=int, default=None,
                           help="KL: train with the partial loss (eq. 20) on M' random terms per image")
        group.add_argument("--kl-partial-normalized", action="store_true",
                           help="KL: divide the partial loss by its expected value for a zero network, M'·H_N "
                                "(H_N = Σ_k 1/k = N·E[1/t_k]), so that its scale matches eq. 19's (≈ 1)")
        group.add_argument("--kl-term-embedding", action="store_true",
                           help="KL 1st: condition on (time index k, learned embedding of m) added together, "
                                "instead of the single time index N(m−1)+k (an ablation)")
        group.add_argument("--kl-variant", choices=VARIANTS, default="1st",
                           help="KL: 1st = M batched evaluations per image; 2nd = one network with M·C outputs")
        group.add_argument("--kl-correction", choices=CORRECTIONS[1:], default="paper",
                           help="KL fine-tuning (--init-from): output correction, 'paper' = √t/Σphi_m(t) (§6.6), "
                                "'posterior' = √t·phi_m(t)/Σphi²(t) (see docs/kl.md)")
        add_autoencoder_argument(group)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "KLDiffusion":
        kwargs = dict(M=getattr(args, "kl_terms", 8), N=20 if getattr(args, "time_steps", None) is None else args.time_steps,
                      partial=getattr(args, "kl_partial", None), variant=getattr(args, "kl_variant", "1st"))
        if getattr(args, "kl_partial_normalized", False):
            kwargs["partial_normalized"] = True
        if getattr(args, "kl_term_embedding", False):
            kwargs["term_embedding"] = True
        if getattr(args, "autoencoder", None):
            kwargs["autoencoder"] = args.autoencoder
        init_from = getattr(args, "init_from", None)
        if init_from:
            # fix the fine-tuning parameterisation now, so that the run's config.yaml records it
            kwargs.update(fine_tune_settings(init_from, kwargs["N"], getattr(args, "kl_correction", "paper")))
        return cls(**kwargs)

    def output_channels(self, data_channels: int) -> int:
        return data_channels * (self.M if self.variant == "2nd" else 1)

    def build_networks(self, net_cfg: dict, image_shape) -> dict[str, nn.Module]:
        if not self.term_embedding:
            return super().build_networks(net_cfg, image_shape)
        # UNet2DModel adds a learned class embedding to its time embedding: one class per basis index m
        overrides = {**net_cfg.get("overrides", {}), "num_class_embeds": self.M}
        return super().build_networks({**net_cfg, "overrides": overrides}, image_shape)

    # --- forward process (eq. 16) ------------------------------------------------------------------------
    def _t(self, k: torch.Tensor, dtype) -> torch.Tensor:
        return k.to(dtype) / self.N

    def noised(self, x0: torch.Tensor, k: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x̃ = mu(t_k) x0 + sigma(t_k) Z'_{t_k} with Z' = Σ phi_m(t)/√t Z_m; ``z``: ``[B, M, C, H, W]``.

        Returns (x̃, Z')."""
        t = self._t(k, torch.float64)
        coef = (phi(t, self.M) / t.sqrt().unsqueeze(-1)).to(x0.dtype)
        z_prime = torch.einsum("bm,bm...->b...", coef, z)
        shape = (-1,) + (1,) * (x0.ndim - 1)
        mu = self.schedule.mu(t).to(x0.dtype).view(shape)
        sigma = self.schedule.sigma(t).to(x0.dtype).view(shape)
        return mu * x0 + sigma * z_prime, z_prime

    # --- network evaluation --------------------------------------------------------------------------------
    def gain(self, t: torch.Tensor) -> torch.Tensor | None:
        """Fixed output gain ``[B, M]`` of the fine-tuning correction (§6.6), None when there is none.

        paper:     √t / Σ_m phi_m(t)          (all terms equal; then Σ phi_m/√t · gain·ε = ε)
        posterior: √t·phi_m(t) / Σ_j phi_j(t)²  (each term is then E[Z_m | x̃] given the baseline's E[Z' | x̃];
                   also sums back to ε)
        """
        if self.correction == "none":
            return None
        t64 = t.to(torch.float64)
        p = phi(t64, self.M)
        if self.correction == "paper":
            g = (t64.sqrt() / p.sum(-1)).unsqueeze(-1).expand_as(p)
        else:
            g = t64.sqrt().unsqueeze(-1) * p / p.square().sum(-1, keepdim=True)
        return g

    def coefficients(self, net: nn.Module, x: torch.Tensor, k: torch.Tensor,
                     terms: torch.Tensor | None = None) -> torch.Tensor:
        """Predicted coefficients Ẑ_m(x, ·) for the 0-based term indices ``terms`` ``[B, M']`` (default: all M),
        shape ``[B, M', C, H, W]``. 1st variant: ONE batched call of size B·M' at time index N(m−1)+k (NOTE 2);
        2nd variant: one call of size B at time index k, output channels split into M groups."""
        B = x.shape[0]
        k = k.to(x.device).expand(B) if k.ndim == 0 else k.to(x.device)
        all_terms = terms is None
        if all_terms:
            terms = torch.arange(self.M, device=x.device).expand(B, self.M)
        Mp = terms.shape[1]
        if self.variant == "1st":
            x_rep = x.unsqueeze(1).expand(B, Mp, *x.shape[1:]).reshape(B * Mp, *x.shape[1:])
            if self.term_embedding:  # time index k for every term, the term m−1 as a separate label
                tau = k.view(B, 1).expand(B, Mp).reshape(-1).to(x.dtype) * self.time_scale
                out = net(x_rep, tau, terms.reshape(-1)).view(B, Mp, *x.shape[1:])
            else:
                tau = (self.N * terms + k.view(B, 1)).reshape(-1).to(x.dtype) * self.time_scale
                out = net(x_rep, tau).view(B, Mp, *x.shape[1:])
        else:
            full = net(x, k.to(x.dtype) * self.time_scale)
            if full.shape[1] != self.M * x.shape[1]:
                raise UserError(f"the 2nd KL variant needs a network with M·C = {self.M * x.shape[1]} output "
                                f"channels, this one has {full.shape[1]}")
            full = full.view(B, self.M, *x.shape[1:])
            out = full if all_terms else torch.gather(
                full, 1, terms.view(B, Mp, *([1] * (x.ndim - 1))).expand(B, Mp, *x.shape[1:]))
        g = self.gain(self._t(k, torch.float64))
        if g is not None:
            g = torch.gather(g, 1, terms.to(g.device)).to(out.dtype)
            out = out * g.view(B, Mp, *([1] * (x.ndim - 1)))
        return out

    # --- training ------------------------------------------------------------------------------------------
    def loss(self, net: nn.Module, x0: torch.Tensor, *, k: torch.Tensor | None = None, z: torch.Tensor | None = None,
             terms: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Mean over the batch of eq. 19 (full), eq. 20 (``partial``) or eq. 25 (2nd variant).

        ``k`` ``[B]`` in 1..N, ``z`` ``[B, M, C, H, W]`` and ``terms`` ``[B, M']`` may be given (tests);
        otherwise k ~ U{1..N}, Z_m ~ N(0, I) iid and, for the partial loss, M' distinct terms per image."""
        B, dev = x0.shape[0], x0.device
        if k is None:
            k = torch.randint(1, self.N + 1, (B,), device=dev, generator=generator)
        if z is None:
            z = torch.randn((B, self.M, *x0.shape[1:]), device=dev, dtype=x0.dtype, generator=generator)
        x_t, _ = self.noised(x0, k, z)
        t = self._t(k, torch.float64)
        if self.partial is None:
            z_hat = self.coefficients(net, x_t, k)
            return kl_loss(z, z_hat, phi(t, self.M), t).mean()
        if terms is None:
            terms = torch.rand((B, self.M), device=dev, generator=generator).argsort(1)[:, :self.partial]
        z_hat = self.coefficients(net, x_t, k, terms)
        z_sel = torch.gather(z, 1, terms.view(B, -1, *([1] * (x0.ndim - 1))).expand(-1, -1, *x0.shape[1:]))
        loss = kl_partial_loss(z_sel, z_hat, t).mean()
        return loss / self.partial_scale() if self.partial_normalized else loss

    def partial_scale(self) -> float:
        """E[eq. 20] for a network that outputs zeros: M'·E_k[1/t_k] = M'·H_N, k ~ U{1..N}, t_k = k/N
        (each selected term contributes E‖Z_m‖² = 1 per pixel); H_20 = 3.598, so M' = 4 gives 14.4."""
        return self.partial * sum(1.0 / k for k in range(1, self.N + 1))

    # --- sampling (eq. 24) ---------------------------------------------------------------------------------
    def epsilon(self, net: nn.Module, x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """ε̂(x, k) = (1/√t_k) Σ_m phi_m(t_k) Ẑ_m(x, k): the noise estimate any epsilon sampler consumes."""
        k = torch.as_tensor(k, device=x.device)
        k = k.expand(x.shape[0]) if k.ndim == 0 else k
        t = self._t(k, torch.float64)
        coef = (phi(t, self.M) / t.sqrt().unsqueeze(-1)).to(x.dtype)
        return torch.einsum("bm,bm...->b...", coef, self.coefficients(net, x, k))

    def sample(self, net: nn.Module, n: int, image_shape, *, generator=None, device=None, sampler: str = "ddim",
               steps: int = 20, eta: float = 1.0, progress: bool = True, clip_x0: bool = False, pds: bool = False,
               **pds_options) -> torch.Tensor:
        self.check_latent_options(clip_x0=clip_x0)
        x = sample_epsilon(lambda x, k: self.epsilon(net, x, k), (n, *self.data_shape(image_shape)),
                           self.alpha_bars, sampler=sampler, steps=steps, eta=eta, generator=generator,
                           device=device, progress=progress, clip_x0=clip_x0,
                           preconditioner=self.pds_preconditioner(image_shape, pds, **pds_options))
        return self.decode(x).clamp(-1, 1) if self.latent else x

    def sampler_options(self, args: argparse.Namespace) -> dict:
        options = super().sampler_options(args)
        self.check_latent_options(clip_x0=bool(options.get("clip_x0")))
        return options

    def nfe(self, sampler: str = "ddim", steps: int = 20, **_) -> int:
        """Network evaluations per image: the 1st variant evaluates M coefficients per step (one batched call,
        which the paper counts as one NFE); the 2nd evaluates one network per step."""
        per_step = self.M if self.variant == "1st" else 1
        return per_step * (self.N if sampler == "ddpm" else steps)

    # --- fine-tuning (§6.6) ----------------------------------------------------------------------------------
    def initialize(self, nets: dict[str, nn.Module], init_from: Path) -> None:
        """Start from a trained baseline run (its EMA weights) or a pretrained diffusers DDPM/DDIM pipeline folder:
        copy the epsilon network's weights into ``nets["net"]`` (§6.6)."""
        from diffaccel.pretrained import check_architecture, is_diffusers_folder

        if is_diffusers_folder(init_from):
            if self.latent:
                raise UserError("--init-from a diffusers pipeline gives a pixel model; a latent KL run fine-tunes "
                                "from a latent baseline run of the same --autoencoder")
            from diffaccel.nets.unet import DiffusersAdapter

            pre = _pretrained_vp(init_from)
            check_architecture(nets["net"], pre)
            init_from_baseline(self, nets["net"], DiffusersAdapter(pre.unet), pre.N)
            return
        from diffaccel.runs import load_run

        base_method, base_nets = load_run(Path(init_from), "cpu")
        if getattr(base_method, "autoencoder_run", None) != self.autoencoder_run:
            raise UserError(f"--init-from {init_from} trained on the latents of "
                            f"{getattr(base_method, 'autoencoder_run', None) or 'no autoencoder (pixels)'}, this run "
                            f"on those of {self.autoencoder_run or 'none (pixels)'}: both must use the same space")
        base_N = _baseline_steps(base_method, init_from)
        init_from_baseline(self, nets["net"], base_nets["net"], base_N)


# --- fine-tuning helpers ----------------------------------------------------------------------------------
def _baseline_steps(base_method, where) -> int:
    if getattr(base_method, "name", None) != "baseline" or not hasattr(base_method, "N"):
        raise UserError(f"--init-from {where} is not a baseline (epsilon-prediction) run")
    if getattr(base_method, "schedule", "vp") != "vp":
        raise UserError(f"--init-from {where} was trained with the {base_method.schedule!r} schedule; "
                        "KL diffusion fine-tunes only from the VP schedule")
    return int(base_method.N)


# DDPM's linear betas are the Euler steps of the continuous VP SDE, beta(t) = 0.1 + 19.9 t: over N = 1000 their
# alpha_bar differs from the continuous one by at most 8e-4, which this tolerance admits (docs/diffusers.md)
VP_TOLERANCE = 2e-3


def _pretrained_vp(path):
    """A pretrained diffusers epsilon pipeline whose schedule is the VP one on its own grid."""
    from diffaccel.pretrained import check_schedule, load_pretrained_epsilon

    pre = load_pretrained_epsilon(path)
    if pre.alpha_bars is None:
        raise UserError(f"KL --init-from {path}: a bare UNet folder carries no schedule; pass the pipeline folder "
                        "(with scheduler/) so that the number of timesteps and the schedule can be checked")
    check_schedule(pre, VPSchedule().grid(pre.N), "the VP schedule KL diffusion is derived for", VP_TOLERANCE)
    return pre


def fine_tune_settings(baseline_run, N: int, correction: str = "paper") -> dict:
    """Method kwargs for fine-tuning from ``baseline_run``: the network's time input is scaled by N_base/N so
    that the m = 1 block's index k means the same noise level t_k = k/N as the baseline's index k·N_base/N."""
    from diffaccel.pretrained import is_diffusers_folder
    from diffaccel.runs import load_run

    if is_diffusers_folder(baseline_run):
        return {"time_scale": _pretrained_vp(baseline_run).N / N, "correction": correction}
    base_method, _ = load_run(Path(baseline_run), "cpu")
    return {"time_scale": _baseline_steps(base_method, baseline_run) / N, "correction": correction}


@torch.no_grad()
def init_from_baseline(method: KLDiffusion, net: nn.Module, base_net: nn.Module, base_N: int) -> None:
    """§6.6 weight copying into ``net`` from a trained epsilon network ``base_net`` of the same architecture.

    1st variant: every weight copied. 2nd variant: every weight copied and the output layer's M·C channels
    filled with M copies of the baseline's C output channels (term-major, matching the [B, M, C] split).
    Sets ``method.time_scale = base_N / N`` and, if none is chosen, the paper's correction. With these, the
    2nd variant's ε̂ equals the baseline's ε exactly, and the 1st variant's m = 1 term equals gain·ε.
    """
    if method.correction == "none":
        method.correction = "paper"
    method.time_scale = base_N / method.N
    own, base = net.state_dict(), base_net.state_dict()
    if own.keys() != base.keys():
        raise UserError("--init-from: the baseline network has a different architecture "
                        "(use the same --net preset and overrides)")
    new = {}
    for key, value in base.items():
        target = own[key]
        if value.shape == target.shape:
            new[key] = value
        elif (method.variant == "2nd" and value.ndim >= 1 and target.shape[0] == method.M * value.shape[0]
              and target.shape[1:] == value.shape[1:]):
            new[key] = value.repeat(method.M, *([1] * (value.ndim - 1)))   # output conv: M copies, term-major
        else:
            raise UserError(f"--init-from: parameter {key} has shape {tuple(value.shape)} in the baseline "
                            f"but {tuple(target.shape)} here (use the same --net preset and overrides)")
    net.load_state_dict(new)
