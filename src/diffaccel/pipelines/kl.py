"""``KLPipeline``: KL diffusion (eq. 24 epsilon through DDIM/DDPM) as a diffusers pipeline."""

from diffaccel.pipelines.base import MethodPipeline


class KLPipeline(MethodPipeline):
    """A KL-diffusion UNet with its M, N, variant and fine-tuning settings; samples as `diffaccel sample` does."""

    method_name = "kl"
