"""``ScoreVEPipeline``: a VE score model (PC or annealed Langevin sampling) as a diffusers pipeline."""

from diffaccel.pipelines.base import MethodPipeline


class ScoreVEPipeline(MethodPipeline):
    """A VE score UNet with its noise levels; ``num_inference_steps`` is the sampler's steps, ``eta`` unused."""

    method_name = "score-ve"

    def sampler_kwargs(self, num_inference_steps, eta, extra):
        return super().sampler_kwargs(num_inference_steps, None, extra)
