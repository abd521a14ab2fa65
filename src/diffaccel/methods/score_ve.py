"""Score-based generative model with the VE SDE (SMLD / NCSN++ VE of Song et al. 2021), samplable with PDS.

Conventions (as score_sde's VE models):
- the model works on data in [0, 1] (``y = (x + 1) / 2``); ``sample`` returns images in [-1, 1];
- noise levels are geometric from ``sigma_min = 0.01`` to ``sigma_max``; by default ``sigma_max`` is the largest
  Euclidean distance between two training images in [0, 1] (Song & Ermon 2020, technique 1, the rule score_sde's
  configs follow: 50 for CIFAR-10, 348/378 for 256² LSUN/CelebA-HQ);
- training draws σ log-uniformly in [sigma_min, sigma_max] (continuous time t ∈ [0, 1], σ(t) = σ_min (σ_max/σ_min)^t)
  and minimises the σ²-weighted denoising score-matching loss E‖σ·s(y + σz, σ) + z‖²;
- the network gets the noise-level embedding ``c(σ) = 999 · ln(σ/σ_min) / ln(σ_max/σ_min)`` (= 999·t, the range the
  UNet's sinusoidal time embedding is built for), its input scaled by 1/√(σ² + 1/4) so that every noise level
  reaches it at unit scale (a choice of this project, not score_sde's), and its output is divided by σ
  (score_sde's ``scale_by_sigma``): score = net(c_in·y, c(σ)) / σ.
"""

from __future__ import annotations

import argparse
import math

import torch
from torch import nn

from diffaccel.errors import UserError
from diffaccel.methods.base import Method
from diffaccel.methods.latent import LatentSpace, add_autoencoder_argument, check_autoencoder_run

SIGMA_DATA = 0.5  # scale of [0, 1] data used only for the input scaling
SAMPLERS = ("pc", "ald")  # predictor-corrector (Song et al. 2021), annealed Langevin dynamics (NCSN)


def max_pairwise_distance(images: torch.Tensor, chunk: int = 1024) -> float:
    """Largest Euclidean distance between two images of a batch (computed in chunks of rows, float64)."""
    flat = images.reshape(images.shape[0], -1).double()
    best = 0.0
    for start in range(0, flat.shape[0], chunk):
        best = max(best, torch.cdist(flat[start:start + chunk], flat).max().item())
    return best


def sigma_max_from_data(dataset_images: torch.Tensor) -> float:
    """score_sde's rule: sigma_max = max pairwise Euclidean distance of the training images in [0, 1]."""
    images = dataset_images.double() / 255.0 if dataset_images.dtype == torch.uint8 else (dataset_images.double() + 1) / 2
    return max_pairwise_distance(images)


class ScoreVE(LatentSpace, Method):
    """VE score model; ``sample(sampler="pc" | "ald", steps=N, predictor=…, snr=…, pds=…)``.

    With ``autoencoder`` set, the score model runs on that autoencoder's unit-std latents z (as y = (z + 1)/2, the
    same affine map as pixels), sigma_max comes from the latents, a PDS filter from the latents' spectrum, and
    every sample is decoded."""

    name = "score-ve"

    def __init__(self, sigma_min: float = 0.01, sigma_max: float | None = None, num_scales: int = 1000,
                 data: str | None = None, resolution: int | None = None, channels: int | None = None,
                 autoencoder: str | None = None):
        if num_scales < 1:
            raise UserError(f"--num-scales must be >= 1, got {num_scales}")
        if sigma_max is not None and not 0 < sigma_min < sigma_max:
            raise UserError(f"--sigma-max must exceed sigma_min = {sigma_min} (need 0 < sigma_min < sigma_max), got {sigma_max}")
        self.sigma_min, self.sigma_max, self.num_scales = float(sigma_min), sigma_max, int(num_scales)
        # the data spec is kept so that PDS can build its filters from the training data at sampling time
        self.data, self.resolution, self.channels = data, resolution, channels
        self.autoencoder_run = check_autoencoder_run(autoencoder) if autoencoder else None
        self._pds_cache: dict = {}

    # --- configuration -------------------------------------------------------------------------------------
    def config(self) -> dict:
        return {"sigma_min": self.sigma_min, "sigma_max": self.sigma_max, "num_scales": self.num_scales,
                "data": self.data, "resolution": self.resolution, "channels": self.channels,
                **({"autoencoder": self.autoencoder_run} if self.latent else {})}

    @staticmethod
    def add_arguments(group: argparse._ArgumentGroup) -> None:
        group.add_argument("--sigma-max", type=float, default=None,
                           help="score-ve: largest noise level (default: max pairwise distance of the training "
                                "images in [0, 1], as score_sde recommends)")
        group.add_argument("--num-scales", type=int, default=1000,
                           help="score-ve: number of noise levels of the full sampler (score_sde: 1000)")
        add_autoencoder_argument(group)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "ScoreVE":
        data, resolution, channels = (getattr(args, k, None) for k in ("data", "resolution", "channels"))
        sigma_max = getattr(args, "sigma_max", None)
        method = cls(sigma_max=sigma_max, data=data, resolution=resolution, channels=channels,
                     num_scales=1000 if getattr(args, "num_scales", None) is None else args.num_scales,
                     autoencoder=getattr(args, "autoencoder", None))
        if sigma_max is None and data is not None:
            # decided here (not in prepare) so that the method's config is known before a resumed run is checked
            from diffaccel.data import load_dataset

            dataset = load_dataset(data, resolution, channels, limit=getattr(args, "data_limit", None))
            # on an autoencoder, of the scaled latents (encoded once, cached in the autoencoder run for training)
            method.sigma_max = sigma_max_from_data(LatentSpace.prepare(method, dataset, "cpu").images)
        return method

    def prepare(self, dataset, device):
        if self.data is None:
            self.data = getattr(dataset, "name", None)
        dataset = super().prepare(dataset, device)  # the scaled latents on an autoencoder
        if self.sigma_max is None:
            self.sigma_max = sigma_max_from_data(dataset.images)
        return dataset

    def _need_sigma_max(self) -> float:
        if self.sigma_max is None:
            raise UserError("score-ve: sigma_max is unknown; train first (it is computed from the data) "
                            "or pass --sigma-max")
        return float(self.sigma_max)

    # --- the score ------------------------------------------------------------------------------------------
    def noise_embedding(self, sigma: torch.Tensor) -> torch.Tensor:
        """c(σ) = 999·ln(σ/σ_min)/ln(σ_max/σ_min): the VE time t scaled to the UNet's time-embedding range."""
        return 999.0 * torch.log(sigma / self.sigma_min) / math.log(self._need_sigma_max() / self.sigma_min)

    def score(self, net: nn.Module, y: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """∇_y log p_σ(y) for y in model space [0, 1] + noise; ``sigma`` float [B]."""
        s = sigma.to(y.dtype).view(-1, *([1] * (y.ndim - 1)))
        c_in = 1.0 / torch.sqrt(s ** 2 + SIGMA_DATA ** 2)
        return net(c_in * y, self.noise_embedding(sigma.to(y.dtype))) / s

    def loss(self, net: nn.Module, x0: torch.Tensor) -> torch.Tensor:
        y0 = (x0 + 1) / 2
        sigma_max = self._need_sigma_max()
        t = torch.rand(x0.shape[0], device=x0.device, dtype=x0.dtype)
        sigma = self.sigma_min * (sigma_max / self.sigma_min) ** t
        z = torch.randn_like(y0)
        s = sigma.view(-1, *([1] * (y0.ndim - 1)))
        score = self.score(net, y0 + s * z, sigma)
        # λ(σ) = σ²: σ²‖s + z/σ‖² = ‖σ·s + z‖², averaged over pixels and batch
        return (s * score + z).square().mean()

    # --- sampling -------------------------------------------------------------------------------------------
    def preconditioner(self, image_shape, *, pds_alpha: float = 5.0, pds_space: bool = False,
                       pds_filter: str | None = None, pds_images: int = 200, device=None):
        """The PDS preconditioner from a filter file or from ``pds_images`` training images (cached)."""
        from diffaccel.methods.pds import build_preconditioner, representative_images

        key = (tuple(image_shape), pds_alpha, pds_space, pds_filter, pds_images)
        if key not in self._pds_cache:
            images = None
            if pds_filter is None:
                if self.data is None:
                    raise UserError("--pds needs --pds-filter FILE (this run does not record its training data)")
                from diffaccel.data import load_dataset

                dataset = load_dataset(self.data, resolution=self.resolution, channels=self.channels)
                images = self.to_diffusion_space(representative_images(dataset, pds_images))
            pre = build_preconditioner(images, alpha=pds_alpha, use_space=pds_space, filter_file=pds_filter)
            pre.check_shape(self.data_shape(image_shape))
            self._pds_cache[key] = pre
        pre = self._pds_cache[key]
        return pre.to(device) if device is not None else pre

    def sample(self, net: nn.Module, n: int, image_shape, *, generator=None, device=None, sampler: str = "pc",
               steps: int | None = None, predictor: str = "reverse-diffusion", snr: float = 0.16,
               corrector_steps: int = 1, step_lr: float = 2e-5, steps_each: int = 1, pds: bool = False,
               pds_alpha: float = 5.0, pds_space: bool = False, pds_filter: str | None = None,
               pds_safeguard: bool = True, preconditioner=None, progress: bool = True, **_) -> torch.Tensor:
        """``steps`` iterations (default ``num_scales``) of the PC sampler (``predictor`` reverse-diffusion,
        ancestral or none, ``corrector_steps`` Langevin steps per level, 0 = predictor only) or of annealed
        Langevin (``step_lr``, ``steps_each``), optionally with PDS (``pds=True`` builds the preconditioner from
        data / ``pds_filter``; ``preconditioner`` passes one; ``pds_safeguard`` limits its steps, docs/pds.md)."""
        from diffaccel.samplers_score import ald_sampler, pc_sampler, ve_sigmas

        self._check_sampler(sampler, predictor, corrector_steps, snr, step_lr, steps_each)
        steps = self.num_scales if steps is None else int(steps)
        sigmas = ve_sigmas(self.sigma_min, self._need_sigma_max(), steps)
        device = device if device is not None else next(net.parameters()).device
        if preconditioner is None and pds:
            preconditioner = self.preconditioner(image_shape, pds_alpha=pds_alpha, pds_space=pds_space,
                                                 pds_filter=pds_filter, device=device)
        elif preconditioner is not None:
            preconditioner = preconditioner.to(device)
        shape = (n, *self.data_shape(image_shape))

        def score_fn(y, sigma):
            return self.score(net, y, sigma)

        common = dict(preconditioner=preconditioner, safeguard=pds_safeguard, generator=generator, device=device,
                      progress=progress)
        if sampler == "pc":
            y = pc_sampler(score_fn, shape, sigmas, snr=snr, corrector_steps=corrector_steps, predictor=predictor,
                           **common)
        else:
            y = ald_sampler(score_fn, shape, sigmas, steps_each=steps_each, step_lr=step_lr, **common)
        return (self.decode(2 * y - 1) if self.latent else 2 * y - 1).clamp(-1, 1)

    @staticmethod
    def _check_sampler(sampler, predictor="reverse-diffusion", corrector_steps=1, snr=0.16, step_lr=2e-5,
                       steps_each=1) -> None:
        from diffaccel.samplers_score import check_pc_options

        if sampler not in SAMPLERS:
            raise UserError(f"unknown sampler {sampler!r} for score-ve; choose {' or '.join(SAMPLERS)}")
        if sampler == "pc":
            check_pc_options(predictor, corrector_steps, snr)
        elif int(steps_each) != steps_each or steps_each < 1 or not (step_lr > 0 and math.isfinite(step_lr)):
            raise UserError(f"annealed Langevin needs --steps-each >= 1 and a finite --step-lr > 0, got {steps_each} "
                            f"and {step_lr}")

    def nfe(self, sampler: str = "pc", steps: int | None = None, predictor: str = "reverse-diffusion",
            corrector_steps: int = 1, steps_each: int = 1, **_) -> int:
        from diffaccel.samplers_score import pc_nfe

        self._check_sampler(sampler, predictor, corrector_steps, steps_each=steps_each)
        steps = self.num_scales if steps is None else int(steps)
        if sampler == "pc":
            return pc_nfe(steps, predictor, corrector_steps)
        return steps * steps_each + 1

    @staticmethod
    def add_sample_arguments(group: argparse._ArgumentGroup) -> None:
        group.add_argument("--pds", action="store_true",
                           help="score-ve: preconditioned diffusion sampling (filters from 200 training images "
                                "or --pds-filter)")
        group.add_argument("--pds-alpha", type=float, default=5.0,
                           help="score-ve: PDS normalisation alpha (eq. 22); filter values lie in [1, a/(a-1)]")
        group.add_argument("--pds-space", action="store_true", help="score-ve: also apply the space filter A")
        group.add_argument("--pds-filter", default=None, metavar="FILE",
                           help="score-ve: filters saved by `diffaccel pds-filter`")
        group.add_argument("--no-pds-safeguard", action="store_true",
                           help="score-ve: PDS without the step-size safeguard (the reference implementation)")
        # no default (absent unless given): a flag that the chosen sampler does not use is refused, not dropped
        unset = argparse.SUPPRESS
        group.add_argument("--predictor", default=unset,
                           help="score-ve pc: reverse-diffusion (default) | ancestral | none")
        group.add_argument("--corrector-steps", type=int, default=unset,
                           help="score-ve pc: Langevin corrector steps per level (default 1; 0 = predictor only)")
        group.add_argument("--snr", type=float, default=unset,
                           help="score-ve pc: Langevin corrector signal-to-noise ratio (default 0.16)")
        group.add_argument("--step-lr", type=float, default=unset,
                           help="score-ve ald: step size at the smallest noise level (default 2e-5)")
        group.add_argument("--steps-each", type=int, default=unset,
                           help="score-ve ald: Langevin steps per noise level (default 1)")

    def sampler_options(self, args: argparse.Namespace) -> dict:
        sampler = getattr(args, "sampler", None)
        sampler = "pc" if sampler is None else sampler  # "" is a value (refused), not "unset"
        self._check_sampler(sampler)
        own = {"pc": ("predictor", "corrector_steps", "snr"), "ald": ("step_lr", "steps_each")}
        other = [k for k in own["ald" if sampler == "pc" else "pc"] if getattr(args, k, None) is not None]
        other += [k for k in ("eta", "clip_x0") if getattr(args, k, None) not in (None, False)]
        if other:
            flags = ", ".join("--" + k.replace("_", "-") for k in other)
            raise UserError(f"{flags} not used by score-ve's {sampler} sampler")
        pds = bool(getattr(args, "pds", False))
        if not pds and (getattr(args, "no_pds_safeguard", False) or getattr(args, "pds_space", False)
                        or getattr(args, "pds_filter", None)):
            raise UserError("--pds-space, --pds-filter and --no-pds-safeguard need --pds")
        options = {"sampler": sampler, "steps": getattr(args, "steps", None), "pds": pds,
                   "pds_alpha": getattr(args, "pds_alpha", 5.0), "pds_space": bool(getattr(args, "pds_space", False)),
                   "pds_filter": getattr(args, "pds_filter", None),
                   "pds_safeguard": not getattr(args, "no_pds_safeguard", False)}
        options.update({k: getattr(args, k) for k in own[sampler] if getattr(args, k, None) is not None})
        self._check_sampler(**{k: options[k] for k in ("sampler", *own[sampler]) if k in options})
        return {k: v for k, v in options.items() if v is not None}  # unset keep the defaults of ``sample``
