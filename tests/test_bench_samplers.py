"""`diffaccel bench samplers --quick` and its T1 sweep: the tables' structure and claims that could fail."""

import json

import torch

from diffaccel.bench import benchmark_function
from diffaccel.bench.samplers import QUICK_NFE, SAMPLERS, _ddim, _run_rows
from diffaccel.bench.samplers import Testbed as SamplerTestbed


def test_quick_table_structure_and_exact_score_claims(tmp_path):
    out = tmp_path / "samplers"
    result = benchmark_function("samplers")(out, quick=True, log=lambda *_: None)
    for f in ("results.json", "results.md", "results.png"):
        assert (out / f).is_file()
    assert json.loads((out / "results.json").read_text())["machine"]["cpu_cores"] >= 1
    table = result["table"]
    assert [r["sampler"] for r in table] == [*SAMPLERS, "floor (exact draws)"]
    assert all(set(r) == {"sampler", *(f"NFE {k}" for k in QUICK_NFE)} for r in table)
    rows = {(r["sampler"], r["nfe"]): r for r in result["rows"]}
    for r in result["rows"]:
        assert set(r["bands"]) == {"low", "mid", "high"} and r["frechet"] >= 0
    # exact epsilon: 100 DDPM steps are far closer to the target than 10, and fill every band to within 15 %
    # (measured 0.90 in the high band: ancestral steps with the posterior variance under-disperse)
    assert rows["DDPM (respaced)", 100]["frechet"] < 0.3 * rows["DDPM (respaced)", 10]["frechet"]
    for name, band in rows["DDPM (respaced)", 100]["bands"].items():
        assert abs(band["var_ratio"] - 1) < 0.15
        assert band["var_ratio"] > rows["DDPM (respaced)", 10]["bands"][name]["var_ratio"]
    # ancestral DDPM on the respaced grid and DDIM eta=1 are the same chain through two code paths (same draws)
    for nfe in QUICK_NFE:
        assert abs(rows["DDPM (respaced)", nfe]["frechet"] - rows["DDIM η=1", nfe]["frechet"]) < 1e-8
    # KL eq. 24 on exact coefficients aggregates back to the exact epsilon: DDIM eta=1 on the KL grid, not worse
    # than the linear-schedule DDIM by more than a factor 2 at any NFE
    for nfe in QUICK_NFE:
        assert rows["KL eq. 24 (M=8)", nfe]["frechet"] < 2 * rows["DDIM η=1", nfe]["frechet"]
    assert "Goal" in (out / "results.md").read_text()


def test_rows_are_deterministic_given_the_seed():
    tb = SamplerTestbed("digits", None, 200)
    first = _run_rows(tb, {"DDIM η=1": _ddim(1.0)}, (5,), 3, lambda *_: None)
    again = _run_rows(tb, {"DDIM η=1": _ddim(1.0)}, (5,), 3, lambda *_: None)
    other = _run_rows(tb, {"DDIM η=1": _ddim(1.0)}, (5,), 4, lambda *_: None)
    assert first[0]["frechet"] == again[0]["frechet"] != other[0]["frechet"]
    assert torch.get_default_dtype() == torch.float32        # the float64 sampling context is undone


def test_t1_sweep_quick(tmp_path):
    result = benchmark_function("samplers-t1")(tmp_path / "t1", quick=True, log=lambda *_: None)
    assert [r["T1"] for r in result["table"]] == [300, 600]
    by = {(r["method"], r["T1"]): r for r in result["rows"]}
    assert len(by) == 6
    # a later turning point keeps more steps at full resolution: it costs more
    assert by["DVDP", 600]["full_res_nfe"] > by["DVDP", 300]["full_res_nfe"]
    # the fitted jump adds the dropped data variance: its high band holds more variance than noise only
    for t1 in (300, 600):
        assert (by["subspace (fitted jump)", t1]["bands"]["high"]["var_ratio"]
                > by["subspace (noise-only jump)", t1]["bands"]["high"]["var_ratio"])
    assert (tmp_path / "t1" / "results.png").is_file()
