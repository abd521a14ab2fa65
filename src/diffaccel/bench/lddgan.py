"""LDDGAN sampling-speed benchmark on MNIST-32, side by side in one run (paper Table 3 and Table 6, small scale).

1. Autoencoder (f = 4, 4 latent channels) trained for a fixed wall-clock budget; reconstruction PSNR and
   FID[effnet] on held-out images; latent shift/scale computed from the data.
2. Four generative models, each trained for the same wall-clock budget on the same data and batch size:
   DDPM (foundation UNet, sampled with DDPM-1000 and DDIM-20), pixel DDGAN (T = 4), LDDGAN (T = 4), and the
   Weighted-Learning ablation of LDDGAN's generator loss (adv / adv+rec / adv+rec+wl; the last is "LDDGAN").
3. For each: NFE, seconds to sample a batch of 100 (decoder included), FID[effnet] / recall[effnet] of
   ``n_eval`` samples against real training images.

DDPM-1000 on a batch of 100 costs 1000 identical UNet calls; on a shared CPU that does not fit the budget, so its
time is the measured mean time of a few of those calls times 1000 (said so in the results), and its FID is not
measured (the same network's DDIM-20 FID is).
"""

from __future__ import annotations

import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from diffaccel.bench.harness import write_results
from diffaccel.data import ImageDataset, load_dataset, save_grid
from diffaccel.evaluate import score_images
from diffaccel.methods.autoencoder import AutoencoderMethod, evaluate_reconstruction
from diffaccel.methods.baseline import Baseline
from diffaccel.methods.ddgan import DDGAN, LDDGAN
from diffaccel.train import Trainer, TrainConfig

FULL = dict(data_limit=None, ae_budget=540.0, ae_batch=32, ae_lr=1e-3, budget=330.0, batch=64, n_eval=300,
            n_ref=1000, ae_holdout=500, timing_batch=100, timing_trials=2, ddpm_probe_calls=10,
            unet_widths=(16, 32), gan_preset="tiny", ae_preset="tiny")
QUICK = dict(data_limit=64, ae_budget=1.0, ae_batch=16, ae_lr=1e-3, budget=1.0, batch=16, n_eval=12, n_ref=32,
             ae_holdout=16, timing_batch=4, timing_trials=1, ddpm_probe_calls=1, unet_widths=(16, 32),
             gan_preset="tiny", ae_preset="tiny")


def _log(msg: str) -> None:
    print(f"[lddgan {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def train_for(cfg: TrainConfig, method, budget_s: float, dataset=None, probe_steps: int = 5
              ) -> tuple[Trainer, dict]:
    """Train with the project trainer until ``budget_s`` seconds of optimisation have passed.

    Methods whose loss depends on the run's length (Weighted Learning) are told the number of steps the budget
    allows, estimated from the first ``probe_steps`` steps.
    """
    t_init = time.perf_counter()
    tr = Trainer(cfg, method, dataset=dataset, progress=False, log=_log)
    init_s = time.perf_counter() - t_init
    method.on_train_start(cfg.steps)
    for net in tr.nets.values():
        net.train()
    t0 = time.perf_counter()
    losses: dict[str, list[float]] = {}
    planned = None
    while time.perf_counter() - t0 < budget_s and tr.step < cfg.steps:
        for name, value in tr.train_step(tr.stream.next()).items():
            losses.setdefault(name, []).append(value)
        tr.step += 1
        if tr.step == probe_steps:
            planned = max(probe_steps + 1, int(budget_s / ((time.perf_counter() - t0) / probe_steps)))
            method.on_train_start(planned)
    train_s = time.perf_counter() - t0
    tr.save()
    tail = {f"loss_{k}": statistics.fmean(v[-20:]) for k, v in losses.items() if v}
    return tr, {"steps": tr.step, "train_seconds": round(train_s, 1), "init_seconds": round(init_s, 1),
                "planned_steps": planned, **tail}


def _time_batch(fn, trials: int) -> float:
    """Mean wall time of ``fn()`` over ``trials`` runs after one warm-up run (LDDGAN paper's protocol)."""
    with torch.inference_mode():
        fn()
        times = []
        for _ in range(trials):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.fmean(times)


@torch.inference_mode()
def _generate(method, net, n: int, image_shape, seed: int, batch: int = 100, **options) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    out = [method.sample(net, min(batch, n - i), image_shape, generator=g, device="cpu", progress=False, **options)
           for i in range(0, n, batch)]
    return torch.cat(out).clamp(-1, 1)


def run(out_dir: Path, quick: bool = False, work_dir: Path | None = None) -> dict:
    started = time.time()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    P = QUICK if quick else FULL
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    own_work = work_dir is None
    work = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="diffaccel-lddgan-"))
    loaded = load_dataset("mnist5k", limit=P["data_limit"])
    # the bundled digits are sorted by class: shuffle once so held-out and reference sets hold every digit
    perm = torch.randperm(len(loaded), generator=torch.Generator().manual_seed(0))
    data = ImageDataset(loaded.images[perm], loaded.name)
    image_shape = data.shape
    real_ref = data.images[:P["n_ref"]]
    metric_opts = dict(kid_subset_size=min(1000, P["n_eval"], P["n_ref"]))

    def score(fake: torch.Tensor) -> dict:
        s = score_images(real_ref, fake, extractor="effnet", device="cpu", **metric_opts)
        return {"fid[effnet]": s["fid[effnet]"], "recall[effnet]": s["recall[effnet]"],
                "precision[effnet]": s["precision[effnet]"]}

    def cfg(name: str, preset_net: dict, **kw) -> TrainConfig:
        base = dict(data="mnist5k", data_limit=P["data_limit"], net=preset_net, batch_size=P["batch"], lr=2e-4,
                    steps=10**7, ema_decay=0.995, seed=0, out=str(work / name), log_every=50,
                    checkpoint_every=10**7, max_grad_norm=5.0, device="cpu")
        base.update(kw)
        return TrainConfig(**base)

    results: dict = {"settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in P.items()},
                     "dataset": "mnist5k (MNIST-32, 5000 images)" if not quick else "mnist5k (quick subset)",
                     "torch_threads": 1, "models": {}}
    grids: dict[str, torch.Tensor] = {}

    # 1. autoencoder ------------------------------------------------------------------------------------------
    _log("training the autoencoder")
    ae_method = AutoencoderMethod(factor=4, latent_channels=4, perceptual_weight=0.0, adv_weight=0.1,
                                  disc_start=0.5, holdout=P["ae_holdout"], l2_weight=1.0)
    tr, info = train_for(cfg("autoencoder", {"preset": P["ae_preset"]}, lr=P["ae_lr"],
                                 batch_size=P["ae_batch"]), ae_method, P["ae_budget"], dataset=data)
    ae_run = tr.run_dir
    ae = tr.ema["autoencoder"].module.eval()
    heldout = ae_method.heldout
    rec = evaluate_reconstruction(ae, heldout, "cpu", extractor="effnet")
    results["autoencoder"] = {**info, "factor": 4, "latent_channels": 4, "latent_shape": list(ae.latent_shape),
                              "heldout_psnr_db": rec["psnr"], "heldout_rfid[effnet]": rec["fid[effnet]"],
                              "heldout_n": rec["n"], "perceptual_weight": 0.0, "adv_weight": 0.1,
                              "l2_weight": 1.0}
    with torch.inference_mode():
        x = heldout[:8].float() / 127.5 - 1
        grids["autoencoder"] = torch.stack([x, ae(x)[0].clamp(-1, 1)], 1).flatten(0, 1)
    _log(f"autoencoder: {info['steps']} steps, held-out PSNR {rec['psnr']:.2f} dB, rFID {rec['fid[effnet]']:.2f}")
    del tr

    # 2. generative models, equal wall-clock budget ------------------------------------------------------------
    unet_net = {"preset": "tiny", "overrides": {"block_out_channels": list(P["unet_widths"])}}
    gan_net = {"preset": P["gan_preset"]}
    plans = [
        ("ddpm", Baseline(N=1000), unet_net),
        ("ddgan-pixel", DDGAN(T=4, gen_loss="adv"), gan_net),
        ("lddgan-adv", None, gan_net),
        ("lddgan-adv+rec", None, gan_net),
        ("lddgan", None, gan_net),  # adv+rec+wl: the paper's LDDGAN
    ]
    gen_losses = {"lddgan-adv": "adv", "lddgan-adv+rec": "adv+rec", "lddgan": "adv+rec+wl"}
    trained = {}
    for name, method, net_cfg in plans:
        if method is None:
            method = LDDGAN(autoencoder=str(ae_run), T=4, gen_loss=gen_losses[name])
        _log(f"training {name} for {P['budget']} s")
        tr, info = train_for(cfg(name, net_cfg), method, P["budget"], dataset=data)
        net = tr.ema[method.sampling_network].module.eval()
        trained[name] = (method, net)
        results["models"][name] = {"train": info, "parameters": sum(p.numel() for p in net.parameters())}
        _log(f"{name}: {info}")
        del tr

    # 3. evaluation ---------------------------------------------------------------------------------------------
    rows = []
    evals = [("DDPM-1000", "ddpm", {"sampler": "ddpm"}), ("DDIM-20", "ddpm", {"sampler": "ddim", "steps": 20}),
             ("DDGAN (pixel)", "ddgan-pixel", {}), ("LDDGAN adv", "lddgan-adv", {}),
             ("LDDGAN adv+rec", "lddgan-adv+rec", {}), ("LDDGAN adv+rec+WL", "lddgan", {})]
    for label, key, opts in evals:
        method, net = trained[key]
        entry: dict = {"label": label, "model": key, "nfe": method.nfe(**opts)}
        if label == "DDPM-1000":
            # 1000 identical network calls: time some, extrapolate (the whole loop does not fit a shared CPU)
            x = torch.randn(P["timing_batch"], *image_shape)
            t = torch.full((P["timing_batch"],), 500.0)
            per_call = _time_batch(lambda: net(x, t), P["ddpm_probe_calls"])
            entry.update({"sec_per_100": per_call * 1000, "timing": f"extrapolated: mean of "
                          f"{P['ddpm_probe_calls']} UNet calls x 1000"})
        else:
            entry["sec_per_100"] = _time_batch(
                lambda: method.sample(net, P["timing_batch"], image_shape, generator=torch.Generator().manual_seed(1),
                                      device="cpu", progress=False, **opts), P["timing_trials"])
            entry["timing"] = f"measured: mean of {P['timing_trials']} batches after a warm-up"
            fake = _generate(method, net, P["n_eval"], image_shape, seed=123, **opts)
            entry.update(score(fake))
            grids[label] = fake[:16]
        if isinstance(method, LDDGAN):
            dec = method.autoencoder("cpu")
            z = torch.randn(P["timing_batch"], *dec.latent_shape)
            entry["decoder_sec_per_100"] = _time_batch(lambda: dec.decode_scaled(z), P["timing_trials"])
        scale = 100 / P["timing_batch"]  # quick mode times smaller batches
        for k in ("sec_per_100", "decoder_sec_per_100"):
            if k in entry:
                entry[k] *= scale
        rows.append(entry)
        _log(f"{label}: {entry}")
    results["rows"] = rows

    by = {r["label"]: r for r in rows}
    ld, px, ddpm = by["LDDGAN adv+rec+WL"], by["DDGAN (pixel)"], by["DDPM-1000"]
    results["claims"] = {
        "speedup_vs_ddpm1000": ddpm["sec_per_100"] / ld["sec_per_100"],
        "speedup_vs_pixel_ddgan": px["sec_per_100"] / ld["sec_per_100"],
        "speedup_vs_ddim20": by["DDIM-20"]["sec_per_100"] / ld["sec_per_100"],
        "fid_lddgan_le_pixel": ld["fid[effnet]"] <= px["fid[effnet]"],
        "recall_lddgan_ge_pixel": ld["recall[effnet]"] >= px["recall[effnet]"],
        "goal_500x_vs_ddpm1000": ddpm["sec_per_100"] / ld["sec_per_100"] >= 500,
        "goal_1.5x_vs_pixel_ddgan": px["sec_per_100"] / ld["sec_per_100"] >= 1.5,
    }

    # 4. outputs -------------------------------------------------------------------------------------------------
    table = [{"model": r["label"], "NFE": r["nfe"], "s / 100 images": r["sec_per_100"],
              "FID[effnet]": r.get("fid[effnet]"), "recall[effnet]": r.get("recall[effnet]"),
              "precision[effnet]": r.get("precision[effnet]"),
              "train steps": results["models"][r["model"]]["train"]["steps"],
              "train s": results["models"][r["model"]]["train"]["train_seconds"]} for r in rows]

    def plot(fig):
        ax1, ax2 = fig.add_subplot(121), fig.add_subplot(122)
        for r in rows:
            if "fid[effnet]" in r:
                ax1.scatter(r["sec_per_100"], r["fid[effnet]"])
                ax1.annotate(r["label"], (r["sec_per_100"], r["fid[effnet]"]), fontsize=7)
        ax1.axvline(ddpm["sec_per_100"], ls="--", c="gray")
        ax1.annotate("DDPM-1000 time\n(FID not measured)", (ddpm["sec_per_100"], ax1.get_ylim()[1]), fontsize=7,
                     ha="right", va="top")
        ax1.set_xscale("log")
        ax1.set_xlabel("seconds per 100 images (log)")
        ax1.set_ylabel("FID[effnet] (lower is better)")
        ax1.set_title("speed vs quality", fontsize=9)
        abl = [by[k] for k in ("LDDGAN adv", "LDDGAN adv+rec", "LDDGAN adv+rec+WL")]
        pos = range(len(abl))
        ax2.bar([p - 0.2 for p in pos], [r["fid[effnet]"] for r in abl], 0.4, label="FID[effnet]")
        ax2b = ax2.twinx()
        ax2b.bar([p + 0.2 for p in pos], [r["recall[effnet]"] for r in abl], 0.4, color="C1", label="recall")
        ax2.set_xticks(list(pos), ["adv", "adv+rec", "adv+rec+WL"], fontsize=8)
        ax2.set_ylabel("FID[effnet]")
        ax2b.set_ylabel("recall[effnet]")
        ax2.set_title("Weighted Learning ablation (LDDGAN)", fontsize=9)

    notes = [
        f"Equal wall-clock training budget of {P['budget']} s per model (batch {P['batch']}, 1 torch thread; the "
        "same budget buys different step counts for different models — that is the comparison). The "
        "autoencoder's own training "
        f"({results['autoencoder']['train_seconds']} s) and the one-off latent encoding are not counted.",
        f"FID[effnet] / recall[effnet]: {P['n_eval']} samples against {P['n_ref']} real training images "
        "(small-sample FID is biased upwards; compare rows, not with published numbers).",
        "DDPM-1000 time is extrapolated from timed UNet calls; its FID was not measured (DDIM-20 uses the same "
        "network).",
        f"Autoencoder: held-out PSNR {results['autoencoder']['heldout_psnr_db']:.2f} dB, reconstruction "
        f"FID[effnet] {results['autoencoder']['heldout_rfid[effnet]']:.2f} on {results['autoencoder']['heldout_n']}"
        " held-out images.",
    ]
    write_results(out_dir, "lddgan", results, table, plot, notes="\n\n".join(notes), started=started)
    order = ["autoencoder"] + [lbl for lbl, _, _ in evals if lbl in grids]
    save_grid(torch.cat([grids[k][:16] for k in order]), out_dir / "samples.png", nrow=16)
    (out_dir / "samples.md").write_text("Rows of `samples.png`, top to bottom: autoencoder (original, "
                                        "reconstruction pairs), " + ", ".join(order[1:]) + ".\n")
    if own_work:
        shutil.rmtree(work, ignore_errors=True)
    return json.loads((out_dir / "results.json").read_text())
