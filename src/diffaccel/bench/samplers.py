"""`diffaccel bench samplers`: every sampler of the library on data whose score is known in closed form.

The data is the Gaussian fitted to MNIST (``mnist5k`` at 16×16, full 256×256 covariance; ``--quick``: scikit-learn's
8×8 digits). Every sampler runs unchanged on the exact network of its own process (``diffaccel.oracle``): the VP
ε* for DDPM / DDIM / KL / the preconditioned DDIM, DVDP's per-subspace ε* for DVDP and subspace diffusion, the VE
score for PC and annealed Langevin. What remains is the sampler's own error, measured in closed form against the
target: the Fréchet distance (Gaussian W2²) between the samples' moments and the target's, overall and per DCT
band (low / mid / high), and the produced / target variance per band. ``floor`` is the same metric for exact draws
from the target with as many samples (the finite-sample floor). Float64 throughout, one seed per row: deterministic.

``diffaccel bench samplers-t1``: the DVDP paper's turning-point sweep (§5.3, Fig. 4) on the same testbed: DVDP vs
subspace diffusion (fitted and noise-only jump) as T₁ moves from 100 to 900, sampled with DDIM-100 (η = 1).
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path

import torch

from diffaccel.bench.harness import write_results

FULL_NFE = (5, 7, 10, 15, 20, 30, 50, 100, 200, 1000)
QUICK_NFE = (5, 10, 100)
KL_MAX_NFE = 200          # KL's 1st variant evaluates M = 8 coefficients per step: its 1000-step row costs 8000
TURNING_POINT = 600
T = 1000


@contextlib.contextmanager
def _float64():
    # the samplers draw x_T and their noise in the default dtype; float32 alone loses 1-2 % of the variance
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


class Testbed:
    """The target N(mean, cov) over images of ``shape`` in [-1, 1] and the exact networks of every process."""

    def __init__(self, data: str, resolution: int | None, n: int):
        from diffaccel.data import load_dataset
        from diffaccel.methods.pds import build_preconditioner, representative_images
        from diffaccel.methods.score_ve import sigma_max_from_data
        from diffaccel.oracle.fit import fit_gaussian
        from diffaccel.oracle.gaussian_ve import GaussianVEScore
        from diffaccel.oracle.gaussian_vp import GaussianVPEpsilon
        from diffaccel.schedules import linear_schedule

        dataset = load_dataset(data, resolution)
        self.images = dataset.to_model_space(dataset.images).double()
        self.fit = fit_gaussian(self.images)
        self.mean, self.cov = self.fit.mean, self.fit.covariance()
        self.shape, self.n, self.data = tuple(self.images.shape[1:]), n, f"{data} {self.images.shape[-1]}²"
        self.alpha_bars = linear_schedule(T).double()
        self.vp = GaussianVPEpsilon(self.mean, self.cov, self.alpha_bars, self.shape)
        # VE runs in score_sde's model space [0, 1]: y = (x + 1)/2 has mean (m + 1)/2 and covariance S/4
        self.ve = GaussianVEScore((self.mean + 1) / 2, self.cov / 4)
        self.sigma_min, self.sigma_max = 0.01, sigma_max_from_data(dataset.images)
        self.pre = build_preconditioner(representative_images(dataset, 200), alpha=5.0)

    def metrics(self, x: torch.Tensor) -> dict:
        from diffaccel.metrics.fid import frechet_distance
        from diffaccel.oracle.bands import band_metrics

        flat = x.double().flatten(1)
        if not torch.isfinite(flat).all():
            return {"frechet": math.inf, "bands": None}
        h, w = self.shape[-2:]
        return {"frechet": frechet_distance(flat.mean(0), torch.cov(flat.T), self.mean, self.cov),
                "bands": band_metrics(flat, self.mean, self.cov, h, w)}


# --- the samplers: each (testbed, nfe, generator) -> (samples in [-1, 1], actual NFE) ------------------------------
def _ddpm(tb, nfe, g):
    """Ancestral DDPM on the grid respaced to ``nfe`` steps (same law as DDIM η = 1: a cross-check of the two)."""
    from diffaccel.oracle.gaussian_vp import GaussianVPEpsilon
    from diffaccel.samplers import ddim_timesteps, ddpm

    ks = ddim_timesteps(T, nfe)[::-1]
    ab = tb.alpha_bars[ks]
    net = GaussianVPEpsilon(tb.mean, tb.cov, ab, tb.shape)
    return ddpm(net, torch.randn((tb.n, *tb.shape), generator=g), ab, generator=g, progress=False), nfe


def _ddim(eta):
    def run(tb, nfe, g):
        from diffaccel.samplers import ddim

        return ddim(tb.vp, torch.randn((tb.n, *tb.shape), generator=g), tb.alpha_bars, nfe, eta, g,
                    progress=False), nfe
    return run


def _kl(tb, nfe, g):
    """KL eq. 24 on its own grid t_k = k/N (N = NFE, continuous VP schedule) with the exact coefficients
    E[Z_m | x] = √t·φ_m(t)/Σφ_j²·ε* (the method's 'posterior' gain applied to ε*): one batched call of M per step."""
    from diffaccel.methods.kl import KLDiffusion
    from diffaccel.oracle.gaussian_vp import GaussianVPEpsilon

    method = KLDiffusion(M=8, N=nfe, correction="posterior")
    exact = GaussianVPEpsilon(tb.mean, tb.cov, method.alpha_bars, tb.shape)

    def coefficient_net(x, tau):                 # tau = N(m − 1) + k: the grid index k is tau mod N in 1..N
        return exact(x, ((tau.round().long() - 1) % nfe + 1).double())

    return method.sample(coefficient_net, tb.n, tb.shape, generator=g, sampler="ddim", steps=nfe, eta=1.0,
                         progress=False), nfe


def _dvdp(name, allocation, jump="fitted", turning_point=TURNING_POINT):
    def run(tb, nfe, g):
        from diffaccel.methods.dvdp import DVDP, SubspaceDiffusion
        from diffaccel.oracle.dvdp_exact import DVDPExactEpsilon

        if name == "dvdp":
            method = DVDP((turning_point,), T=T)
        else:
            method = SubspaceDiffusion((turning_point,), T=T, jump=jump)
            if jump == "fitted":
                method.fit_detail_variance(tb.images)   # as training does, from the data
        net = DVDPExactEpsilon(method, tb.mean, tb.cov, tb.shape)
        x = method.sample(net, tb.n, tb.shape, generator=g, sampler="ddim", steps=nfe, eta=1.0, progress=False,
                          step_allocation=allocation)
        return x, nfe
    return run


def _pc(pds):
    def run(tb, nfe, g):
        from diffaccel.samplers_score import pc_sampler, ve_sigmas

        levels = max(1, nfe // 2)                 # one corrector and one predictor call per level
        y = pc_sampler(tb.ve, (tb.n, *tb.shape), ve_sigmas(tb.sigma_min, tb.sigma_max, levels), snr=0.16,
                       corrector_steps=1, preconditioner=tb.pre if pds else None, generator=g, dtype=torch.float64)
        return 2 * y - 1, 2 * levels
    return run


def _ald(pds):
    def run(tb, nfe, g):
        from diffaccel.samplers_score import ald_sampler, ve_sigmas

        levels = max(1, nfe - 1)                  # one Langevin step per level and the final denoising call
        y = ald_sampler(tb.ve, (tb.n, *tb.shape), ve_sigmas(tb.sigma_min, tb.sigma_max, levels), steps_each=1,
                        step_lr=2e-5, preconditioner=tb.pre if pds else None, generator=g, dtype=torch.float64)
        return 2 * y - 1, levels + 1
    return run


def _pds_ddim(tb, nfe, g):
    """The VP extension of PDS (``preconditioned_ddim``, η = 1), started from the exact prior N(0, I)."""
    from diffaccel.samplers import preconditioned_ddim

    return preconditioned_ddim(tb.vp, torch.randn((tb.n, *tb.shape), generator=g), tb.alpha_bars, nfe, eta=1.0,
                               preconditioner=tb.pre, generator=g), nfe


SAMPLERS = {
    "DDPM (respaced)": _ddpm,
    "DDIM η=0": _ddim(0.0),
    "DDIM η=1": _ddim(1.0),
    "KL eq. 24 (M=8)": _kl,
    "DVDP log-snr": _dvdp("dvdp", "log-snr"),
    "DVDP uniform": _dvdp("dvdp", "uniform"),
    "subspace uniform": _dvdp("subspace", "uniform"),
    "subspace log-snr": _dvdp("subspace", "log-snr"),
    "subspace uniform, noise-only jump": _dvdp("subspace", "uniform", jump="noise"),
    "VE PC": _pc(False),
    "VE PC + PDS": _pc(True),
    "annealed Langevin": _ald(False),
    "annealed Langevin + PDS": _ald(True),
    "preconditioned DDIM η=1 (VP PDS)": _pds_ddim,
}


def _run_rows(tb: Testbed, samplers: dict, levels, seed: int, log) -> list[dict]:
    rows = []
    with _float64():
        for label, fn in samplers.items():
            for nfe in levels:
                if label.startswith("KL") and nfe > KL_MAX_NFE:
                    continue
                start = time.time()
                x, actual = fn(tb, nfe, torch.Generator().manual_seed(seed))
                rows.append({"sampler": label, "nfe": actual, **tb.metrics(x), "seconds": round(time.time() - start, 2)})
                log(f"{label} NFE {actual}: Fréchet {rows[-1]['frechet']:.4g}")
    return rows


def _floor(tb: Testbed, seed: int) -> dict:
    return tb.metrics(tb.fit.sample(tb.n, generator=torch.Generator().manual_seed(seed + 1)))


def _fmt(v: float) -> str:
    return "inf" if not math.isfinite(v) else f"{v:.3g}"


def _tables(rows: list[dict], floor: dict, show_nfe) -> tuple[list[dict], str]:
    """The Fréchet table (sampler × NFE) and a markdown table of per-band variance ratios at 10 / 20 / 50 NFE."""
    table = []
    for label in dict.fromkeys(r["sampler"] for r in rows):
        mine = {r["nfe"]: r for r in rows if r["sampler"] == label}
        entry = {"sampler": label}
        for nfe in show_nfe:
            near = min(mine, key=lambda k: abs(k - nfe))       # PC's NFE is even: 5 -> 4
            entry[f"NFE {nfe}"] = _fmt(mine[near]["frechet"]) + ("" if near == nfe else f" ({near})")
        table.append(entry)
    table.append({"sampler": "floor (exact draws)", **{f"NFE {nfe}": _fmt(floor["frechet"]) for nfe in show_nfe}})
    lines = ["| sampler | NFE | low | mid | high |", "|---|---|---|---|---|"]
    for r in rows:
        if r["nfe"] in (10, 20, 50) and r["bands"]:
            lines.append(f"| {r['sampler']} | {r['nfe']} | " + " | ".join(
                f"{r['bands'][b]['var_ratio']:.3f}" for b in ("low", "mid", "high")) + " |")
    return table, "\n".join(lines)


def _plot(rows: list[dict], floor: dict):
    def plot(fig):
        labels = list(dict.fromkeys(r["sampler"] for r in rows))
        cmap = __import__("matplotlib").colormaps["tab20"]
        markers = "o^sv<>Dxph*+1P"
        axes = [fig.add_subplot(2, 2, i + 1) for i in range(4)]
        for i, label in enumerate(labels):
            mine = [r for r in rows if r["sampler"] == label and math.isfinite(r["frechet"])]
            style = dict(color=cmap((2 * i) % 20 + (2 * i) // 20), marker=markers[i % len(markers)], ms=3, lw=1.1,
                         ls="--" if "PDS" in label or "noise" in label else "-")
            axes[0].plot([r["nfe"] for r in mine], [r["frechet"] for r in mine], label=label, **style)
            for ax, band in zip(axes[1:], ("low", "mid", "high")):
                ax.plot([r["nfe"] for r in mine], [r["bands"][band]["var_ratio"] for r in mine], **style)
        axes[0].axhline(floor["frechet"], color="k", lw=0.8, ls=":", label="floor (exact draws)")
        axes[0].set(xscale="log", yscale="log", xlabel="NFE", ylabel="Fréchet distance (W2²) to target",
                    title="all bands")
        for ax, band in zip(axes[1:], ("low", "mid", "high")):
            ax.axhline(1, color="k", lw=0.8, ls=":")
            ax.axhspan(0.9, 1.1, color="0.9")
            ax.set(xscale="log", yscale="log", xlabel="NFE", ylabel="produced / target variance",
                   title=f"{band} DCT band", ylim=(1e-2, 1e2))
        axes[0].legend(fontsize=6, ncol=2, loc="upper right")
    return plot


def _setting(quick: bool) -> tuple[str, int | None, int, tuple[int, ...]]:
    return ("digits", None, 1000, QUICK_NFE) if quick else ("mnist5k", 16, 1500, FULL_NFE)


def _goal(rows: list[dict]) -> dict:
    """The issue's goal at 10 / 20 / 50 NFE: DVDP (its default allocation) within 10 % of the target variance in
    every band, and its Fréchet distance no worse than DDPM's at equal NFE."""
    out = {}
    for nfe in (10, 20, 50):
        dvdp = next((r for r in rows if r["sampler"] == "DVDP log-snr" and r["nfe"] == nfe), None)
        ddpm = next((r for r in rows if r["sampler"] == "DDPM (respaced)" and r["nfe"] == nfe), None)
        if dvdp and ddpm and dvdp["bands"]:
            out[str(nfe)] = {"bands_within_10pct": all(abs(b["var_ratio"] - 1) <= 0.1 for b in dvdp["bands"].values()),
                             "frechet_dvdp": dvdp["frechet"], "frechet_ddpm": ddpm["frechet"],
                             "dvdp_no_worse": dvdp["frechet"] <= ddpm["frechet"]}
    return out


def run(out_dir: Path, quick: bool = False, log=print) -> dict:
    started = time.time()
    data, resolution, n, levels = _setting(quick)
    tb = Testbed(data, resolution, n)
    seed = 0
    rows = _run_rows(tb, SAMPLERS, levels, seed, log)
    floor = _floor(tb, seed)
    show = (5, 10, 100) if quick else (5, 10, 20, 50, 100, 1000)
    table, ratio_md = _tables(rows, floor, show)
    goal = _goal(rows)
    notes = (f"Target: the Gaussian fitted to {tb.data} (full covariance, d = {tb.mean.numel()}); {n} samples per "
             f"row, seed {seed}, float64, every sampler on its process's exact network. Entries: Fréchet distance "
             f"(Gaussian W2²) between sample moments and the target, lower is better; the floor is that of {n} exact "
             f"draws. VP rows: linear schedule T = {T}; DVDP / subspace: T₁ = {TURNING_POINT} ({tb.shape[-1]}² → "
             f"{tb.shape[-1] // 2}²), DDIM η = 1, the subspace jump's detail variance fitted to the data; KL: M = 8 "
             f"coefficients per step in one batched call, its grid t_k = k/NFE, up to NFE {KL_MAX_NFE}; VE: σ ∈ "
             f"[{tb.sigma_min}, {tb.sigma_max:.2f}] (max pairwise distance in [0, 1]), PC snr 0.16 with one "
             f"corrector step (NFE = 2·levels, so odd NFE are run one lower), annealed Langevin one step per level "
             f"with step_lr 2e-5 and the final denoising step; PDS: data frequency filter, α = 5. "
             f"Machine: 2-core CPU container, one core (taskset -c 1).\n\n"
             f"Produced / target variance per DCT band at 10, 20 and 50 NFE:\n\n{ratio_md}\n\n"
             f"Goal (DVDP log-snr within 10 % in every band and Fréchet no worse than DDPM's at equal NFE): "
             + "; ".join(f"NFE {k}: bands {'yes' if v['bands_within_10pct'] else 'no'}, "
                         f"Fréchet {v['frechet_dvdp']:.3g} vs DDPM {v['frechet_ddpm']:.3g} "
                         f"({'yes' if v['dvdp_no_worse'] else 'no'})" for k, v in goal.items()))
    results = {"data": tb.data, "dimension": tb.mean.numel(), "n_samples": n, "seed": seed, "nfe_levels": list(levels),
               "rows": rows, "floor": floor, "goal": goal, "table": table,
               "settings": {"T": T, "turning_point": TURNING_POINT, "kl_max_nfe": KL_MAX_NFE,
                            "sigma_min": tb.sigma_min, "sigma_max": tb.sigma_max}}
    write_results(out_dir, "samplers", results, table, _plot(rows, floor), notes, started, figsize=(12, 9))
    return results


# --- the DVDP paper's turning-point sweep (§5.3, Fig. 4) ---------------------------------------------------------
T1_GRID = (100, 200, 300, 400, 500, 600, 700, 800, 900)
T1_NFE = 100


def run_t1_sweep(out_dir: Path, quick: bool = False, log=print) -> dict:
    """DVDP vs subspace diffusion (fitted and noise-only jump) at every T₁ of ``T1_GRID``, exact ε*, DDIM η = 1
    with each method's default step allocation (DVDP log-snr, subspace uniform); also each row's cost in
    full-resolution network evaluations (a call at half resolution counts ¼)."""
    started = time.time()
    data, resolution, n, _ = _setting(quick)
    tb = Testbed(data, resolution, n)
    grid, nfe, seed = ((300, 600), 20, 0) if quick else (T1_GRID, T1_NFE, 0)
    from diffaccel.methods.dvdp import DVDP

    variants = {"DVDP": ("dvdp", "log-snr", "fitted"), "subspace (fitted jump)": ("subspace", "uniform", "fitted"),
                "subspace (noise-only jump)": ("subspace", "uniform", "noise")}
    rows = []
    with _float64():
        for t1 in grid:
            for label, (name, allocation, jump) in variants.items():
                x, _ = _dvdp(name, allocation, jump, turning_point=t1)(tb, nfe, torch.Generator().manual_seed(seed))
                cost = DVDP((t1,), T=T).relative_cost("ddim", nfe, allocation)
                rows.append({"method": label, "T1": t1, "nfe": nfe, "full_res_nfe": round(cost, 2), **tb.metrics(x)})
                log(f"{label} T1={t1}: Fréchet {rows[-1]['frechet']:.4g}")
    floor = _floor(tb, seed)
    table = [{"T1": t1, **{f"{label} Fréchet": _fmt(r["frechet"]) for label in variants
                           for r in rows if r["T1"] == t1 and r["method"] == label},
              **{f"{label} high-band ratio": f"{r['bands']['high']['var_ratio']:.3f}" for label in variants
                 for r in rows if r["T1"] == t1 and r["method"] == label and r["bands"]},
              "full-res NFE (DVDP)": next(r["full_res_nfe"] for r in rows if r["T1"] == t1 and r["method"] == "DVDP"),
              "full-res NFE (subspace)": next(r["full_res_nfe"] for r in rows
                                              if r["T1"] == t1 and r["method"].startswith("subspace"))}
             for t1 in grid]

    def plot(fig):
        ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
        for label in variants:
            mine = [r for r in rows if r["method"] == label]
            ax1.plot([r["T1"] for r in mine], [r["frechet"] for r in mine], marker="o", label=label)
            ax2.plot([r["T1"] for r in mine], [r["bands"]["high"]["var_ratio"] for r in mine], marker="o", label=label)
        ax1.axhline(floor["frechet"], color="k", ls=":", lw=0.8, label="floor (exact draws)")
        ax1.set(yscale="log", xlabel="turning point T₁", ylabel="Fréchet distance (W2²) to target",
                title=f"DDIM-{nfe}, η = 1, exact ε*")
        ax2.axhline(1, color="k", ls=":", lw=0.8)
        ax2.set(xlabel="turning point T₁", ylabel="produced / target variance, high DCT band")
        ax1.legend(fontsize=8)

    notes = (f"The DVDP paper's §5.3 sweep on the exact-score testbed: the Gaussian fitted to {tb.data}, {n} samples "
             f"per row, seed {seed}, float64; DDIM-{nfe} (η = 1) with DVDP's log-snr and subspace diffusion's uniform "
             f"step allocation; 'full-res NFE' counts a half-resolution call as ¼. Fréchet floor of {n} exact draws: "
             f"{floor['frechet']:.3g}. Machine: 2-core CPU container, one core (taskset -c 1).")
    results = {"data": tb.data, "n_samples": n, "seed": seed, "nfe": nfe, "rows": rows, "floor": floor,
               "table": table}
    write_results(out_dir, "samplers-t1", results, table, plot, notes, started, figsize=(11, 4.5))
    return results
