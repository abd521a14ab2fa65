"""``diffaccel export RUN OUT_DIR``: a run as a diffusers pipeline folder (docs/diffusers.md has the mapping).

Baseline runs become a standard ``DDIMPipeline`` folder (``model_index.json``, ``unet/``, ``scheduler/``) that
diffusers loads alone. The one convention to reconcile is the time index: our networks are called with the grid
index k ∈ 1..N (alpha_bars[k], alpha_bars[0] = 1), diffusers calls the UNet with t ∈ 0..N−1 (alphas_cumprod[t]),
so t = k − 1. The exported UNet must therefore compute our net(x, t + 1). The sinusoidal embedding of t + 1 is a
fixed rotation of the embedding of t (cos/sin addition formulas, one 2×2 rotation per frequency), and the
embedding feeds a linear layer, so the rotation is folded into that layer's weight: W' = W·R. The result is a
plain ``UNet2DModel`` whose ``unet(x, t)`` equals our ``net(x, t + 1)`` up to float rounding.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from diffaccel.errors import UserError

PAPERS = {
    "baseline": "Ho, Jain & Abbeel, Denoising Diffusion Probabilistic Models (2020); DDIM sampling: Song, Meng & "
                "Ermon, Denoising Diffusion Implicit Models (2021)",
    "kl": "Ren et al., Efficient Diffusion Training through Parallelization with Truncated Karhunen-Loève Expansion",
    "dvdp": "Zhang et al., Dimensionality-Varying Diffusion Process (2023)",
    "ddgan": "Xiao, Kreis & Vahdat, Tackling the Generative Learning Trilemma with Denoising Diffusion GANs (2022)",
    "lddgan": "Trinh et al., Latent Denoising Diffusion GAN: Faster sampling, Higher image quality",
    "subspace": "Jing et al., Subspace Diffusion Generative Models (2022)",
    "score-ve": "Song et al., Score-Based Generative Modeling through Stochastic Differential Equations (2021)",
}


def time_shift_matrix(unet, shift: float) -> torch.Tensor:
    """R (float64, ``[D, D]``) with emb(t + shift) = R·emb(t) for the UNet's sinusoidal time embedding."""
    cfg = unet.config
    proj = unet.time_proj
    dim = cfg.block_out_channels[0]
    if cfg.time_embedding_type != "positional" or dim % 2 or getattr(proj, "scale", 1) != 1:
        raise UserError("export needs a UNet2DModel with the positional (sinusoidal) time embedding of even width; "
                        f"this one has {cfg.time_embedding_type!r}, width {dim}")
    half = dim // 2
    # the frequencies of diffusers.models.embeddings.get_timestep_embedding (max_period 10000)
    w = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float64) / (half - cfg.freq_shift))
    c, s = torch.cos(shift * w), torch.sin(shift * w)
    i = torch.arange(half)
    cos_at, sin_at = (i, i + half) if cfg.flip_sin_to_cos else (i + half, i)
    R = torch.zeros(dim, dim, dtype=torch.float64)
    R[cos_at, cos_at], R[cos_at, sin_at] = c, -s      # cos(a + b) = cos a cos b − sin a sin b
    R[sin_at, sin_at], R[sin_at, cos_at] = c, s       # sin(a + b) = sin a cos b + cos a sin b
    return R


@torch.no_grad()
def shift_time_input(unet, shift: float) -> None:
    """Make ``unet(x, t)`` compute what it computed at ``t + shift`` (in place, exact up to rounding)."""
    lin = unet.time_embedding.linear_1
    R = time_shift_matrix(unet, shift)
    lin.weight.copy_((lin.weight.double() @ R).to(lin.weight.dtype))


def betas_of(alpha_bars: torch.Tensor) -> list[float]:
    """beta_k = 1 − ᾱ_k/ᾱ_{k−1}, k = 1..N: diffusers' ``trained_betas`` for our ``alpha_bars[0..N]``."""
    ab = alpha_bars.to(torch.float64)
    return (1 - ab[1:] / ab[:-1]).tolist()


def _check_out(out_dir: Path) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise UserError(f"{out_dir} already exists and is not an empty folder; choose another OUT_DIR")


def export_run(run_dir: str | Path, out_dir: str | Path, *, ema: bool = True, checkpoint=None) -> Path:
    """Write ``run_dir``'s model to ``out_dir`` as a diffusers pipeline folder; returns ``out_dir``."""
    from diffaccel.runs import load_run, read_config

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    config = read_config(run_dir, rebuild=False)  # the method is rebuilt by load_run, once it is known to export
    _check_out(out_dir)
    from diffaccel.pipelines import PIPELINES, pipeline_for

    if config["method"] != "baseline" and config["method"] not in PIPELINES:
        raise UserError(f"{config['method']!r} runs do not export (they sample nothing on their own); exportable: "
                        f"baseline, {', '.join(PIPELINES)}")
    if config["method"] != "lddgan" and config.get("method_config", {}).get("autoencoder"):
        raise UserError(f"latent {config['method']} runs (--autoencoder) do not export yet: their pipelines have no "
                        f"decoder; export a pixel run or an LDDGAN run instead")
    method, nets = load_run(run_dir, "cpu", checkpoint=checkpoint, ema=ema)
    pipe = baseline_pipeline(method, nets["net"]) if config["method"] == "baseline" else \
        pipeline_for(config, method, nets)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    (out_dir / "README.md").write_text(model_card(run_dir, config, type(pipe).__name__, ema, method))
    return out_dir


def baseline_pipeline(method, net):
    """A diffusers ``DDIMPipeline`` equal to the baseline's DDIM/DDPM samplers on its grid."""
    import copy

    from diffusers import DDIMPipeline, DDIMScheduler, UNet2DModel

    unet = copy.deepcopy(getattr(net, "unet", net))
    if not isinstance(unet, UNet2DModel):
        raise UserError(f"export of a baseline run needs a diffusers UNet2DModel, got {type(unet).__name__}")
    if unet.time_proj.num_channels != unet.config.block_out_channels[0]:
        raise UserError("export: this network's time_embedding_width differs from block_out_channels[0], which a "
                        "UNet2DModel folder cannot record; train with the default width to export")
    shift_time_input(unet, 1.0)  # diffusers' t = our k − 1
    scheduler = DDIMScheduler(num_train_timesteps=method.N, trained_betas=betas_of(method.alpha_bars),
                              clip_sample=False, set_alpha_to_one=True, steps_offset=0,
                              timestep_spacing="trailing", prediction_type="epsilon")
    return DDIMPipeline(unet=unet.eval(), scheduler=scheduler)


def sampler_defaults(method) -> dict:
    """The sampler settings `diffaccel sample` uses when no flag is given (the method's ``sample`` defaults)."""
    import inspect

    params = inspect.signature(method.sample).parameters
    return {k: params[k].default for k in ("sampler", "steps", "eta") if k in params}


def model_card(run_dir: Path, config: dict, pipeline_class: str, ema: bool, method) -> str:
    from diffaccel.runs import read_metrics

    train = config["train"]
    evals = [r for r in read_metrics(run_dir) if any("[" in k for k in r)]
    scores = ", ".join(f"{k} = {v:.4g}" if isinstance(v, float) else f"{k} = {v}" for k, v in evals[-1].items()) \
        if evals else "none recorded"
    mcfg = config.get("method_config") or {}
    defaults = sampler_defaults(method)
    if config["method"] == "baseline":
        defaults_line = (f"`diffaccel sample` defaults {json.dumps(defaults)}; DDIMPipeline's own defaults are "
                         "50 steps and eta 0, so pass `num_inference_steps` and `eta` to sample as diffaccel does")
        use = ("```python\nfrom diffusers import DDIMPipeline\n"
               "pipe = DDIMPipeline.from_pretrained(\"PATH\")\n"
               "images = pipe(batch_size=16, num_inference_steps=20, eta=1.0).images\n```\n\n"
               f"`DDPMPipeline` works too (with `num_inference_steps={mcfg.get('N')}` and "
               "`scheduler=DDPMScheduler.from_pretrained(\"PATH\", subfolder=\"scheduler\")`).")
    else:
        defaults_line = f"{json.dumps(defaults)} (`diffaccel sample`'s, also {pipeline_class}'s when not given)"
        use = ("```python\nfrom diffaccel.pipelines import " + pipeline_class + "\n"
               f"pipe = {pipeline_class}.from_pretrained(\"PATH\")\n"
               "images = pipe(batch_size=16).images\n```")
    return (f"---\nlibrary_name: diffusers\ntags: [diffaccel, {config['method']}, unconditional-image-generation]\n"
            f"---\n\n# {config['method']} model trained with diffaccel\n\n"
            f"- method: `{config['method']}` {json.dumps(mcfg)}\n"
            f"- paper: {PAPERS.get(config['method'], 'see diffaccel docs')}\n"
            f"- data: {train['data']}, image shape {config['image_shape']}\n"
            f"- training steps: {train['steps']}, batch {train['batch_size']}, lr {train['lr']}, seed {train['seed']}\n"
            f"- weights: {'EMA (decay ' + str(train.get('ema_decay')) + ')' if ema else 'raw (not EMA)'}, safetensors\n"
            f"- sampler defaults: {defaults_line}\n"
            f"- last evaluation: {scores}\n\n## Use\n\n{use}\n\n"
            "Time convention: diffusers' timestep t is diffaccel's grid index k − 1 (docs/diffusers.md).\n")
