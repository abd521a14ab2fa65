"""`diffaccel bench stack`: the rows it compares, its dominance verdicts, and a quick end-to-end run."""

import pytest

from diffaccel.bench.stack import REFERENCE, dominance_rows, run


def _results(per_row: dict) -> dict:
    """Synthetic per-(model, seed) results: per_row[(label, sampler)] = (fids, legibles, seconds)."""
    out = {}
    for (label, sampler), (fids, legible, seconds) in per_row.items():
        for seed, (f, l, s) in enumerate(zip(fids, legible, seconds)):
            final = out.setdefault((label, seed), {"final": {}, "sec_per_step": 0.1})["final"]
            final[sampler] = {"fid[digits]": f, "legible_rate": l, "recall[digits]": 0.5, "seconds_per_100_images": s}
    return out


def test_a_stack_dominates_only_when_faster_and_better_beyond_the_intervals():
    rows = dominance_rows(_results({
        REFERENCE: ([100, 102, 101], [0.50, 0.52, 0.51], [2.0, 2.0, 2.0]),
        ("Latent KL-2nd", "DDIM-20"): ([80, 81, 79], [0.60, 0.61, 0.62], [1.0, 1.0, 1.0]),       # better, faster
        ("Latent DVDP", "DDIM-20"): ([100, 103, 99], [0.50, 0.53, 0.50], [1.0, 1.0, 1.0]),       # faster, n.s.
        ("Latent DDPM", "PDS-DDIM-10"): ([70, 71, 72], [0.40, 0.41, 0.39], [1.0, 1.0, 1.0]),     # FID better, legible worse
    }))
    by = {r["stack"]: r for r in rows}
    kl, dvdp, pds = by["Latent KL-2nd, DDIM-20"], by["Latent DVDP, DDIM-20"], by["Latent DDPM, PDS-DDIM-10"]
    assert kl["dominates"] and kl["fid[digits]"] == "better" and kl["sampling speed-up"] == pytest.approx(2.0)
    assert not dvdp["dominates"] and dvdp["fid[digits]"] == "n.s."
    assert not pds["dominates"] and (pds["fid[digits]"], pds["legible_rate"]) == ("better", "worse")


def test_quick_stack_writes_its_table_and_pareto_plot(tmp_path):
    summary = run(tmp_path, quick=True, seeds=1)
    assert {(r["model"], r["sampler"]) for r in summary["rows"]} >= {
        ("DDPM", "DDIM-20"), ("Latent DDPM", "DDIM-20"), ("Latent DDPM", "PDS-DDIM-10"), ("Latent DDPM", "DDIM-10"),
        ("Latent KL-2nd", "DDIM-20"), ("Latent DVDP", "DDIM-20"), ("LDDGAN", "T=4")}
    assert (tmp_path / "pareto.png").is_file() and (tmp_path / "results.md").is_file()
    assert len(summary["extra"]["dominance"]) == 3
    assert "Stacked rows against latent DDPM" in (tmp_path / "results.md").read_text()
