"""The README's generated results table: built only from shared-harness results files, kept in sync."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from diffaccel.bench.overview import END, START, overview_markdown, overview_rows, update_readme
from diffaccel.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def _write(folder: Path, payload: dict) -> None:
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps(payload))


def _harness_payload(name: str, quick: bool = False) -> dict:
    iv = lambda m, hw: {"mean": m, "ci95_half_width": hw, "n_seeds": 3, "ci95": None}  # noqa: E731
    return {"benchmark": name, "quick": quick, "machine": {"device": "CPU: test"},
            "settings": {"primary": "fid[digits]"}, "floors": {"500": {"fid[digits]": iv(3.0, 0.5)}},
            "rows": [{"model": "A", "sampler": "DDIM-20", "nfe": 20, "steps": 100, "seeds": 3, "n_samples": 500,
                      "fid[digits]": iv(41.234, 2.5), "legible_rate": iv(0.81, 0.03),
                      "seconds_per_100_images": iv(12.0, None), "vs_reference": "reference"}]}


def test_only_full_harness_results_are_listed_with_interval_and_floor(tmp_path):
    _write(tmp_path / "a", _harness_payload("a"))
    _write(tmp_path / "a-quick", _harness_payload("a-quick", quick=True))       # smoke runs are not results
    _write(tmp_path / "old", {"models": [{"fid[effnet]": 2065}]})               # pre-harness format
    rows = overview_rows(tmp_path)
    assert [r["benchmark"] for r in rows] == ["a"]
    assert rows[0]["fid[digits]"] == "41.23 ± 2.5" and rows[0]["floor fid[digits]"] == "3 ± 0.5"
    assert rows[0]["legible rate"] == "0.81 ± 0.03" and rows[0]["s/100 img"] == "12"
    assert "41.23 ± 2.5" in overview_markdown(tmp_path)


def test_update_readme_rewrites_only_the_block_and_refuses_without_markers(tmp_path):
    _write(tmp_path / "results" / "a", _harness_payload("a"))
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{START}\nstale\n{END}\noutro\n")
    assert update_readme(readme, tmp_path / "results")
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("\noutro\n") and "stale" not in text and "41.23" in text
    assert not update_readme(readme, tmp_path / "results")  # idempotent
    readme.write_text("no markers\n")
    with pytest.raises(UserError, match="no generated block"):
        update_readme(readme, tmp_path / "results")


def test_committed_readme_table_matches_the_committed_results():
    text = (ROOT / "README.md").read_text()
    block = text.split(START, 1)[1].split(END, 1)[0].strip()
    assert block == overview_markdown(ROOT / "benchmarks" / "results").strip(), \
        "README results table is stale: run `diffaccel bench --update-readme`"
