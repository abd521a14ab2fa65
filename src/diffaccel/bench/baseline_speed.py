"""Baseline cost on MNIST-32 with the small UNet: training seconds per step (batch 16 and 128) and DDIM-20
sampling seconds per image. The reference point every method's speed claim is measured against."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from diffaccel.bench.harness import write_results
from diffaccel.data import load_dataset
from diffaccel.methods.baseline import Baseline
from diffaccel.nets.unet import build_unet, count_parameters


def _time_train(method, net, data, batch: int, steps: int, warmup: int) -> float:
    opt = torch.optim.AdamW(net.parameters(), lr=2e-4)
    g = torch.Generator().manual_seed(0)
    times = []
    for i in range(warmup + steps):
        x0 = data.get_batch(torch.randint(len(data), (batch,), generator=g))
        t0 = time.perf_counter()
        loss = method.loss(net, x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return sum(times) / len(times)


def run(out_dir: Path, quick: bool = False) -> dict:
    started = time.time()
    torch.manual_seed(0)
    data = load_dataset("mnist5k")
    method = Baseline(N=1000)
    net = build_unet("tiny" if quick else "small", 1, 1, 32)
    steps, warmup = (2, 1) if quick else (10, 3)
    rows = []
    for batch in ((4,) if quick else (16, 128)):
        rows.append({"what": f"train step, batch {batch}", "seconds": _time_train(method, net, data, batch, steps,
                                                                                    warmup)})
    n = 4 if quick else 32
    net.eval()
    with torch.inference_mode():
        method.sample(net, 2, (1, 32, 32), steps=2, progress=False)  # warm-up
        t0 = time.perf_counter()
        method.sample(net, n, (1, 32, 32), steps=20, eta=1.0, generator=torch.Generator().manual_seed(0),
                      progress=False)
        per_image = (time.perf_counter() - t0) / n
    rows.append({"what": f"DDIM-20 sampling, per image (batch {n})", "seconds": per_image})
    results = {"preset": "tiny" if quick else "small", "parameters": count_parameters(net),
               "torch_threads": torch.get_num_threads(), "rows": rows}

    def plot(fig):
        ax = fig.add_subplot(111)
        ax.barh([r["what"] for r in rows], [r["seconds"] for r in rows])
        ax.set_xlabel("seconds")
        ax.set_title("baseline cost, MNIST-32")

    write_results(out_dir, "baseline-speed", results, rows, plot, started=started)
    return results
