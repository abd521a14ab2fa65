"""`bench fid-sanity --quick`: both extractors side by side, floors first, monotone in blur."""

from diffaccel.bench.fid_sanity import run


def test_quick_fid_sanity_reports_digits_and_effnet(tmp_path):
    results = run(tmp_path, quick=True)
    for extractor in ("effnet", "digits"):
        checks = results["checks"][extractor]
        assert checks["monotone_in_blur"] and checks["noise_is_worst"] and checks["real_halves_lowest"]
    floor, noise = results["rows"][0], results["rows"][-1]
    assert floor["legible rate"] > 0.9 and noise["legible rate"] < 0.05
    assert "FID[digits]" in (tmp_path / "results.md").read_text()
