"""The README's table of measured results, generated from the committed ``benchmarks/results/*/results.json``.

Only benchmarks on the shared harness are listed (their results carry intervals over seeds and floors), so the
table cannot show a number that the results files do not hold. ``diffaccel bench --update-readme`` rewrites
the block between the two markers below and nothing else.
"""

from __future__ import annotations

import json
from pathlib import Path

from diffaccel.bench.stats import Interval
from diffaccel.errors import UserError

START, END = "<!-- benchmark-overview:start -->", "<!-- benchmark-overview:end -->"


def _interval(cell) -> str:
    """An interval as results.json stores it (``Interval.as_dict``), formatted like the results tables."""
    if not isinstance(cell, dict) or cell.get("mean") is None:
        return ""
    return Interval(cell["mean"], cell.get("ci95_half_width"), cell.get("n_seeds", 1)).format(digits=4)


def harness_results(root: Path) -> list[dict]:
    """Every full (not ``--quick``) shared-harness results.json under ``root``, by benchmark name."""
    found = []
    for path in sorted(Path(root).glob("*/results.json")):
        try:
            payload = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"{path}: unreadable results file ({e})") from None
        if isinstance(payload, dict) and "rows" in payload and "floors" in payload and not payload.get("quick"):
            found.append(payload)
    return found


def overview_rows(root: Path) -> list[dict]:
    rows = []
    for payload in harness_results(root):
        primary = payload["settings"]["primary"]
        floors = payload["floors"]
        for r in payload["rows"]:
            floor = floors.get(str(r["n_samples"]), {}).get(primary)
            rows.append({"benchmark": payload["benchmark"], "model": r["model"], "sampler": r["sampler"],
                         "NFE": r["nfe"], "steps": r["steps"], "seeds": r["seeds"], "samples": r["n_samples"],
                         primary: _interval(r.get(primary)), f"floor {primary}": _interval(floor),
                         "legible rate": _interval(r.get("legible_rate")),
                         "s/100 img": _interval(r.get("seconds_per_100_images")),
                         "vs reference": r.get("vs_reference", ""),
                         "machine": payload["machine"].get("device", "")})
    return rows


def overview_markdown(root: Path) -> str:
    from diffaccel.bench.harness import markdown_table

    rows = overview_rows(root)
    if not rows:
        return "No shared-harness results are committed yet."
    return (markdown_table(rows) + "\n\nMean ± half-width of the 95 % Student-t interval over the seeds; the floor "
            "is the same metric between two disjoint real sets of the same sizes. Each benchmark's "
            "`results.md` has every metric, the curves and the sample grids.")


def update_readme(readme: Path, root: Path) -> bool:
    """Replace the generated block of ``readme``; returns whether its text changed."""
    readme = Path(readme)
    try:
        text = readme.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{readme}: cannot read it ({e})") from None
    if START not in text or END not in text or text.index(START) > text.index(END):
        raise UserError(f"{readme} has no generated block: put the lines {START} and {END} where it goes")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    new = f"{head}{START}\n{overview_markdown(root)}\n{END}{tail}"
    if new != text:
        readme.write_text(new)
    return new != text
