"""``DVDPPipeline``: dimensionality-varying diffusion (and subspace diffusion) as a diffusers pipeline."""

from diffaccel.pipelines.base import MethodPipeline


class DVDPPipeline(MethodPipeline):
    """A DVDP UNet with its turning points and schedule; samples as `diffaccel sample` does."""

    method_name = "dvdp"


class SubspacePipeline(MethodPipeline):
    """Subspace diffusion (the DVDP variant without the residual); samples as `diffaccel sample` does."""

    method_name = "subspace"
