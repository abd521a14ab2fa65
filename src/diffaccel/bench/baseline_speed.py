"""Baseline cost on MNIST-32 with the small UNet: training seconds per step (batch 16 and 128) and DDIM-20
sampling seconds per image. The reference point every method's speed claim is measured against.

Beside it, diffaccel's own overhead, with the mini UNet: DDIM-20 on 64 images against a plain loop over
``diffusers.DDIMScheduler.step`` (same betas, same network), and the trainer's step against a plain PyTorch loop
(same network, AdamW, gradient clipping; the trainer also keeps its EMA). The two sides alternate trial by
trial so that drift in a shared machine's load falls on both; the ratio reported is the median of the per-trial
ratios."""

from __future__ import annotations

import copy
import statistics
import tempfile
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


def _alternate(ours, plain, trials: int) -> dict:
    """Seconds of ``ours()`` and ``plain()`` in alternating trials (after one warm-up each), and the median ratio."""
    ours(), plain()
    a, b = [], []
    for _ in range(trials):
        for fn, into in ((ours, a), (plain, b)):
            t0 = time.perf_counter()
            fn()
            into.append(time.perf_counter() - t0)
    return {"ours_s": statistics.median(a), "plain_s": statistics.median(b),
            "ratio_median": statistics.median(x / y for x, y in zip(a, b)), "ratios": [x / y for x, y in zip(a, b)]}


def sampler_overhead(method: Baseline, net, n: int, steps: int, trials: int) -> dict:
    """diffaccel's DDIM(eta=1) against a plain loop over diffusers' DDIMScheduler with the same betas and network."""
    from diffusers import DDIMScheduler

    ab = method.alpha_bars
    betas = (1 - ab[1:] / ab[:-1]).numpy()
    scheduler = DDIMScheduler(num_train_timesteps=method.N, trained_betas=betas, timestep_spacing="trailing",
                              clip_sample=False, set_alpha_to_one=True)
    shape = (n, 1, 32, 32)

    def ours():
        with torch.inference_mode():
            method.sample(net, n, shape[1:], steps=steps, eta=1.0, generator=torch.Generator().manual_seed(0),
                          progress=False)

    def plain():
        g = torch.Generator().manual_seed(0)
        scheduler.set_timesteps(steps)
        with torch.inference_mode():
            x = torch.randn(shape, generator=g)
            for t in scheduler.timesteps:
                x = scheduler.step(net.unet(x, t).sample, t, x, eta=1.0, generator=g).prev_sample

    return _alternate(ours, plain, trials)


def trainer_overhead(method: Baseline, preset: str, net, data, batch: int, steps: int, trials: int) -> dict:
    """``Trainer.train_step`` (EMA included) against a plain loop: loss, backward, clip, AdamW step."""
    from diffaccel.train import TrainConfig, Trainer

    plain_net = copy.deepcopy(net)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(batch_size=batch, steps=10**6, out=str(Path(tmp) / "run"), device="cpu",
                          net={"preset": preset})
        trainer = Trainer(cfg, method, dataset=data, progress=False, log=lambda *_: None)
        trainer.nets["net"].load_state_dict(net.state_dict())
        opt = torch.optim.AdamW(plain_net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        g = torch.Generator().manual_seed(0)
        batches = [data.get_batch(torch.randint(len(data), (batch,), generator=g)) for _ in range(steps)]

        def ours():
            for x0 in batches:
                trainer.train_step(x0)
                trainer.step += 1

        def plain():
            for x0 in batches:
                opt.zero_grad(set_to_none=True)
                method.loss(plain_net, x0).backward()
                torch.nn.utils.clip_grad_norm_(plain_net.parameters(), cfg.max_grad_norm)
                opt.step()

        result = _alternate(ours, plain, trials)
    return {**result, "ours_s": result["ours_s"] / steps, "plain_s": result["plain_s"] / steps}


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
    # diffaccel's overhead against plain diffusers / PyTorch loops, with the mini UNet
    mini = build_unet("tiny" if quick else "mini", 1, 1, 32).eval()
    n_overhead, trials = (4, 2) if quick else (64, 5)
    sampler = sampler_overhead(method, mini, n_overhead, 2 if quick else 20, trials)
    mini.train()
    trainer = trainer_overhead(method, "tiny" if quick else "mini", mini, data, 4 if quick else 32, 2 if quick else 10, trials)
    overhead = [{"what": f"DDIM-{2 if quick else 20}, {n_overhead} images: diffaccel vs DDIMScheduler loop",
                 "ours (s)": sampler["ours_s"], "plain (s)": sampler["plain_s"], "ratio (median)": sampler["ratio_median"],
                 "goal": 1.03},
                {"what": f"train step, batch {4 if quick else 32}: Trainer (with EMA) vs plain PyTorch loop",
                 "ours (s)": trainer["ours_s"], "plain (s)": trainer["plain_s"], "ratio (median)": trainer["ratio_median"],
                 "goal": 1.05}]
    results = {"preset": "tiny" if quick else "small", "parameters": count_parameters(net),
               "torch_threads": torch.get_num_threads(), "rows": rows,
               "overhead": {"preset": "tiny" if quick else "mini", "trials": trials, "sampler": sampler,
                            "trainer": trainer, "rows": overhead}}
    from diffaccel.bench.harness import markdown_table

    notes = ("## diffaccel overhead against plain loops (same network; sides alternate, median of per-trial "
             "ratios)\n\n" + markdown_table(overhead))

    def plot(fig):
        ax = fig.add_subplot(111)
        ax.barh([r["what"] for r in rows], [r["seconds"] for r in rows])
        ax.set_xlabel("seconds")
        ax.set_title("baseline cost, MNIST-32")

    write_results(out_dir, "baseline-speed", results, rows, plot, notes=notes, started=started)
    return results
