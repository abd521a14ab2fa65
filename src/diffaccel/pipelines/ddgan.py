"""``DDGANPipeline`` (pixel space) and ``LDDGANPipeline`` (autoencoder latents + decoder) as diffusers pipelines.

The DDGAN generator and the autoencoder are diffaccel networks, not diffusers models; to be pipeline components
that ``save_pretrained`` writes in safetensors and ``from_pretrained`` rebuilds, each is held by a small
``ModelMixin``/``ConfigMixin`` model whose config is the builder's arguments. ``__call__`` runs the method's
Algorithm 1 (T generator calls, then for LDDGAN one decoder call), as `diffaccel sample` does.
"""

from __future__ import annotations

import torch
from diffusers import ConfigMixin, DiffusionPipeline, ImagePipelineOutput, ModelMixin  # noqa: F401 (ModelMixin
# must be a name of this module: diffusers looks the component base classes up in the component's module)
from diffusers.configuration_utils import register_to_config

from diffaccel.errors import UserError
from diffaccel.pipelines.base import OUTPUT_TYPES, to_output


class DDGANGeneratorModel(ModelMixin, ConfigMixin):
    """A DDGAN generator G(x_t, t, z) built by ``diffaccel.nets.ddgan.build_generator(preset, ...)``."""

    @register_to_config
    def __init__(self, preset: str = "small", in_channels: int = 1, resolution: int = 32,
                 overrides: dict | None = None):
        super().__init__()
        from diffaccel.nets.ddgan import build_generator

        self.net = build_generator(preset, in_channels, resolution, **(overrides or {}))

    def forward(self, x, t, z):
        return self.net(x, t, z)


class AutoencoderModel(ModelMixin, ConfigMixin):
    """The LDDGAN autoencoder (with its latent shift and scale) built by ``build_autoencoder(preset, ...)``."""

    @register_to_config
    def __init__(self, preset: str = "small", in_channels: int = 1, resolution: int = 32, factor: int = 4,
                 latent_channels: int = 4, overrides: dict | None = None):
        super().__init__()
        from diffaccel.nets.autoencoder import build_autoencoder

        self.net = build_autoencoder(preset, in_channels, resolution, factor, latent_channels, **(overrides or {}))

    def decode_scaled(self, z):
        return self.net.decode_scaled(z)


def _generator_model(config: dict, method, generator) -> DDGANGeneratorModel:
    net_cfg = config["train"]["net"]
    overrides = dict(net_cfg.get("overrides", {}))
    if method.nz is not None:
        overrides["nz"] = method.nz
    shape = method.data_shape(tuple(config["image_shape"]))
    model = DDGANGeneratorModel(net_cfg.get("preset", "small"), shape[0], shape[1], overrides)
    model.net.load_state_dict(generator.state_dict())
    return model.eval()


def _ddgan(method_config: dict):
    from diffaccel.methods.ddgan import DDGAN

    return DDGAN(**{k: v for k, v in method_config.items() if k != "autoencoder"})


class DDGANPipeline(DiffusionPipeline):
    """Pixel-space DDGAN: ``generator_model`` and the method settings (T, schedule) in model_index.json."""

    model_cpu_offload_seq = "generator_model"

    def __init__(self, generator_model: DDGANGeneratorModel, method_config: dict | None = None,
                 image_shape: list | None = None):
        super().__init__()
        self.register_modules(generator_model=generator_model)
        self.register_to_config(method_config=dict(method_config or {}), image_shape=list(image_shape or []))

    @classmethod
    def from_run(cls, config: dict, method, nets) -> "DDGANPipeline":
        return cls(_generator_model(config, method, nets["generator"]), method.config(), config["image_shape"])

    def latents(self, batch_size, generator):
        method = _ddgan(self.config.method_config)
        shape = tuple(self.generator_model.config[k] for k in ("in_channels", "resolution", "resolution"))
        return method.sample_latents(self.generator_model.net, batch_size, shape, generator=generator,
                                     device=self.device)

    def decode(self, x):
        return x

    @torch.no_grad()
    def __call__(self, batch_size: int = 1, generator: torch.Generator | None = None,
                 num_inference_steps: int | None = None, output_type: str = "pil", return_dict: bool = True):
        """``num_inference_steps`` is fixed by training (the T generator steps); another value is refused."""
        if output_type not in OUTPUT_TYPES:
            raise UserError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
        T = self.config.method_config.get("T", 4)
        if num_inference_steps not in (None, T):
            raise UserError(f"a DDGAN samples in the T = {T} steps it was trained with, not {num_inference_steps}")
        images = to_output(self.decode(self.latents(batch_size, generator)).clamp(-1, 1), output_type, self)
        return ImagePipelineOutput(images=images) if return_dict else (images,)


class LDDGANPipeline(DDGANPipeline):
    """Latent DDGAN: the generator on the autoencoder's scaled latents, then the decoder."""

    model_cpu_offload_seq = "generator_model->autoencoder"

    def __init__(self, generator_model: DDGANGeneratorModel, autoencoder: AutoencoderModel,
                 method_config: dict | None = None, image_shape: list | None = None):
        DiffusionPipeline.__init__(self)
        self.register_modules(generator_model=generator_model, autoencoder=autoencoder)
        self.register_to_config(method_config=dict(method_config or {}), image_shape=list(image_shape or []))

    @classmethod
    def from_run(cls, config: dict, method, nets) -> "LDDGANPipeline":
        from diffaccel.runs import read_config

        ae_config = read_config(method.autoencoder_run)
        ae = method.autoencoder("cpu")
        net_cfg, mcfg = ae_config["train"]["net"], ae_config.get("method_config") or {}
        c, h, _ = ae_config["image_shape"]
        model = AutoencoderModel(net_cfg.get("preset", "small"), c, h, mcfg.get("factor", 4),
                                 mcfg.get("latent_channels", 4), net_cfg.get("overrides", {}))
        model.net.load_state_dict(ae.state_dict())
        return cls(_generator_model(config, method, nets["generator"]), model.eval(), method.config(),
                   config["image_shape"])

    def decode(self, x):
        return self.autoencoder.decode_scaled(x)
