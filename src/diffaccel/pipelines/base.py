"""``MethodPipeline``: a diffusers pipeline around one diffusers UNet and the diffaccel method that samples it.

The UNet is a registered module (``unet/`` in safetensors); the method's settings (``method_config``, the same
dict as a run's config.yaml holds) and the image shape are pipeline config entries in ``model_index.json``.
``__call__`` rebuilds the method and runs exactly the sampler `diffaccel sample` runs, so the two agree to
float rounding for the same seed; diffusers' conventions hold for the arguments and the output.
"""

from __future__ import annotations

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput, UNet2DModel

from diffaccel.errors import UserError

OUTPUT_TYPES = ("pil", "np", "pt")


def to_output(images: torch.Tensor, output_type: str, pipeline: DiffusionPipeline):
    """[-1, 1] NCHW samples as diffusers returns them: [0, 1] PIL list, NHWC numpy or NCHW tensor."""
    if output_type not in OUTPUT_TYPES:
        raise UserError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
    images = (images / 2 + 0.5).clamp(0, 1)
    if output_type == "pt":
        return images
    array = images.cpu().permute(0, 2, 3, 1).float().numpy()
    return array if output_type == "np" else pipeline.numpy_to_pil(array)


class MethodPipeline(DiffusionPipeline):
    """Base of the single-UNet method pipelines; subclasses name ``method_name``."""

    method_name: str = ""
    model_cpu_offload_seq = "unet"

    def __init__(self, unet: UNet2DModel, method_config: dict | None = None, image_shape: list | None = None):
        super().__init__()
        self.register_modules(unet=unet)
        self.register_to_config(method_config=dict(method_config or {}),
                                image_shape=list(image_shape or (unet.config.in_channels, unet.config.sample_size,
                                                                 unet.config.sample_size)))

    @classmethod
    def from_run(cls, config: dict, method, nets) -> "MethodPipeline":
        """The pipeline of a run loaded with ``diffaccel.runs.load_run``."""
        import copy

        unet = copy.deepcopy(getattr(nets[method.sampling_network], "unet", None))
        if not isinstance(unet, UNet2DModel):
            raise UserError(f"export of {cls.method_name!r} needs a diffusers UNet2DModel as its sampling network")
        return cls(unet=unet.eval(), method_config=method.config(), image_shape=config["image_shape"])

    def method(self):
        from diffaccel.methods import build_method

        return build_method(self.method_name, self.config.method_config)

    def sampler_kwargs(self, num_inference_steps, eta, extra: dict) -> dict:
        kwargs = {"steps": num_inference_steps, "eta": eta, **extra}
        return {k: v for k, v in kwargs.items() if v is not None}  # unset: the method's own defaults

    @torch.no_grad()
    def __call__(self, batch_size: int = 1, generator: torch.Generator | None = None,
                 num_inference_steps: int | None = None, eta: float | None = None, output_type: str = "pil",
                 return_dict: bool = True, **sampler_options):
        """Draw ``batch_size`` images; ``num_inference_steps`` and ``eta`` default to the method's sampler defaults,
        further keyword arguments are the method's sampler options (as `diffaccel sample` flags)."""
        from diffaccel.nets.unet import DiffusersAdapter

        if output_type not in OUTPUT_TYPES:
            raise UserError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
        method = self.method()
        net = DiffusersAdapter(self.unet).eval()
        images = method.sample(net, batch_size, tuple(self.config.image_shape), generator=generator,
                               device=self.device, progress=False,
                               **self.sampler_kwargs(num_inference_steps, eta, sampler_options))
        images = to_output(images, output_type, self)
        return ImagePipelineOutput(images=images) if return_dict else (images,)
