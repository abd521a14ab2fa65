"""Data-parallel training on CPU with two gloo ranks, through `accelerate launch` and through `torchrun`.

The trainer draws each rank's noise with seed + rank, so a run with random noise can never equal a one-process
run. To compare against one process faithfully, the launched script trains a deterministic method (its loss
uses no randomness): then two ranks with shards of 4 and gradients averaged by DDP must give what one process
gives with the whole batch of 8, up to float rounding. The baseline method (random noise per rank) is run too,
for the property that holds for every method: both ranks end with the same weights.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffaccel.checkpoint import list_checkpoints, verify
from diffaccel.runs import read_metrics

SRC = Path(__file__).resolve().parents[1] / "src"
BIN = Path(sys.executable).parent
ACCELERATE, TORCHRUN = BIN / "accelerate", BIN / "torchrun"

SCRIPT = r'''
"""Train the deterministic toy method (or the baseline) with the diffaccel trainer; record what each rank saw."""
import json, sys
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

torch.set_num_threads(1)
import diffaccel.train as train_module
from diffaccel.checkpoint import flatten
from diffaccel.methods.base import Method, Phase
from diffaccel.methods.baseline import Baseline


class SmallNet(torch.nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Conv2d(channels, 16, 3, padding=1), torch.nn.GroupNorm(4, 16),
                                        torch.nn.SiLU(), torch.nn.Conv2d(16, channels, 3, padding=1))

    def forward(self, x, t):
        return self.body(x)


class Toy(Method):
    """net(x0/2) ≈ x0: no randomness in the loss. `poison` = (rank, step): that rank's loss value is NaN there
    while its gradient stays finite, the case where ranks disagree about a step being finite."""

    name = "toy"

    def __init__(self, poison=None):
        self.poison = poison

    def build_networks(self, net_cfg, image_shape):  # two convolutions: no diffusers import in every rank
        return {"net": SmallNet(image_shape[0])}

    def phases(self):
        return [Phase("main", ("net",), self._loss)]

    def _loss(self, nets, x0, step):
        loss = F.mse_loss(nets["net"](x0 * 0.5, torch.ones(len(x0))), x0)
        if self.poison and list(self.poison) == [RANK, step]:
            loss = loss + float("nan")
        return loss

    def sample(self, net, n, image_shape, **_):
        return torch.zeros(n, *image_shape)


out, steps, method, resume = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4] == "resume"
poison = json.loads(sys.argv[5]) if len(sys.argv) > 5 else None
RANK = int(__import__("os").environ.get("RANK", 0))
saves = []
real_save = train_module.save_checkpoint
train_module.save_checkpoint = lambda *a, **kw: saves.append(a[1]) or real_save(*a, **kw)
cfg = train_module.TrainConfig(
    data="digits", data_limit=64, net={"preset": "tiny", "overrides": {"block_out_channels": [16, 32],
                                                                       "norm_num_groups": 8}},
    batch_size=8, lr=1e-3, steps=steps, log_every=1, checkpoint_every=2, keep_checkpoints=10, device="cpu",
    out=str(out), sample_n=4, sample_options={"steps": 2}, max_nonfinite=3)
trainer = train_module.Trainer(cfg, Toy(poison) if method == "toy" else Baseline(N=50), resume=resume,
                               progress=False)
trainer.run()
acc = trainer.accelerator
save_file(flatten({n: acc.unwrap_model(m) for n, m in trainer.nets.items()}), out / f"rank{acc.process_index}.safetensors")
(out / f"rank{acc.process_index}.json").write_text(json.dumps(
    {"rank": acc.process_index, "world": acc.num_processes, "backend": str(acc.distributed_type), "saves": saves}))
train_module.release_process_group()
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(launcher: str, script: Path, *args, timeout=400) -> None:
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    if launcher == "accelerate":  # --multi_gpu with the trainer's Accelerator(cpu=True) runs gloo ranks on CPU
        cmd = [str(ACCELERATE), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port())]
    elif launcher == "torchrun":
        cmd = [str(TORCHRUN), "--standalone", "--nproc_per_node", "2"]
    else:
        cmd = [sys.executable]
    result = subprocess.run([*cmd, str(script), *map(str, args)], env=env, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]


def ranks(out: Path, world: int = 2) -> list[dict]:
    info = [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]
    assert [i["world"] for i in info] == [world] * world
    return info


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path)


def assert_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def script(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("mp") / "mp_train.py"
    path.write_text(SCRIPT)
    return path


@pytest.mark.slow  # four launches of two processes: about a minute on two idle cores
@pytest.mark.skipif(not ACCELERATE.exists() or not TORCHRUN.exists(), reason="launchers not installed")
def test_two_ranks_match_one_process_skip_together_and_resume_exactly(script, tmp_path):
    """accelerate launch and torchrun, 2 gloo ranks on CPU: identical weights on both ranks, equal to one process
    with the same global batch, checkpoints by rank 0 only, a step that is non-finite on rank 1 alone skipped by
    both, and a torchrun run resumed under accelerate equal bitwise to the uninterrupted run."""
    acc_out, tr_out, one_out = tmp_path / "accelerate", tmp_path / "torchrun", tmp_path / "one"
    on_rank1, on_rank0 = json.dumps([1, 2]), json.dumps([0, 2])  # a non-finite loss at step index 2
    launch("accelerate", script, acc_out, 6, "toy", "new", on_rank1)  # 6 steps in one go
    launch("torchrun", script, tr_out, 4, "toy", "new", on_rank1)  # 4 steps, then resumed to 6 below
    launch("python", script, one_out, 6, "toy", "new", on_rank0)  # one process, the same global batch of 8

    info = ranks(acc_out)
    assert {i["backend"] for i in info} == {"DistributedType.MULTI_CPU"}
    assert info[0]["saves"] == [2, 4, 6] and info[1]["saves"] == []  # only rank 0 writes checkpoints
    assert_equal(weights(acc_out / "rank0.safetensors"), weights(acc_out / "rank1.safetensors"))
    assert [c.name for c in list_checkpoints(acc_out / "checkpoints")] == [f"step_000000{s}" for s in (2, 4, 6)]

    # both ranks skipped step 3 although only rank 1 saw a non-finite loss: 5 optimiser steps in 6
    assert [r["step"] for r in read_metrics(acc_out) if "skipped" in r] == [3]
    state = torch.load(acc_out / "checkpoints/step_0000006/state.pt", weights_only=True)
    assert int(state["optimizers"]["main"]["state"][0]["step"]) == 5

    # two ranks with shards of 4 == one process with the batch of 8, within float rounding
    two, one = weights(acc_out / "checkpoints/step_0000006/weights.safetensors"), weights(
        one_out / "checkpoints/step_0000006/weights.safetensors")
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-5)
    loss2 = [r["loss"] for r in read_metrics(acc_out) if "loss" in r]
    loss1 = [r["loss"] for r in read_metrics(one_out) if "loss" in r]
    assert len(loss2) == 5
    torch.testing.assert_close(torch.tensor(loss2), torch.tensor(loss1), rtol=1e-5, atol=1e-7)

    # torchrun: 4 steps, then resumed to 6 (launched by accelerate this time) == the 6-step run, bitwise
    assert ranks(tr_out)[1]["saves"] == []
    launch("accelerate", script, tr_out, 6, "toy", "resume", on_rank1)
    assert [r["loss"] for r in read_metrics(tr_out) if "loss" in r] == loss2
    for name in ("weights.safetensors", "ema.safetensors"):
        assert_equal(weights(tr_out / "checkpoints/step_0000006" / name),
                     weights(acc_out / "checkpoints/step_0000006" / name))
    assert_equal(weights(tr_out / "rank0.safetensors"), weights(tr_out / "rank1.safetensors"))


@pytest.mark.slow  # one launch of two processes
@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed")
def test_the_cli_under_torchrun_trains_a_random_noise_method(tmp_path):
    """The documented command, `torchrun ... -m diffaccel.cli train`, with the baseline (noise drawn per rank)."""
    out = tmp_path / "baseline"
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [str(TORCHRUN), "--standalone", "--nproc_per_node", "2", "-m", "diffaccel.cli", "train", "--method",
         "baseline", "--time-steps", "50", "--data", "digits", "--data-limit", "64", "--preset", "tiny",
         "--net-config", '{"block_out_channels": [16, 32], "norm_num_groups": 8}', "--batch-size", "8",
         "--device", "cpu", "--steps", "2", "--checkpoint-every", "1", "--log-every", "1", "--out", str(out)],
        env=env, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-4000:]
    assert [c.name for c in list_checkpoints(out / "checkpoints")] == ["step_0000001", "step_0000002"]
    assert verify(out / "checkpoints" / "step_0000002")["step"] == 2
    assert [r["step"] for r in read_metrics(out) if "loss" in r] == [1, 2]  # one line per step: rank 0 logs
    state = torch.load(out / "checkpoints/step_0000002/state.pt", weights_only=True)
    assert len(state["rng"]) == 2  # both ranks' RNG states, so a resume continues each rank's noise
