"""`make demo`'s benchmark at a tiny setting: it trains LDDGAN and reports, from the same run, its sampling time
against DDPM-1000's and its legible rate, next to the grid it drew."""

import json

from PIL import Image

from diffaccel.cli import main


def test_demo_reports_speedup_and_legible_rate_from_its_own_run(tmp_path, capsys):
    main(["bench", "demo", "--quick", "--out", str(tmp_path)])
    out = tmp_path / "demo-quick"
    results = json.loads((out / "results.json").read_text())
    assert results["lddgan_sample_s"] > 0 and results["ddpm1000_sample_s"] > 0
    assert results["speedup"] == results["ddpm1000_sample_s"] / results["lddgan_sample_s"]
    assert 0 <= results["legible_rate"] <= 1
    assert (out / "lddgan" / "config.yaml").is_file() and (out / "autoencoder" / "config.yaml").is_file()
    report = (out / "report.md").read_text()
    assert f"{results['speedup']:.0f}× faster" in report and f"{results['legible_rate']:.2f}" in report
    assert Image.open(out / "samples.png").size[0] > 32
