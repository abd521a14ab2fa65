"""`bench pds-exact --quick`: files written, rows resumable, and the safeguard's effect visible in its rows."""

import json

from diffaccel.bench.pds_exact import run


def test_quick_exact_bench_writes_results_and_shows_the_safeguard(tmp_path):
    results = run(tmp_path, quick=True)
    for name in ("results.json", "results.md", "results.png"):
        assert (tmp_path / name).is_file()
    rows = {r["label"]: r for r in results["rows"]}
    assert all("sigma_ratio" in r for r in results["rows"] if r["family"] == "VE")
    # N = 5 (sigma ratio 4.7): the reference PDS overshoots the weak frequencies, the safeguard stops it
    for stem in ("PC-5", "Ancestral-5"):
        vanilla, ref, safe = (rows[f"{stem}{tail}"]["weak_power"] for tail in ("", " PDS a=5 no safeguard", " PDS a=5"))
        assert ref > 2 * vanilla and safe < 1.5 * vanilla
    # eta = 0 has no Langevin part: PDS leaves DDIM unchanged
    assert rows["DDIM-2 eta=0 PDS a=5"]["fd"] == rows["DDIM-2 eta=0"]["fd"]
    # a rerun reuses the stored rows
    stored = json.loads(next((tmp_path / "work").glob("PC-5_PDS_a5.json")).read_text())["row"]
    assert run(tmp_path, quick=True)["rows"][[r["label"] for r in results["rows"]].index("PC-5 PDS a=5")] == stored
