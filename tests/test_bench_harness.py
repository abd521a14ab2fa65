"""The side-by-side harness end to end on a tiny two-model, two-seed benchmark: outputs, floors, intervals,
resumption without retraining, and invalidation of only what a changed setting affects."""

import json
import os

import pytest

from diffaccel.bench.runner import RealSplit, run_benchmark
from diffaccel.bench.specs import Benchmark, ModelSpec, SamplerSpec

TINY_NET = {"preset": "tiny", "overrides": {"block_out_channels": [8, 16], "norm_num_groups": 4}}


def tiny_benchmark(ddim_steps: int = 2, ddpm_n: int = 8) -> Benchmark:
    ddim = SamplerSpec("DDIM", {"sampler": "ddim", "steps": ddim_steps, "eta": 0.0})
    return Benchmark(
        name="tiny", title="tiny", data="mnist5k", resolution=32, data_limit=300, steps=4, eval_every=2,
        n_samples=12, n_reference=100, extractors=("digits",), reference_model="A",
        train_defaults={"net": TINY_NET, "batch_size": 4, "lr": 1e-3, "ema_decay": 0.9},
        models=[ModelSpec("A", "baseline", {"N": 50}, samplers=(ddim,)),
                ModelSpec("B", "baseline", {"N": 50}, train={"batch_size": 8},
                          samplers=(ddim, SamplerSpec("DDPM", {"sampler": "ddpm"}, n=ddpm_n, final_only=True)))])


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    summary = run_benchmark(tiny_benchmark(), out, seeds=2, progress=False)
    return out, summary


def test_outputs_and_rows(finished):
    out, summary = finished
    for name in ("results.json", "results.md", "results.png", "samples_a_ddim.png", "samples_b_ddpm.png"):
        assert (out / name).is_file(), name
    rows = {(r["model"], r["sampler"]): r for r in summary["rows"]}
    assert set(rows) == {("A", "DDIM"), ("B", "DDIM"), ("B", "DDPM")}
    fid = rows[("A", "DDIM")]["fid[digits]"]
    assert fid.n == 2 and fid.half_width is not None and fid.half_width > 0
    assert rows[("B", "DDPM")]["n_samples"] == 8 and rows[("B", "DDPM")]["nfe"] == 50
    assert rows[("A", "DDIM")]["cost_sec_per_step"] > 0 and rows[("A", "DDIM")]["peak_train_memory_mb"] >= 0
    md = (out / "results.md").read_text()
    assert "real vs real (floor, 12 vs 100)" in md and "real vs real (floor, 8 vs 100)" in md
    data = json.loads((out / "results.json").read_text())
    assert data["rows"][0]["fid[digits]"]["n_seeds"] == 2
    # the curve has the intermediate point (step 2) and the final one (step 4), per seed averaged
    assert [p["step"] for p in summary["curves"]["A"]["fid[digits]"]] == [2, 4]


def test_floor_sets_are_disjoint_from_the_reference():
    import torch

    images = torch.arange(50).view(50, 1, 1, 1).expand(50, 1, 2, 2).contiguous()
    split = RealSplit(images, 30)
    ref = set(split.reference[:, 0, 0, 0].tolist())
    for seed in range(4):
        assert not ref & set(split.floor_set(10, seed)[:, 0, 0, 0].tolist())
    assert len(split.floor_set(100, 0)) == 20  # capped at the images left


def test_rerun_reuses_everything_and_a_final_sampler_change_only_resamples(finished):
    out, first = finished
    work = out / "work"
    trained = [work / m / f"seed{k}" / "trained.json" for m in ("a", "b") for k in (0, 1)]
    stamps = [p.stat().st_mtime_ns for p in trained]
    again = run_benchmark(tiny_benchmark(), out, seeds=2, progress=False)
    assert [p.stat().st_mtime_ns for p in trained] == stamps
    assert again["rows"][0]["fid[digits]"].mean == first["rows"][0]["fid[digits]"].mean
    evals = work / "b" / "seed0" / "evals"
    ddim_stamp = (evals / "ddim.json").stat().st_mtime_ns
    run_benchmark(tiny_benchmark(ddpm_n=6), out, seeds=2, progress=False)
    assert [p.stat().st_mtime_ns for p in trained] == stamps  # no retraining
    assert (evals / "ddim.json").stat().st_mtime_ns == ddim_stamp  # untouched sampler kept
    assert json.loads((evals / "ddpm.json").read_text())["n"] == 6


def test_the_curve_sampler_enters_the_training_key_and_a_final_only_sampler_does_not():
    """The curve logged along training is part of the training record: changing its sampler retrains."""
    from diffaccel.bench.specs import train_key

    base = tiny_benchmark()
    key = train_key(base, base.model("B"), 0, 4)
    assert train_key(tiny_benchmark(ddim_steps=3), tiny_benchmark(ddim_steps=3).model("B"), 0, 4) != key
    assert train_key(tiny_benchmark(ddpm_n=6), tiny_benchmark(ddpm_n=6).model("B"), 0, 4) == key


def test_interrupted_training_resumes(tmp_path):
    bench = tiny_benchmark()
    bench.models = bench.models[:1]
    run_benchmark(bench, tmp_path, seeds=1, progress=False)
    folder = tmp_path / "work" / "a" / "seed0"
    reference = json.loads((folder / "evals" / "ddim.json").read_text())["fid[digits]"]
    os.remove(folder / "trained.json")  # as if killed after the last checkpoint, before the marker
    for f in (folder / "evals").iterdir():
        f.unlink()
    run_benchmark(bench, tmp_path, seeds=1, progress=False)
    assert json.loads((folder / "evals" / "ddim.json").read_text())["fid[digits]"] == pytest.approx(reference)


def test_dry_run_plans_without_training(tmp_path, capsys):
    plan = run_benchmark(tiny_benchmark(), tmp_path, seeds=2, dry_run_only=True, progress=False)
    assert len(plan["plan"]) == 4 and all(r["status"] == "to train" for r in plan["plan"])
    assert plan["estimated_seconds"] > 0
    assert not (tmp_path / "work" / "a").exists()
    assert "estimated time left" in capsys.readouterr().out


def _result(steps, curve, final, sec=0.1):
    evals = [{"step": s, "curve_sampler": "S", "fid[digits]": v, "train_seconds": s * sec} for s, v in curve]
    return {"steps": steps, "evals": evals, "sec_per_step": sec, "train_seconds": steps * sec,
            "final": {"S": {"n": 10, "nfe": 5, "seconds_per_100_images": 1.0, "fid[digits]": final}}}


def test_summary_steps_to_reference_convergence_and_significance():
    from diffaccel.bench.summary import summarize

    s = SamplerSpec("S")
    bench = Benchmark(name="t", title="t", models=[ModelSpec("ref", "baseline", samplers=(s,)),
                                                   ModelSpec("fast", "baseline", samplers=(s,)),
                                                   ModelSpec("slow", "baseline", samplers=(s,))],
                      reference_model="ref", eval_every=100, steps=300)
    results = {}
    for k, jitter in enumerate((0.0, 0.2, -0.2)):
        results[("ref", k)] = _result(300, [(100, 50 + jitter), (200, 30 + jitter)], 31.0 + jitter)
        results[("fast", k)] = _result(300, [(100, 29 + jitter), (200, 25 + jitter)], 20.0 + jitter)
        results[("slow", k)] = _result(300, [(100, 60 + jitter), (200, 45 + jitter)], 35.0 + jitter)
    summary = summarize(bench, results, {}, seeds=3)
    rows = {r["model"]: r for r in summary["rows"]}
    assert rows["ref"]["still_improving"] is False and rows["fast"]["still_improving"] is True
    assert rows["fast"]["steps_to_reference_best"] == 100  # mean curve 29 <= ref best 30
    assert rows["slow"]["steps_to_reference_best"] == "not reached"
    assert rows["fast"]["vs_reference"] == "fid[digits]: better"
    assert rows["slow"]["vs_reference"] == "fid[digits]: worse"
    # a reference that is still improving gives no steps-to-reach figure
    for k in range(3):
        results[("ref", k)]["final"]["S"]["fid[digits]"] = 10.0 + k
    summary = summarize(bench, results, {}, seeds=3)
    assert {r["model"]: r for r in summary["rows"]}["fast"]["steps_to_reference_best"] == "reference still improving"


def _worker(out: str, seed: int | None) -> None:
    run_benchmark(tiny_benchmark(), out, seeds=2, progress=False, only_seed=seed)


def test_concurrent_workers_share_the_units_and_give_the_serial_results(finished, tmp_path):
    """Two processes on one work folder (setup under a lock, each (model, seed) claimed by one of them): a plain
    one, which writes the results, and one restricted to seed 1, which writes none; a rerun only summarises."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    workers = [ctx.Process(target=_worker, args=(str(tmp_path), k)) for k in (None, 1)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=600)
    assert [w.exitcode for w in workers] == [0, 0]
    assert (tmp_path / "results.json").is_file()
    trained = [tmp_path / "work" / m / f"seed{k}" / "trained.json" for m in ("a", "b") for k in (0, 1)]
    stamps = [p.stat().st_mtime_ns for p in trained]
    summary = run_benchmark(tiny_benchmark(), tmp_path, seeds=2, progress=False)
    assert [p.stat().st_mtime_ns for p in trained] == stamps  # nothing retrained
    serial = {(r["model"], r["sampler"]): r["fid[digits]"].mean for r in finished[1]["rows"]}
    assert {(r["model"], r["sampler"]): r["fid[digits]"].mean for r in summary["rows"]} == pytest.approx(serial)


def test_only_seed_outside_the_seeds_is_refused(tmp_path):
    from diffaccel.errors import UserError

    with pytest.raises(UserError, match="--only-seed must be one of"):
        run_benchmark(tiny_benchmark(), tmp_path, seeds=2, progress=False, only_seed=2)


def test_a_committed_work_folder_without_weights_resumes_without_retraining(tmp_path):
    """What git keeps of a work folder (no checkpoints): the rerun trains nothing and reports the same numbers."""
    bench = tiny_benchmark()
    bench.models = bench.models[:1]
    first, copy, _ = _clone_without_weights(bench, tmp_path)
    again = run_benchmark(bench, copy, seeds=1, progress=False)
    assert [r["fid[digits]"].mean for r in again["rows"]] == [r["fid[digits]"].mean for r in first["rows"]]
    assert not any(copy.rglob("checkpoints"))  # nothing was trained again


def _clone_without_weights(bench, tmp_path):
    import shutil

    first = run_benchmark(bench, tmp_path / "run", seeds=1, progress=False)
    copy = tmp_path / "clone"
    shutil.copytree(tmp_path / "run", copy, ignore=shutil.ignore_patterns("checkpoints", "claims", "*.lock"))
    evals = sorted((copy / "work").rglob("evals/*.json"))
    assert evals
    return first, copy, evals


def test_evaluations_left_without_weights_retrain_and_keep_records_the_new_run_replays(tmp_path):
    """A new final sampler on a record without weights: the network is trained again from its seed; the new run
    replays the recorded loss trace, so the stored evaluations are kept (not recomputed) and only the new one runs."""
    bench = tiny_benchmark()
    bench.models = bench.models[:1]
    first, copy, evals = _clone_without_weights(bench, tmp_path)
    stamps = [p.stat().st_mtime_ns for p in evals]
    bench.models[0].samplers += (SamplerSpec("DDIM-1", {"sampler": "ddim", "steps": 1}, final_only=True),)
    plan = run_benchmark(bench, copy, seeds=1, dry_run_only=True, progress=False)["plan"]
    assert [r["status"] for r in plan] == ["trained, no weights (trains again), 1 evaluation(s) to do"]
    again = run_benchmark(bench, copy, seeds=1, progress=False)
    assert any(copy.rglob("checkpoints"))  # trained again
    assert [p.stat().st_mtime_ns for p in evals] == stamps  # the stored evaluations were kept
    old = {r["sampler"]: r["fid[digits]"].mean for r in first["rows"]}
    new = {r["sampler"]: r["fid[digits]"].mean for r in again["rows"]}
    assert set(new) == set(old) | {"DDIM-1"}
    assert {k: new[k] for k in old} == old


def test_a_retrained_network_that_differs_discards_the_stored_evaluations(tmp_path):
    """If the new run does not replay the recorded loss trace (here the record is altered), every evaluation of
    that seed is computed again from the new network, so no row mixes two networks."""
    import json

    bench = tiny_benchmark()
    bench.models = bench.models[:1]
    _, copy, evals = _clone_without_weights(bench, tmp_path)
    stamps = [p.stat().st_mtime_ns for p in evals]
    metrics = next((copy / "work").rglob("run/metrics.jsonl"))
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    for r in records:
        if "loss" in r:
            r["loss"] += 1.0
    metrics.write_text("".join(json.dumps(r) + "\n" for r in records))
    bench.models[0].samplers += (SamplerSpec("DDIM-1", {"sampler": "ddim", "steps": 1}, final_only=True),)
    run_benchmark(bench, copy, seeds=1, progress=False)
    assert all(p.is_file() for p in evals)
    assert all(p.stat().st_mtime_ns != t for p, t in zip(evals, stamps))  # all recomputed
