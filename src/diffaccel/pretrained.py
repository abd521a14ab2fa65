"""Pretrained diffusers epsilon models as starting points (``diffaccel train --init-from FOLDER``).

Accepted: a DDPM/DDIM pipeline folder as ``save_pretrained`` writes it (``model_index.json``, ``unet/``,
``scheduler/``; e.g. a downloaded ``google/ddpm-cifar10-32``) or a bare ``UNet2DModel`` folder (``config.json`` +
weights). The UNet is brought to our convention, net(x, k) with the grid index k = t + 1 (docs/diffusers.md), by
the exact time shift of ``diffaccel.export.shift_time_input``; the schedule comes from the pipeline's scheduler
(diffusers computes ``alphas_cumprod`` from its own config) and is checked against the method's grid.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from diffaccel.errors import UserError

# UNet2DModel arguments that the data or the method decide, or that change training only: not compared
NOT_ARCHITECTURE = {"sample_size", "in_channels", "out_channels", "dropout", "num_train_timesteps"}


@dataclass
class PretrainedEpsilon:
    unet: nn.Module                    # UNet2DModel taking our grid index k (already shifted)
    alpha_bars: torch.Tensor | None    # float64 [N+1] with alpha_bars[0] = 1, None for a bare UNet folder
    where: Path

    @property
    def N(self) -> int | None:
        return None if self.alpha_bars is None else len(self.alpha_bars) - 1


def is_diffusers_folder(path: str | Path) -> bool:
    path = Path(path)
    if (path / "model_index.json").is_file():
        return True
    config = path / "config.json"
    if config.is_file():
        try:
            return json.loads(config.read_text()).get("_class_name") == "UNet2DModel"
        except ValueError:
            return False
    return False


def load_pretrained_epsilon(path: str | Path) -> PretrainedEpsilon:
    """The UNet (in our time convention) and the schedule of a diffusers folder."""
    from diffusers import DDPMScheduler, UNet2DModel

    from diffaccel.export import shift_time_input

    path = Path(path)
    alpha_bars = None
    unet_dir = path
    if (path / "model_index.json").is_file():
        index = json.loads((path / "model_index.json").read_text())
        if "unet" not in index or not (path / "unet").is_dir():
            raise UserError(f"--init-from {path}: the pipeline ({index.get('_class_name')}) has no unet/ folder")
        unet_dir = path / "unet"
        if not (path / "scheduler").is_dir():
            raise UserError(f"--init-from {path}: the pipeline has no scheduler/ folder to check the schedule with")
        sched_cfg = json.loads(next((path / "scheduler").glob("scheduler_config.json")).read_text())
        if sched_cfg.get("prediction_type", "epsilon") != "epsilon":
            raise UserError(f"--init-from {path}: the model predicts {sched_cfg['prediction_type']!r}; "
                            "diffaccel fine-tunes epsilon-prediction models only")
        scheduler = DDPMScheduler.from_config(sched_cfg)  # diffusers' own betas -> alphas_cumprod
        alpha_bars = torch.cat([torch.ones(1, dtype=torch.float64), scheduler.alphas_cumprod.to(torch.float64)])
    try:
        unet = UNet2DModel.from_pretrained(unet_dir)
    except (OSError, ValueError, EnvironmentError) as e:
        raise UserError(f"--init-from {path}: cannot load a UNet2DModel from {unet_dir}: {e}") from None
    shift_time_input(unet, -1.0)  # diffusers' unet(x, t) with t = k − 1 becomes our net(x, k)
    return PretrainedEpsilon(unet.eval(), alpha_bars, path)


def check_schedule(pre: PretrainedEpsilon, alpha_bars: torch.Tensor, what: str, atol: float = 1e-5) -> None:
    """The pretrained schedule must be the method's grid (``alpha_bars`` ``[N+1]``) to ``atol``."""
    if pre.alpha_bars is None:
        return  # a bare UNet folder carries no schedule: its timesteps are taken as the method's grid
    N = len(alpha_bars) - 1
    if pre.N != N:
        raise UserError(f"--init-from {pre.where}: the model was trained with {pre.N} timesteps, {what} has N = {N} "
                        f"(pass --time-steps {pre.N})")
    gap = float((pre.alpha_bars - alpha_bars.to(torch.float64)).abs().max())
    if gap > atol:
        raise UserError(f"--init-from {pre.where}: its noise schedule differs from {what}'s (max |Δalpha_bar| = "
                        f"{gap:.2g} > {atol:g}); choose the matching --schedule")


def _plain(value):
    return json.loads(json.dumps(value))  # tuples and lists compare equal


def check_architecture(net: nn.Module, pre: PretrainedEpsilon) -> None:
    """``net`` (a DiffusersAdapter) must be the pretrained UNet's architecture and image shape, or a clear error."""
    own, cfg = getattr(net, "unet", net).config, pre.unet.config
    if cfg.sample_size != own.sample_size or cfg.in_channels != own.in_channels:
        raise UserError(f"--init-from {pre.where}: the UNet takes {cfg.in_channels}×{cfg.sample_size}² images, the "
                        f"data is {own.in_channels}×{own.sample_size}² (pass --channels {cfg.in_channels} "
                        f"--resolution {cfg.sample_size})")
    keys = sorted(k for k in {*own.keys(), *cfg.keys()} if not k.startswith("_") and k not in NOT_ARCHITECTURE)
    differ = {k: cfg.get(k) for k in keys if _plain(own.get(k)) != _plain(cfg.get(k))}
    if "block_out_channels" in differ:  # build_unet would otherwise redo the block types for the new depth
        differ.update({k: cfg[k] for k in ("down_block_types", "up_block_types")})
    if differ:  # shapes or function (e.g. flip_sin_to_cos, attention_head_dim, downsample_padding) would differ
        raise UserError(f"--init-from {pre.where}: its UNet has another architecture than --preset/--net-config "
                        f"build; pass --net-config '{json.dumps(differ)}'")


def load_unet_weights(net: nn.Module, pre: PretrainedEpsilon) -> None:
    """Copy the pretrained UNet's weights into ``net`` (a DiffusersAdapter) after ``check_architecture``."""
    check_architecture(net, pre)
    target = getattr(net, "unet", net)
    own, theirs = target.state_dict(), pre.unet.state_dict()
    if own.keys() != theirs.keys() or any(own[k].shape != theirs[k].shape for k in own):
        raise UserError(f"--init-from {pre.where}: the UNet's parameters differ in shape from this network's "
                        f"({pre.unet.config.out_channels} output channels there, {target.config.out_channels} here)")
    target.load_state_dict(theirs)

