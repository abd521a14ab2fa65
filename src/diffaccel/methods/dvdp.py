"""DVDP: dimensionality-varying diffusion (Zhang et al., "Dimensionality-Varying Diffusion Process", §4).

The image is split into nested orthogonal subspaces by 2×2 block averaging. With K turning points
T_1 < … < T_K, subspace i < K is the detail lost by the (i+1)-th halving of the resolution
(S_i / S_{i+1}) and subspace K is the coarsest, block-constant image. Every subspace i has its own signal
scale λ̄_{i,t} and noise std σ̄_{i,t}; detail subspace i fades fast enough that λ̄_{i,T_{i+1}} is small, and at
T_{i+1} the forward process drops it by down-sampling (eq. 8). The reverse process uses the per-subspace
DDPM posterior between turning points (eq. 10, in epsilon form) and, at each turning point, up-samples and
adds noise in the detail subspace only (eq. 11). Subspace diffusion (Jing et al.) is the special case where
every subspace shares one schedule (§4.4).

Attenuation schedule (the paper leaves it to its supplement): the coarsest subspace K follows DDPM's linear
schedule, λ̄_{K,t} = sqrt(alpha_bar_t); detail subspace i follows the same linear schedule with every beta
scaled by c_i ≥ 1, i.e. 1 − β_{i,t} = (1 − β_t)^{c_i}, so λ̄_{i,t} = λ̄_{K,t}^{c_i}, with c_i chosen so that
λ̄_{i,T_{i+1}} = lambda_at_turn. Every subspace is variance preserving, σ̄² = 1 − λ̄², so each one is an ordinary
linear-schedule DDPM run at its own speed, SNR_i(t) = λ̄²/σ̄² is strictly decreasing, and the coarse content,
which carries almost all of an image's energy, keeps DDPM's SNR exactly (plot: docs/dvdp_schedule.png).
"""

from __future__ import annotations

import argparse
import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from diffaccel.errors import UserError
from diffaccel.methods.base import Method, add_clip_x0_argument
from diffaccel.methods.latent import LatentSpace, add_autoencoder_argument, check_autoencoder_run
from diffaccel.schedules import linear_schedule


# --- the orthogonal decomposition (DESIGN.md §3.3) --------------------------------------------------------------
def down(x: torch.Tensor) -> torch.Tensor:
    """D: R^{C×H×W} → R^{C×H/2×W/2}, D(x) = 2·avgpool₂(x); its rows are orthonormal (D·Dᵀ = I)."""
    return 2 * F.avg_pool2d(x, 2)


def up(y: torch.Tensor) -> torch.Tensor:
    """Dᵀ: nearest-neighbour up-sampling divided by 2, so down(up(y)) == y and up(down(x)) = block-mean projection."""
    return F.interpolate(y, scale_factor=2, mode="nearest") / 2


def block_mean(x: torch.Tensor, levels: int) -> torch.Tensor:
    """Orthogonal projection onto images constant on 2^levels × 2^levels blocks (= (DᵀD)^levels composed)."""
    if levels == 0:
        return x
    f = 2**levels
    return F.avg_pool2d(x, f).repeat_interleave(f, dim=-2).repeat_interleave(f, dim=-1)


def subspace_components(x: torch.Tensor, level: int, K: int) -> list[torch.Tensor]:
    """Components of an image at resolution level ``level`` in the subspaces i = level..K (they sum to x)."""
    projections = [block_mean(x, j - level) for j in range(level, K + 1)] + [torch.zeros_like(x)]
    return [projections[m] - projections[m + 1] for m in range(K + 1 - level)]


def apply_per_subspace(x: torch.Tensor, level: int, coef: torch.Tensor) -> torch.Tensor:
    """Σ_{i ≥ level} coef_i · (component of x in subspace i), for an image at resolution level ``level``.

    ``coef`` is ``[K+1]`` (one value per subspace) or ``[B, K+1]`` (per image). Written as
    coef_level·x + Σ_{j>level} (coef_j − coef_{j−1})·P_j x, so it costs one pooling per coarser subspace.
    """
    coef = coef.to(device=x.device, dtype=x.dtype)
    if coef.ndim == 1:
        coef = coef.expand(x.shape[0], -1)
    view = (-1,) + (1,) * (x.ndim - 1)
    out = coef[:, level].view(view) * x
    for j in range(level + 1, coef.shape[1]):
        out = out + (coef[:, j] - coef[:, j - 1]).view(view) * block_mean(x, j - level)
    return out


# --- the attenuation schedule ----------------------------------------------------------------------------------
def attenuation_schedule(turning_points: Sequence[int], T: int, lambda_at_turn: float,
                         equal: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(λ̄, σ̄), each float64 ``[K+1, T+1]``: row i is subspace i, column t is time step t (λ̄[:, 0] = 1).

    Row K is DDPM's linear schedule; row i < K is the same schedule with its betas scaled by c_i so that
    λ̄_{i,T_{i+1}} = lambda_at_turn (c_i = 1 if the linear schedule is already that small there).
    ``equal=True`` gives every subspace row K (subspace diffusion).
    """
    log_lam = 0.5 * torch.log(linear_schedule(T))  # log λ̄_{K,t}
    rows = []
    for turn in turning_points:
        c = 1.0 if equal else max(1.0, math.log(lambda_at_turn) / log_lam[turn].item())
        rows.append(c * log_lam)
    rows.append(log_lam)
    log_lam = torch.stack(rows)
    # σ̄ = sqrt(1 − λ̄²) through expm1 so that σ̄ stays accurate near t = 0
    return log_lam.exp(), torch.sqrt(-torch.expm1(2 * log_lam))


def parse_turning_points(text: str) -> tuple[int, ...]:
    """``"300,600"`` → (300, 600); an argparse ``type`` (argparse reports the error and exits with status 2)."""
    parts = [p.strip() for p in text.split(",")]
    if text.strip() and not all(parts):  # "," or "300,,600": an empty entry is a typo, not "no turning point"
        raise argparse.ArgumentTypeError(f"empty entry in {text!r}; give comma-separated integers such as 300,600")
    try:
        return tuple(int(p) for p in parts if p)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated integers such as 300,600, got {text!r}") from None


def _add_once(group: argparse._ArgumentGroup, flag: str, **kwargs) -> None:
    # DVDP and subspace diffusion share their flags; argparse refuses a flag registered twice
    if flag not in group._option_string_actions:
        group.add_argument(flag, **kwargs)


def allocate(total: int, weights: Sequence[float], caps: Sequence[int] | None = None) -> list[int]:
    """``total`` split in proportion to ``weights`` by largest remainders, every part at least 1 and at most its cap
    (``caps``, default ``total``); needs len(weights) <= total <= sum(caps)."""
    caps = list(caps) if caps is not None else [total] * len(weights)
    exact = [total * w / sum(weights) for w in weights]
    counts = [min(c, max(1, int(e))) for e, c in zip(exact, caps)]
    order = sorted(range(len(exact)), key=lambda i: exact[i] - int(exact[i]), reverse=True)
    i = 0
    while sum(counts) < total:
        j = order[i % len(order)]
        if counts[j] < caps[j]:
            counts[j] += 1
        i += 1
    while sum(counts) > total:  # only when the max(1, ·) floors pushed the total over
        j = max(range(len(counts)), key=lambda m: counts[m])
        counts[j] -= 1
    return counts


class DVDP(LatentSpace, Method):
    """Dimensionality-varying diffusion with orthogonal attenuation; one fully convolutional network for all stages.

    Stage k holds the time steps t ∈ (T_k, T_{k+1}] (T_0 = 0, T_{K+1} = T) and works at resolution H/2^k.
    The network is called ``net(x_t^k, t)`` with the integer time step t as a float. With ``autoencoder`` set,
    the process runs on that autoencoder's unit-std latents (down/up average and repeat each latent channel) and
    every sample is decoded.
    """

    name = "dvdp"
    equal_schedules = False
    # DDIM steps per stage when unset: log-snr had the lower Fréchet distance at 10, 20 and 50 NFE on the exact-eps
    # Gaussian testbed fitted to MNIST-32 (docs/dvdp.md); for subspace diffusion uniform did (see below)
    default_step_allocation = "log-snr"

    def __init__(self, turning_points: Sequence[int] = (600,), T: int = 1000, lambda_at_turn: float = 1e-2,
                 autoencoder: str | None = None):
        self.autoencoder_run = check_autoencoder_run(autoencoder) if autoencoder else None
        T = int(T)
        if T < 2:
            raise UserError(f"the number of time steps T must be >= 2, got {T}")
        tps = tuple(int(p) for p in turning_points)
        if any(b <= a for a, b in zip(tps, tps[1:])):
            raise UserError(f"turning points must be strictly increasing, got {list(tps)}")
        if tps and not (0 < tps[0] and tps[-1] < T):
            raise UserError(f"turning points must lie strictly between 0 and T={T}, got {list(tps)}")
        if not 0 < lambda_at_turn < 1:
            raise UserError(f"--lambda-at-turn must be in (0, 1), got {lambda_at_turn}")
        self.turning_points, self.T, self.lambda_at_turn = tps, T, float(lambda_at_turn)
        self.K = len(tps)
        self.lam, self.sig = attenuation_schedule(tps, T, lambda_at_turn, equal=self.equal_schedules)
        self._bounds = (0, *tps, T)  # stage k is (bounds[k], bounds[k+1]]
        self._lengths = tuple(b - a for a, b in zip(self._bounds[:-1], self._bounds[1:]))  # time steps per stage

    # --- configuration -----------------------------------------------------------------------------------------
    def config(self) -> dict:
        return {"turning_points": list(self.turning_points), "T": self.T, "lambda_at_turn": self.lambda_at_turn,
                **self._latent_config()}

    def _latent_config(self) -> dict:
        return {"autoencoder": self.autoencoder_run} if self.latent else {}  # pixel configs stay as they were

    @staticmethod
    def add_arguments(group: argparse._ArgumentGroup) -> None:
        _add_once(group, "--turning-points", type=parse_turning_points, default=None,
                  help="dvdp/subspace: comma-separated dimensionality turning points in (0, T), e.g. 300,600 "
                       "(default 600); each one halves the resolution")
        _add_once(group, "--lambda-at-turn", type=float, default=1e-2,
                  help="dvdp: signal scale of a detail subspace at the turning point that drops it (default 1e-2)")
        add_autoencoder_argument(group)

    @staticmethod
    def add_sample_arguments(group: argparse._ArgumentGroup) -> None:
        from diffaccel.methods.pds import add_epsilon_pds_arguments

        if "--pds" not in group._option_string_actions:
            add_epsilon_pds_arguments(group)
        add_clip_x0_argument(group)
        _add_once(group, "--step-allocation", choices=("uniform", "log-snr"), default=None,
                  help="dvdp/subspace DDIM: steps per stage proportional to its length and even in t (uniform, "
                       "subspace's default), or even in the log-SNR of the stage's finest alive subspace (log-snr, "
                       "dvdp's default)")
        _add_once(group, "--stage-steps", type=parse_turning_points, default=None,
                  help="dvdp/subspace DDIM: explicit steps per stage, finest (full-resolution) stage first, e.g. "
                       "10,6,4; their sum is the NFE")

    def sampler_options(self, args: argparse.Namespace) -> dict:
        options = super().sampler_options(args)
        self.check_latent_options(clip_x0=bool(options.get("clip_x0")))
        if getattr(args, "pds", False):
            if getattr(args, "pds_filter", None):
                raise UserError(f"--pds-filter holds one resolution's filter; {self.name} builds one per stage from "
                                "its training data: drop --pds-filter")
            options.update(pds=True, pds_alpha=getattr(args, "pds_alpha", 5.0),
                           pds_space=bool(getattr(args, "pds_space", False)))
        elif getattr(args, "pds_space", False) or getattr(args, "pds_filter", None):
            raise UserError("--pds-space and --pds-filter need --pds")
        for key in ("step_allocation", "stage_steps"):
            if getattr(args, key, None) is not None:
                options[key] = getattr(args, key)
        if options.get("sampler") == "ddpm" and {"step_allocation", "stage_steps"} & set(options):
            raise UserError("--step-allocation and --stage-steps choose DDIM grids; --sampler ddpm visits every step")
        if "stage_steps" in options:
            if "steps" in options and options["steps"] != sum(options["stage_steps"]):
                raise UserError(f"--steps {options['steps']} disagrees with --stage-steps, whose sum is "
                                f"{sum(options['stage_steps'])}; give one of them")
            options["steps"] = sum(options["stage_steps"])
        return options

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "DVDP":
        time_steps = getattr(args, "time_steps", None)
        kwargs = {"T": 1000 if time_steps is None else time_steps}
        tps = getattr(args, "turning_points", None)
        kwargs["turning_points"] = (600,) if tps is None else tps
        if not cls.equal_schedules:
            kwargs["lambda_at_turn"] = getattr(args, "lambda_at_turn", 1e-2)
        return cls(**kwargs, autoencoder=getattr(args, "autoencoder", None))

    # --- shapes and stages -------------------------------------------------------------------------------------
    def check_image_size(self, height: int, width: int) -> None:
        f = 2**self.K
        if height % f or width % f:
            raise UserError(f"{self.K} turning points halve the resolution {self.K} times, which needs an image size "
                            f"divisible by {f}; got {height}×{width}")

    def build_networks(self, net_cfg: dict, image_shape: tuple[int, int, int]) -> dict[str, nn.Module]:
        image_shape = self.data_shape(image_shape)  # the latent's on an autoencoder
        self.check_image_size(image_shape[1], image_shape[2])
        nets = super().build_networks(net_cfg, image_shape)
        levels = len(nets["net"].config.block_out_channels)
        lowest = image_shape[1] // 2**self.K
        if lowest % 2 ** (levels - 1):
            raise UserError(f"too many turning points ({self.K}) for image size {image_shape[1]}: the lowest "
                            f"resolution {lowest} is not divisible by {2 ** (levels - 1)}, which the "
                            f"{levels}-level UNet needs")
        return nets

    def stage(self, t: torch.Tensor) -> torch.Tensor:
        """Stage k of each time step: the number of turning points strictly below t."""
        tps = torch.tensor(self.turning_points, dtype=torch.long, device=t.device)
        return torch.searchsorted(tps, t.long().contiguous(), right=False) if self.K else torch.zeros_like(t).long()

    # --- forward process (eq. 5–8) -----------------------------------------------------------------------------
    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """x_t^k = Σ_{i≥k} (λ̄_{i,t} v_i^k + σ̄_{i,t} z_i^k) with x_0^k = D^k x0 (eq. 6).

        ``x0`` is full resolution ``[B, C, H, W]``; every t of the batch must lie in one stage k; ``noise`` is a
        standard normal ε^k at that stage's resolution ``H/2^k`` (drawn when None). Returns x_t^k at that resolution.
        """
        t = torch.as_tensor(t, device=x0.device).long().reshape(-1).expand(x0.shape[0])
        stages = self.stage(t).unique()
        if len(stages) != 1:
            raise UserError(f"q_sample needs all time steps of a batch in one stage; got stages {stages.tolist()}")
        k = int(stages)
        self.check_image_size(x0.shape[-2], x0.shape[-1])
        x0k = x0
        for _ in range(k):
            x0k = down(x0k)
        if noise is None:
            noise = torch.randn(x0k.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        elif noise.shape != x0k.shape:
            raise UserError(f"noise for stage {k} must have shape {tuple(x0k.shape)}, got {tuple(noise.shape)}")
        lam = self.lam.T.to(x0.device)[t]  # [B, K+1]
        sig = self.sig.T.to(x0.device)[t]
        return apply_per_subspace(x0k, k, lam) + apply_per_subspace(noise, k, sig)

    def loss(self, net: nn.Module, x0: torch.Tensor) -> torch.Tensor:
        """Eq. 12 under t ~ U{1..T}, stratified by stage (``training_times``); each stage's group goes through the
        network once at its own resolution. Each image's loss is the mean squared error over its own pixels, and
        the batch loss their weighted sum."""
        self.check_image_size(x0.shape[-2], x0.shape[-1])
        B = x0.shape[0]
        t, weight = self.training_times(B, x0.device, x0.dtype)
        stages = self.stage(t)
        per_image = torch.empty(B, device=x0.device, dtype=x0.dtype)
        for k in stages.unique().tolist():
            idx = (stages == k).nonzero().squeeze(1)
            h = x0.shape[-2] // 2**k
            noise = torch.randn(len(idx), x0.shape[1], h, x0.shape[-1] // 2**k, device=x0.device, dtype=x0.dtype)
            xt = self.q_sample(x0[idx], t[idx], noise)
            err = (net(xt, t[idx].to(x0.dtype)) - noise) ** 2
            per_image = per_image.index_put((idx,), err.flatten(1).mean(1))
        return (per_image * weight).sum()

    def training_times(self, batch: int, device=None, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """t per image of a training batch and its weight in the batch loss, stratified by stage.

        Stage k gets its share p_k = (T_{k+1} − T_k)/T of the batch (largest remainders, at least one image), t is
        uniform within the stage and each image weighs p_k/n_k: the loss's expectation is eq. 12's under
        t ~ U{1..T}, with less variance. The fixed group sizes also keep the network's input shapes the same from
        step to step; on the CPU, group sizes drawn afresh each step made a MNIST-32 step (mini UNet, batch 32)
        about 35 % slower than the same two calls at fixed sizes. Batches smaller than the number of stages draw
        t ~ U{1..T} per image with weight 1/B.
        """
        if batch < self.K + 1:
            return (torch.randint(1, self.T + 1, (batch,), device=device),
                    torch.full((batch,), 1.0 / batch, device=device, dtype=dtype))
        lengths = self._lengths
        counts = allocate(batch, lengths)
        t = torch.cat([torch.randint(lo + 1, hi + 1, (n,), device=device)
                       for lo, hi, n in zip(self._bounds[:-1], self._bounds[1:], counts)])
        weight = torch.cat([torch.full((n,), length / self.T / n, device=device, dtype=dtype)
                            for length, n in zip(lengths, counts)])
        return t, weight

    # --- reverse process ---------------------------------------------------------------------------------------
    def log_snr(self, subspace: int, t: torch.Tensor) -> torch.Tensor:
        """log(λ̄²/σ̄²) of one subspace at integer times ``t`` (strictly decreasing in t)."""
        return 2 * (self.lam[subspace, t].log() - self.sig[subspace, t].log())

    def stage_counts(self, steps: int, step_allocation: str | None = None,
                     stage_steps: Sequence[int] | None = None) -> list[int]:
        """Steps per stage k = 0..K (stage 0 is the full-resolution one nearest the data); they sum to ``steps``.

        ``uniform``: proportional to each stage's length in t. ``log-snr``: proportional to the log-SNR span, over
        the stage, of its finest alive subspace k (from t = max(T_k, 1) to T_{k+1}), so the spacing is even in that
        log-SNR across the whole trajectory. ``stage_steps`` gives the counts explicitly (and overrides both).
        Largest remainders, each stage at least one step and at most its length.
        """
        lengths = self._lengths
        step_allocation = step_allocation or self.default_step_allocation
        if stage_steps is not None:
            counts = [int(c) for c in stage_steps]
            if len(counts) != self.K + 1:
                raise UserError(f"--stage-steps needs {self.K + 1} counts (one per stage, finest first), got {counts}")
            for k, (c, n) in enumerate(zip(counts, lengths)):
                if not 1 <= c <= n:
                    raise UserError(f"--stage-steps: stage {k} has {n} time steps and needs 1..{n} steps, got {c}")
            return counts
        if not self.K + 1 <= steps <= self.T:
            raise UserError(f"DDIM with {self.K} turning points needs between {self.K + 1} and {self.T} steps, "
                            f"got {steps}")
        if step_allocation == "uniform":
            weights = [float(n) for n in lengths]
        elif step_allocation == "log-snr":
            weights = [(self.log_snr(k, torch.tensor(max(self._bounds[k], 1)))
                        - self.log_snr(k, torch.tensor(self._bounds[k + 1]))).item() for k in range(self.K + 1)]
        else:
            raise UserError(f"unknown step allocation {step_allocation!r}; choose uniform or log-snr")
        return allocate(steps, weights, caps=lengths)

    def _log_snr_times(self, k: int, n: int) -> list[int]:
        """n + 1 descending integer times from T_{k+1} to T_k, even in the log-SNR of subspace k (distinct)."""
        lo, hi = self._bounds[k], self._bounds[k + 1]
        times = torch.arange(max(lo, 1), hi + 1)
        curve = self.log_snr(k, times)                                   # decreasing in t
        targets = torch.linspace(curve[-1].item(), curve[0].item(), n + 1)  # from t = hi down to t = max(lo, 1)
        # the time whose log-SNR is nearest each target, then forced strictly decreasing inside [lo, hi]
        idx = (curve[None, :] - targets[:, None]).abs().argmin(1)
        out = [hi]
        for j in range(1, n):
            t = min(int(times[idx[j]]), out[-1] - 1)
            out.append(max(t, lo + (n - j)))
        out.append(lo)
        return out

    def time_grid(self, sampler: str = "ddim", steps: int = 20, step_allocation: str | None = None,
                  stage_steps: Sequence[int] | None = None) -> list[list[int]]:
        """Per stage, from the last (coarsest) to the first: descending times [T_{k+1}, …, T_k].

        DDPM visits every integer time step. DDIM splits ``steps`` over the stages (``stage_counts``) so every
        turning point is on the grid; ``uniform`` spaces each stage's steps evenly in t, ``log-snr`` evenly in the
        log-SNR of the stage's finest alive subspace (``stage_steps`` alone keeps the uniform spacing).
        """
        lengths = self._lengths
        step_allocation = step_allocation or self.default_step_allocation
        if sampler == "ddpm":
            counts = lengths
        elif sampler == "ddim":
            counts = self.stage_counts(steps, step_allocation, stage_steps)
        else:
            raise UserError(f"unknown sampler {sampler!r} for dvdp; choose ddim or ddpm")
        grid = []
        for k in range(self.K, -1, -1):
            lo, n = self._bounds[k], counts[k]
            if sampler == "ddim" and step_allocation == "log-snr" and stage_steps is None:
                grid.append(self._log_snr_times(k, n))
            else:
                grid.append([round(lo + i * lengths[k] / n) for i in range(n, -1, -1)])
        return grid

    def step_coefficients(self, t: int, s: int, eta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-subspace (a, b, c) of x_s = a·x_t + b·ε̂ + c·z, the DDIM step (Song et al. eq. 12) run per subspace.

        a = λ̄_s/λ̄_t, c² = η²·Var[q(x_s | x_t, x_0)] = η² σ̄_s² (σ̄_t² − (λ̄_t/λ̄_s)² σ̄_s²)/σ̄_t², b = sqrt(σ̄_s² − c²) − a σ̄_t.
        With s = t − 1 and η = 1 this is the DDPM posterior x_t/α_t − β_t/(α_t σ̄_t)·ε̂ + noise (eq. 10 in epsilon
        form); it never divides by a small λ̄ except through the bounded ratio λ̄_s/λ̄_t.
        """
        lt, ls, st, ss = self.lam[:, t], self.lam[:, s], self.sig[:, t], self.sig[:, s]
        a = ls / lt
        var = (ss**2 * (st**2 - (lt / ls) ** 2 * ss**2) / st**2).clamp(min=0)
        c = eta * var.sqrt()
        b = (ss**2 - c**2).clamp(min=0).sqrt() - a * st
        return a, b, c

    def preconditioned_step(self, x: torch.Tensor, eps: torch.Tensor, t: int, s: int, level: int, eta: float,
                            preconditioner, generator: torch.Generator | None = None) -> torch.Tensor:
        """The DDIM step with its stochastic part preconditioned by M (the VP extension of PDS, docs/pds.md, run
        per subspace).

        Per subspace the step x_s = a·x + b·ε̂ + c·z splits into the η = 0 step a·x + b₀·ε̂ (b₀ = σ̄_s − a·σ̄_t)
        and a Langevin step −d·ε̂ + c·z, d = σ̄_s − sqrt(σ̄_s² − c²) = b₀ − b, on the score −ε̂/σ̄_t with step size
        δ = d·σ̄_t. With the per-subspace scale r = √δ the preconditioned Langevin step is
        −r·M·Mᵀ·(r·ε̂/σ̄_t) + c·M·z (r and c applied per subspace, M a stage filter); M = I gives the plain step.
        """
        a, b, c = self.step_coefficients(t, s, eta)
        st, ss = self.sig[:, t], self.sig[:, s]
        b0 = ss - a * st
        x = apply_per_subspace(x, level, a) + apply_per_subspace(eps, level, b0)
        if eta == 0:
            return x
        r = ((b0 - b).clamp(min=0) * st).sqrt()
        drift = apply_per_subspace(preconditioner.apply_gram(apply_per_subspace(eps, level, r / st)), level, r)
        z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return x - drift + apply_per_subspace(preconditioner.apply(z), level, c)

    def stage_preconditioners(self, image_shape, alpha: float = 5.0, use_space: bool = False, n_images: int = 200):
        """One PDS preconditioner per stage, full resolution first: the filters of the run's training images (their
        latents on an autoencoder) averaged down to each stage's resolution."""
        from diffaccel.data import load_dataset
        from diffaccel.methods.pds import build_preconditioner, representative_images
        from diffaccel.runs import read_config

        if getattr(self, "run_dir", None) is None:
            raise UserError(f"--pds on {self.name} needs the run directory, whose training data give its filters")
        key = (tuple(image_shape), alpha, use_space, n_images)
        cache = self.__dict__.setdefault("_stage_preconditioners", {})  # built once per run, not at every sampling
        if key in cache:
            return cache[key]
        train = read_config(self.run_dir)["train"]
        images = self.to_diffusion_space(representative_images(
            load_dataset(train["data"], train.get("resolution"), train.get("channels")), n_images))
        out = [build_preconditioner(F.avg_pool2d(images, 2**k) if k else images, alpha=alpha, use_space=use_space)
               for k in range(self.K + 1)]
        C, H, W = self.data_shape(image_shape)
        for k, pre in enumerate(out):
            pre.check_shape((C, H // 2**k, W // 2**k))
        cache[key] = out
        return out

    def jump(self, x: torch.Tensor, turn_index: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Eq. 11 at T_k (k = turn_index + 1): x^{k−1} = Dᵀx^k + σ̄_{k−1,T_k}·(I − P)ε, noise in the detail subspace only."""
        i = turn_index
        xu = up(x)
        eps = torch.randn(xu.shape, generator=generator, device=x.device, dtype=x.dtype)
        detail = eps - block_mean(eps, 1)
        return xu + self.sig[i, self.turning_points[i]].item() * detail

    def clipped_epsilon(self, x: torch.Tensor, eps: torch.Tensor, t: int, level: int) -> torch.Tensor:
        """The ε whose predicted x0 is clipped to the data range, per subspace (DDPM's ``clip_denoised`` for DVDP).

        x̂0 = Σ_i P_i (x − σ̄_{i,t} ε̂)/λ̄_{i,t} is an image of D^level x0, whose pixels lie in ±2^level when the
        data lie in [-1, 1] (D = 2·avgpool); the returned ε' = Σ_i P_i (x − λ̄_{i,t} clip(x̂0))/σ̄_{i,t}.
        """
        lam, sig = self.lam[:, t], self.sig[:, t]
        bound = 2.0**level
        x0 = (apply_per_subspace(x, level, 1 / lam) - apply_per_subspace(eps, level, sig / lam)).clamp(-bound, bound)
        return apply_per_subspace(x - apply_per_subspace(x0, level, lam), level, 1 / sig)

    @torch.no_grad()
    def sample(self, net: nn.Module, n: int, image_shape, *, generator: torch.Generator | None = None, device=None,
               sampler: str = "ddim", steps: int = 20, eta: float = 1.0, progress: bool = True,
               clip_x0: bool = False, step_allocation: str | None = None,
               stage_steps: Sequence[int] | None = None, pds: bool = False, pds_alpha: float = 5.0,
               pds_space: bool = False, preconditioners=None) -> torch.Tensor:
        """Start from N(0, I) at resolution H/2^K, run each stage's per-subspace steps and jump at every turning point.

        ``sampler="ddpm"`` takes all T ancestral steps (η = 1); ``"ddim"`` takes ``steps`` steps with the given η.
        ``clip_x0`` clips each predicted x0 to the data range (see ``clipped_epsilon``); ``step_allocation`` and
        ``stage_steps`` choose DDIM's steps per stage (see ``time_grid``). ``pds`` preconditions the stochastic
        part of every DDIM step with the stage's own PDS filter (``stage_preconditioners``; ``preconditioners``
        passes them, one per stage, full resolution first).
        """
        self.check_latent_options(clip_x0=clip_x0)
        C, H, W = self.data_shape(image_shape)
        self.check_image_size(H, W)
        if pds or preconditioners is not None:
            if sampler != "ddim" or clip_x0:
                raise UserError(f"--pds on {self.name} works with --sampler ddim (any eta) and without --clip-x0")
            if preconditioners is None:
                preconditioners = self.stage_preconditioners(image_shape, pds_alpha, pds_space)
            preconditioners = [p.to(device) if device is not None else p for p in preconditioners]
        if sampler == "ddpm":
            eta = 1.0
        grid = self.time_grid(sampler, steps, step_allocation, stage_steps)
        f = 2**self.K
        x = torch.randn((n, C, H // f, W // f), generator=generator, device=device)
        bar = tqdm(total=sum(len(g) - 1 for g in grid), desc=f"{self.name} {sampler}", disable=not progress,
                   leave=False)
        for stage_pos, times in enumerate(grid):
            k = self.K - stage_pos
            for t, s in zip(times[:-1], times[1:]):
                eps = net(x, torch.full((n,), float(t), device=x.device))
                if clip_x0:
                    eps = self.clipped_epsilon(x, eps, t, k)
                a, b, c = self.step_coefficients(t, s, eta)
                if preconditioners is None:
                    x = apply_per_subspace(x, k, a) + apply_per_subspace(eps, k, b)
                    if eta > 0:
                        z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
                        x = x + apply_per_subspace(z, k, c)
                else:
                    x = self.preconditioned_step(x, eps, t, s, k, eta, preconditioners[k], generator)
                bar.update()
            if k > 0:
                x = self.jump(x, k - 1, generator)
        bar.close()
        return self.decode(x).clamp(-1, 1) if self.latent else x

    def nfe(self, sampler: str = "ddim", steps: int = 20, stage_steps: Sequence[int] | None = None, **_) -> int:
        if sampler == "ddpm":
            return self.T
        return sum(stage_steps) if stage_steps is not None else steps

    def relative_cost(self, sampler: str = "ddim", steps: int = 20, step_allocation: str | None = None,
                      stage_steps: Sequence[int] | None = None, **_) -> float:
        """Network evaluations weighted by pixel count, in full-resolution evaluations (a DDPM of the same NFE = NFE)."""
        grid = self.time_grid(sampler, steps, step_allocation, stage_steps)
        return sum((len(times) - 1) / 4 ** (self.K - pos) for pos, times in enumerate(grid))


class StageNetworks(nn.Module):
    """One network per stage behind a single ``net(x_t^k, t)``: each time step goes to its stage's network, so the
    trainer, EMA, checkpoints and samplers see one module (Jing et al. train one model per subspace)."""

    def __init__(self, nets: Sequence[nn.Module], turning_points: Sequence[int]):
        super().__init__()
        if len(nets) != len(turning_points) + 1:
            raise UserError(f"{len(turning_points)} turning points need {len(turning_points) + 1} stage networks, "
                            f"got {len(nets)}")
        self.stages = nn.ModuleList(nets)
        self.turning_points = tuple(int(p) for p in turning_points)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        tps = torch.tensor(self.turning_points, dtype=torch.long, device=t.device)
        stage = torch.searchsorted(tps, t.round().long().contiguous(), right=False)
        if len(stage.unique()) == 1:
            return self.stages[int(stage[0])](x, t)
        out = None
        for k in stage.unique().tolist():
            idx = (stage == k).nonzero().squeeze(1)
            y = self.stages[k](x[idx], t[idx])
            out = y.new_empty((x.shape[0], *y.shape[1:])) if out is None else out
            out[idx] = y
        return out


class SubspaceDiffusion(DVDP):
    """Subspace diffusion (Jing et al. 2022) on discrete time steps: DVDP with one shared schedule for all subspaces.

    Every subspace follows DDPM's linear schedule, so the data component λ̄_{T_k}·v dropped at each turning point is
    not small (λ̄ ≈ 0.16 at t = 600). ``jump="fitted"`` (Jing et al.) refills the dropped detail subspace with its
    marginal variance ᾱ·v + (1 − ᾱ), v = ``detail_variance`` fitted to the training data when training starts and
    stored in the config; ``jump="noise"`` adds the noise part 1 − ᾱ only (DVDP's eq. 11, and what runs whose config
    predates the fitted jump rebuild to).
    """

    name = "subspace"
    equal_schedules = True
    default_step_allocation = "uniform"
    JUMPS = ("fitted", "noise")
    NETWORKS = ("shared", "per-stage")
    fitted_settings = ("detail_variance",)

    def __init__(self, turning_points: Sequence[int] = (600,), T: int = 1000, jump: str = "noise",
                 detail_variance: Sequence[float] | None = None, networks: str = "shared",
                 autoencoder: str | None = None):
        super().__init__(turning_points=turning_points, T=T, lambda_at_turn=0.5, autoencoder=autoencoder)
        if networks not in self.NETWORKS:
            raise UserError(f"subspace networks must be one of {', '.join(self.NETWORKS)}, got {networks!r}")
        self.networks = networks
        if jump not in self.JUMPS:
            raise UserError(f"subspace jump must be one of {', '.join(self.JUMPS)}, got {jump!r}")
        if jump == "noise" and detail_variance is not None:
            raise UserError("detail_variance is used only by the fitted subspace jump; drop it or use jump='fitted'")
        self.jump_kind = jump
        self.detail_variance = None if detail_variance is None else self._checked_variance(detail_variance)

    def _checked_variance(self, values) -> tuple[float, ...]:
        try:
            dv = tuple(float(v) for v in values)
        except (TypeError, ValueError):
            raise UserError(f"detail_variance needs {self.K} numbers (one per turning point), got {values!r}") from None
        if len(dv) != self.K or not all(math.isfinite(v) and v >= 0 for v in dv):
            raise UserError(f"detail_variance needs {self.K} finite values >= 0 (one per turning point), got {list(dv)}")
        return dv

    def config(self) -> dict:
        cfg = {"turning_points": list(self.turning_points), "T": self.T}
        if self.jump_kind != "noise":
            cfg["jump"] = self.jump_kind
        if self.detail_variance is not None:
            cfg["detail_variance"] = list(self.detail_variance)
        if self.networks != "shared":
            cfg["networks"] = self.networks
        return {**cfg, **self._latent_config()}

    @staticmethod
    def add_arguments(group: argparse._ArgumentGroup) -> None:
        DVDP.add_arguments(group)
        _add_once(group, "--subspace-jump", choices=SubspaceDiffusion.JUMPS, default="fitted",
                  help="subspace: at each turning point refill the dropped detail subspace with its forward marginal "
                       "variance, the data's detail variance fitted when training starts (fitted, Jing et al.; "
                       "default) or with noise only (noise)")
        _add_once(group, "--subspace-networks", choices=SubspaceDiffusion.NETWORKS, default="shared",
                  help="subspace: one network for every stage (shared, default) or one per stage at its own "
                       "resolution (per-stage, Jing et al.'s setting; such runs do not export to diffusers)")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "SubspaceDiffusion":
        time_steps = getattr(args, "time_steps", None)
        tps = getattr(args, "turning_points", None)
        jump = getattr(args, "subspace_jump", None) or "fitted"
        networks = getattr(args, "subspace_networks", None) or "shared"
        return cls(turning_points=(600,) if tps is None else tps, T=1000 if time_steps is None else time_steps,
                   jump=jump, networks=networks, autoencoder=getattr(args, "autoencoder", None))

    def build_networks(self, net_cfg: dict, image_shape: tuple[int, int, int]) -> dict[str, nn.Module]:
        nets = super().build_networks(net_cfg, image_shape)          # checks every stage's resolution
        if self.networks == "shared":
            return nets
        C, H, W = self.data_shape(image_shape)
        stages = [nets["net"]] + [Method.build_networks(self, net_cfg, (C, H // 2**k, W // 2**k))["net"]
                                  for k in range(1, self.K + 1)]
        return {"net": StageNetworks(stages, self.turning_points)}

    def prepare(self, dataset, device):
        dataset = super().prepare(dataset, device)  # the scaled latents on an autoencoder: the jump fits on them
        if self.jump_kind == "fitted" and self.detail_variance is None:
            images = dataset.images[: 10_000]             # plenty for one variance per turning point
            self.fit_detail_variance(dataset.to_model_space(images))
        return dataset

    def adopt_fitted(self, saved: dict) -> None:
        if self.jump_kind == "fitted" and "detail_variance" in saved:  # a noise jump stays a mismatch to report
            self.detail_variance = self._checked_variance(saved["detail_variance"])

    def fit_detail_variance(self, x0: torch.Tensor) -> tuple[float, ...]:
        """Per turning point T_{i+1}: the data's variance per dimension in the detail subspace dropped there.

        That subspace lives at resolution level i (x0^i = D^i x0); its dimension is 3/4 of the level's pixels.
        Jing et al. model the discarded component as isotropic, so one number per turning point is the fit.
        Sets ``detail_variance`` and switches the jump to ``fitted``.
        """
        if x0.ndim != 4 or x0.shape[0] < 2:
            raise UserError(f"fit_detail_variance needs images [n>=2, C, H, W], got {tuple(x0.shape)}")
        if not torch.isfinite(x0).all():
            raise UserError("fit_detail_variance: images contain NaN or inf")
        self.check_image_size(x0.shape[-2], x0.shape[-1])
        out, xi = [], x0.double()
        for _ in range(self.K):
            detail = xi - block_mean(xi, 1)
            centred = detail - detail.mean(0, keepdim=True)
            dims = detail[0].numel() * 3 / 4
            out.append(float(centred.pow(2).sum() / (x0.shape[0] - 1) / dims))
            xi = down(xi)
        self.jump_kind, self.detail_variance = "fitted", tuple(out)
        return self.detail_variance

    def jump_std(self, turn_index: int) -> float:
        """Std of the noise the jump at T_{turn_index+1} puts in the dropped detail subspace."""
        i, tp = turn_index, self.turning_points[turn_index]
        var = self.sig[i, tp].item() ** 2
        if self.jump_kind == "fitted":
            if self.detail_variance is None:
                raise UserError("the fitted subspace jump needs the data's detail variance: train first (it is "
                                "fitted when training starts) or call fit_detail_variance")
            var += self.lam[i, tp].item() ** 2 * self.detail_variance[i]
        return math.sqrt(var)

    def jump(self, x: torch.Tensor, turn_index: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Jing et al.'s jump: x^{k−1} = Dᵀx^k + s·(I − P)ε with s² the marginal variance of the discarded component
        at T_k, ᾱ·v + (1 − ᾱ) (v = ``detail_variance``): the data signal λ̄·v_data is not small on DDPM's schedule
        (λ̄ ≈ 0.16 at t = 600), so noise alone (s² = 1 − ᾱ, ``jump="noise"``) under-fills the detail subspace."""
        std = self.jump_std(turn_index)
        xu = up(x)
        eps = torch.randn(xu.shape, generator=generator, device=x.device, dtype=x.dtype)
        return xu + std * (eps - block_mean(eps, 1))
