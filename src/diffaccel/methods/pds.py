"""PDS: preconditioned diffusion sampling (Ma et al.) and the filters it is built from (the preconditioned VP
sampler, `preconditioned_ddim`, is with the other epsilon samplers in `diffaccel.samplers`).

The preconditioner is M = F⁻¹·R·F·A (supplementary eq. 19): A is a per-pixel *space* filter, R a per-frequency
filter and F the 2-D DFT over the last two axes. Langevin-type updates keep their stationary distribution when
the score/drift term is multiplied by M·Mᵀ and the noise by M (supplementary Theorems 1 and 2).

Conventions (as the PDS reference implementation):
- ``R`` is stored in the unshifted FFT layout (DC at ``[0, 0]``), shape ``[C, H, W]``; ``A`` has shape ``[C, H, W]``.
- Both are real and ``R(k) = R(-k)``, so F⁻¹·R·F is a real symmetric (circulant) operator and
  Mᵀ = A·F⁻¹·R·F, M·Mᵀ = F⁻¹·R·F·A²·F⁻¹·R·F. Outputs are made real by dropping the round-off imaginary part.
- Filters from data use images in [0, 1] (the VE models' data range), e.g. ~200 training images.
"""

from __future__ import annotations

from pathlib import Path

import torch

from diffaccel.errors import UserError
from diffaccel.methods.base import add_clip_x0_argument


# --------------------------------------------------------------------------------------------------------------
# Filters
# --------------------------------------------------------------------------------------------------------------
def _normalise(statistic: torch.Tensor, alpha: float) -> torch.Tensor:
    """Eq. 22: m ← m / max m; m ← (m + α − 1) / α; filter = 1 / m  (values in [1, α / (α − 1)])."""
    if alpha <= 1.0:
        raise UserError(f"PDS alpha must be > 1 (got {alpha}); alpha = 5 gives filter values in [1, 1.25]")
    m = statistic / statistic.max()
    return 1.0 / ((m + alpha - 1.0) / alpha)


def _check_images(images: torch.Tensor) -> torch.Tensor:
    if images.ndim != 4 or images.shape[0] < 1:
        raise UserError(f"PDS filters need a batch of images [B, C, H, W]; got shape {tuple(images.shape)}")
    return (images.double() + 1.0) / 2.0  # [-1, 1] -> [0, 1], the range the reference statistics are taken in


def frequency_filter(images: torch.Tensor, alpha: float = 5.0) -> torch.Tensor:
    """R from data (eq. 22): m = log(1 + mean_b |FFT(x_b)|²) per channel and frequency, then normalised.

    ``images``: float [B, C, H, W] in [-1, 1]. Returns R [C, H, W] (float32, unshifted layout) with values in
    [1, α/(α−1)], equal to 1 at the frequency of highest power (the DC term for natural images).
    """
    x = _check_images(images)
    power = torch.fft.fft2(x).abs().square().mean(dim=0)
    return _normalise(torch.log1p(power), alpha).float()


def space_filter(images: torch.Tensor, alpha: float = 5.0) -> torch.Tensor:
    """A from data (eq. 21 as the reference code applies it): per-pixel mean of x² normalised like eq. 22.

    Eq. 21 prints only the division by the maximum; the reference implementation then applies the same α-mapping
    and inversion as the frequency filter, so A ∈ [1, α/(α−1)] and A = 1 at the brightest-on-average pixel.
    """
    x = _check_images(images)
    return _normalise(x.square().mean(dim=0), alpha).float()


def radial_filter(shape: tuple[int, int, int], r: float, lam: float) -> torch.Tensor:
    """Eq. 20: R = 1 where (h − H/2)² + (w − W/2)² ≤ 2r² in the centred (fftshift) layout, λ elsewhere.

    The centred coordinates are the signed frequency indices, so the filter is symmetric under k → −k and the
    preconditioner stays real. Returned in the unshifted layout [C, H, W] like ``frequency_filter``.
    For NCSN on MNIST the paper uses r = 0.2·H, λ = 1.6.
    """
    channels, height, width = shape
    kh = torch.fft.fftfreq(height, d=1.0 / height).double()
    kw = torch.fft.fftfreq(width, d=1.0 / width).double()
    inside = kh[:, None] ** 2 + kw[None, :] ** 2 <= 2.0 * r * r
    filt = torch.where(inside, torch.tensor(1.0, dtype=torch.float64), torch.tensor(float(lam), dtype=torch.float64))
    return filt.float().expand(channels, height, width).clone()


# --------------------------------------------------------------------------------------------------------------
# Solenoidal term (eq. 23/24)
# --------------------------------------------------------------------------------------------------------------
class ShiftSolenoid:
    """S = ω·(P_{m,n} − P_{m,n}ᵀ), P_{m,n} rolling the image m places along height and n along width (eq. 24 S1–S3).

    Pᵀ = P⁻¹ is the roll by (−m, −n), so S is skew-symmetric and ∇·(S ∇log p · p) = 0: adding S·score to a
    Langevin drift leaves its stationary distribution unchanged (Theorem 1).
    Eq. 24's S4–S6 = Re[F(P − Pᵀ)F⁻¹] are not offered: F·P·F⁻¹ is the diagonal phase D of the roll, so
    F(P − Pᵀ)F⁻¹ = D − D̄ is purely imaginary and its real part maps every real image to 0.
    """

    def __init__(self, shift: tuple[int, int] = (1, 1), omega: float = 1.0):
        self.shift = (int(shift[0]), int(shift[1]))
        self.omega = float(omega)

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        m, n = self.shift
        return self.omega * (torch.roll(v, (m, n), dims=(-2, -1)) - torch.roll(v, (-m, -n), dims=(-2, -1)))


# --------------------------------------------------------------------------------------------------------------
# Preconditioner
# --------------------------------------------------------------------------------------------------------------
class Preconditioner:
    """M = F⁻¹·R·F·A applied to noise, M·Mᵀ (+ the optional solenoidal S) applied to score/drift terms.

    ``freq`` (R) and ``space`` (A): tensors broadcastable to [C, H, W], or None for the identity.
    All operations are batched over the leading dimensions with ``torch.fft.fft2``.
    """

    def __init__(self, freq: torch.Tensor | None = None, space: torch.Tensor | None = None,
                 solenoid: ShiftSolenoid | None = None):
        for name, filt in (("frequency", freq), ("space", space)):
            if filt is not None and (not torch.is_tensor(filt) or filt.ndim > 3 or not torch.all(filt > 0)):
                raise UserError(f"PDS {name} filter must be a positive tensor of shape [C, H, W]")
        if freq is not None and not torch.allclose(freq, _reflect(freq), rtol=1e-5, atol=1e-6):
            raise UserError("PDS frequency filter must satisfy R(k) = R(-k) so that the preconditioner is real")
        self.freq = freq
        self.space = space
        self.solenoid = solenoid
        # filters equal to 1 everywhere are skipped, so that M = I reproduces the vanilla samplers bit for bit
        self._freq_on = freq is not None and not bool(torch.all(freq == 1))
        self._space_on = space is not None and not bool(torch.all(space == 1))
        self._norm: float | None = None

    def to(self, device) -> "Preconditioner":
        move = (lambda t: None if t is None else t.to(device))
        return Preconditioner(move(self.freq), move(self.space), self.solenoid)

    # The circulant part F⁻¹·R·F is real and symmetric; computed in the input's precision.
    def _circulant(self, v: torch.Tensor) -> torch.Tensor:
        if not self._freq_on:
            return v
        return torch.fft.ifft2(torch.fft.fft2(v) * self.freq.to(v.dtype)).real

    def _space(self, v: torch.Tensor, power: int = 1) -> torch.Tensor:
        return v if not self._space_on else v * self.space.to(v.dtype) ** power

    def apply(self, v: torch.Tensor) -> torch.Tensor:
        """M·v = F⁻¹·R·F·(A ⊙ v): used on noise and on the initial sample."""
        return self._circulant(self._space(v))

    def apply_transpose(self, v: torch.Tensor) -> torch.Tensor:
        """Mᵀ·v = A ⊙ (F⁻¹·R·F·v)."""
        return self._space(self._circulant(v))

    def apply_gram(self, v: torch.Tensor) -> torch.Tensor:
        """(M·Mᵀ + S)·v = F⁻¹·R·F·(A² ⊙ F⁻¹·R·F·v) + S·v: used on score and drift terms."""
        out = self._circulant(self._space(self._circulant(v), power=2))
        if self.solenoid is not None:
            out = out + self.solenoid(v)
        return out

    # --- step-size safeguard (docs/pds.md, "Step-size safeguard") -----------------------------------------------
    def norm_bound(self) -> float:
        """An upper bound of the operator norm ‖M‖₂ = ‖F⁻¹·R·F·A‖₂ ≤ max R · max A (exact when A is absent)."""
        if self._norm is None:  # computed once: the samplers ask at every step
            self._norm = 1.0
            for filt, on in ((self.freq, self._freq_on), (self.space, self._space_on)):
                if on:
                    self._norm *= float(filt.abs().max())
        return self._norm

    def limited(self, bound: float) -> "Preconditioner":
        """This preconditioner with ‖M‖₂ ≤ ``bound`` (≥ 1): A clipped to ``bound``, then R to bound / max A.

        Returns ``self`` (the same object) when the bound already holds. Without a space filter the clipping is
        per frequency, R_k ← min(R_k, bound); frequencies below the bound keep their value. The optional
        solenoidal term (Python API only) is kept as it is and is not covered by the bound.
        """
        if self.norm_bound() <= bound:
            return self
        space = self.space.clamp(max=bound) if self._space_on else self.space
        space_max = float(space.max()) if self._space_on else 1.0
        freq = self.freq.clamp(max=bound / space_max) if self._freq_on else self.freq
        return Preconditioner(freq, space, self.solenoid)

    # --- persistence ----------------------------------------------------------------------------------------
    def save(self, path: str | Path, **metadata) -> None:
        """Write the filters to a safetensors file (``freq`` and/or ``space``) with string metadata."""
        from safetensors.torch import save_file

        tensors = {k: v.contiguous().float() for k, v in (("freq", self.freq), ("space", self.space)) if v is not None}
        if not tensors:
            raise UserError("nothing to save: the preconditioner has neither a frequency nor a space filter")
        save_file(tensors, str(path), metadata={k: str(v) for k, v in metadata.items()})

    @classmethod
    def load(cls, path: str | Path, use_space: bool = True) -> "Preconditioner":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = Path(path)
        if not path.is_file():
            raise UserError(f"PDS filter file not found: {path}")
        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise UserError(f"PDS filter file {path} is not a readable safetensors file ({exc})") from None
        if "freq" not in tensors and "space" not in tensors:
            raise UserError(f"PDS filter file {path} holds neither 'freq' nor 'space'")
        return cls(tensors.get("freq"), tensors.get("space") if use_space else None)

    def check_shape(self, image_shape: tuple[int, int, int]) -> None:
        for name, filt in (("frequency", self.freq), ("space", self.space)):
            if filt is not None:
                try:
                    torch.broadcast_shapes(filt.shape, tuple(image_shape))
                except RuntimeError:
                    raise UserError(f"PDS {name} filter of shape {tuple(filt.shape)} does not fit images of shape "
                                    f"{tuple(image_shape)}; recompute it with `diffaccel pds-filter`") from None


def _reflect(filt: torch.Tensor) -> torch.Tensor:
    """filt(−k) in the unshifted layout: index k ↦ (−k) mod n along the last two axes."""
    h, w = filt.shape[-2:]
    idx_h = (-torch.arange(h)) % h
    idx_w = (-torch.arange(w)) % w
    return filt[..., idx_h, :][..., idx_w]


def representative_images(dataset, n: int, seed: int = 0) -> torch.Tensor:
    """``n`` images of a dataset drawn at random with a fixed seed (datasets such as mnist5k are sorted by class,
    so the first ``n`` would describe one class only), in [-1, 1]."""
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:n]
    return dataset.to_model_space(dataset.images[order])


def build_preconditioner(images: torch.Tensor | None = None, *, alpha: float = 5.0, use_space: bool = False,
                         filter_file: str | Path | None = None, solenoid: ShiftSolenoid | None = None
                         ) -> Preconditioner:
    """The preconditioner the CLI builds: from a saved filter file, or from data images (≈200 suffice)."""
    if filter_file is not None:
        pre = Preconditioner.load(filter_file, use_space=use_space)
        pre.solenoid = solenoid
        return pre
    if images is None:
        raise UserError("PDS needs data images or a --pds-filter file to build its filters")
    return Preconditioner(frequency_filter(images, alpha), space_filter(images, alpha) if use_space else None,
                          solenoid)


# --------------------------------------------------------------------------------------------------------------
# `diffaccel pds-filter`
# --------------------------------------------------------------------------------------------------------------
def pds_filter_main(argv: list[str] | None = None) -> int:
    """Compute the PDS filters of a dataset and save them (safetensors) for `diffaccel sample --pds-filter`."""
    import argparse

    from diffaccel.data import load_dataset

    parser = argparse.ArgumentParser(prog="diffaccel pds-filter",
                                     description="Compute PDS frequency (and space) filters from training images.")
    parser.add_argument("--data", required=True, help="dataset spec (mnist5k, digits or a path)")
    parser.add_argument("--out", required=True, help="output .safetensors file")
    parser.add_argument("--alpha", type=float, default=5.0, help="normalisation alpha of eq. 22 (default 5)")
    parser.add_argument("--space", action="store_true", help="also compute the space filter A")
    parser.add_argument("--images", type=int, default=200, help="number of images to average over (default 200)")
    parser.add_argument("--resolution", type=int, default=None, help="resize the images to this size")
    parser.add_argument("--channels", type=int, default=None, help="force 1 or 3 channels")
    args = parser.parse_args(argv)
    if args.images < 1:
        raise UserError(f"--images must be >= 1, got {args.images}")
    dataset = load_dataset(args.data, resolution=args.resolution, channels=args.channels)
    images = representative_images(dataset, args.images)
    pre = Preconditioner(frequency_filter(images, args.alpha), space_filter(images, args.alpha) if args.space else None)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    pre.save(out, data=args.data, alpha=args.alpha, images=len(images), resolution=args.resolution or "native")
    r = pre.freq
    print(f"saved PDS filters to {out}: R {tuple(r.shape)} in [{r.min():.4f}, {r.max():.4f}]"
          + (f", A in [{pre.space.min():.4f}, {pre.space.max():.4f}]" if pre.space is not None else "")
          + f" from {len(images)} images of {args.data}")
    return 0


# --------------------------------------------------------------------------------------------------------------
# PDS for epsilon (VP) models: `diffaccel sample RUN --pds` on baseline and KL runs
def add_epsilon_pds_arguments(group) -> None:
    """The --pds flags of the epsilon methods (shared by name with the score models' flags)."""
    group.add_argument("--pds", action="store_true",
                       help="preconditioned sampling: PDS on score models; on epsilon models the preconditioned "
                            "DDIM of docs/pds.md (filters from 200 training images of the run, or --pds-filter)")
    group.add_argument("--pds-alpha", type=float, default=5.0,
                       help="PDS normalisation alpha (eq. 22); filter values lie in [1, a/(a-1)]")
    group.add_argument("--pds-space", action="store_true", help="PDS: also apply the space filter A")
    group.add_argument("--pds-filter", default=None, metavar="FILE", help="PDS filters saved by `diffaccel pds-filter`")


# flags of the score-ve samplers, refused on epsilon models rather than dropped
SCORE_SAMPLER_FLAGS = ("predictor", "corrector_steps", "snr", "step_lr", "steps_each", "no_pds_safeguard")


class EpsilonPDS:
    """Mixin giving an epsilon method (baseline, KL) the --pds sampling flags and its preconditioner."""

    @staticmethod
    def add_sample_arguments(group) -> None:
        add_epsilon_pds_arguments(group)
        add_clip_x0_argument(group)

    def sampler_options(self, args) -> dict:
        score_only = [k for k in SCORE_SAMPLER_FLAGS if getattr(args, k, None) not in (None, False)]
        if score_only:
            raise UserError(", ".join("--" + k.replace("_", "-") for k in score_only)
                            + " apply to score-ve runs only, not to this epsilon model")
        options = super().sampler_options(args)
        if getattr(args, "pds", False):
            options.update(pds=True, pds_alpha=getattr(args, "pds_alpha", 5.0),
                           pds_space=bool(getattr(args, "pds_space", False)), pds_filter=getattr(args, "pds_filter", None))
        return options

    def pds_preconditioner(self, image_shape, pds: bool = False, **pds_options) -> "Preconditioner | None":
        if not pds:
            return None
        # a latent run (methods.latent.LatentSpace) preconditions its latents, with the latents' own filter
        to_space = getattr(self, "to_diffusion_space", None)
        shape = self.data_shape(image_shape) if hasattr(self, "data_shape") else image_shape
        key = (tuple(shape), tuple(sorted(pds_options.items())))
        cache = self.__dict__.setdefault("_pds_preconditioners", {})  # built once per run, not at every sampling
        if key not in cache:
            cache[key] = preconditioner_for_run(getattr(self, "run_dir", None), shape, to_space=to_space,
                                                **pds_options)
        return cache[key]


def preconditioner_for_run(run_dir, image_shape, *, pds_alpha: float = 5.0, pds_space: bool = False,
                           pds_filter: str | None = None, pds_images: int = 200, to_space=None) -> Preconditioner:
    """The preconditioner of a trained run: from a filter file, or from ``pds_images`` of the run's training data
    (mapped by ``to_space``, e.g. to latents, when given)."""
    images = None
    if pds_filter is None:
        if run_dir is None:
            raise UserError("--pds needs --pds-filter FILE when the model does not come from a run directory")
        from diffaccel.data import load_dataset
        from diffaccel.runs import read_config

        train = read_config(run_dir)["train"]
        dataset = load_dataset(train["data"], train.get("resolution"), train.get("channels"))
        images = representative_images(dataset, pds_images)
        if to_space is not None:
            images = to_space(images)
    pre = build_preconditioner(images, alpha=pds_alpha, use_space=pds_space, filter_file=pds_filter)
    pre.check_shape(tuple(image_shape))
    return pre
