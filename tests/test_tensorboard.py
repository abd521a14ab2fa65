"""--log-with tensorboard: the event files mirror metrics.jsonl, scalar for scalar, across a resume."""

import shutil

import pytest

from diffaccel.cli import main
from diffaccel.runs import read_metrics

TINY = ["--data", "digits", "--resolution", "16", "--preset", "tiny", "--batch-size", "8", "--time-steps", "50",
        "--log-every", "2", "--checkpoint-every", "3", "--sample-every", "2", "--log-with", "tensorboard"]


def _events(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def test_scalars_and_grids_match_metrics_jsonl_across_a_resume(tmp_path):
    run = tmp_path / "run"
    main(["train", "--method", "baseline", *TINY, "--steps", "4", "--out", str(run)])
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    # as if interrupted after step 4 was logged but before its checkpoint: the resume repeats step 4
    shutil.rmtree(run / "checkpoints" / "step_0000004")
    main(["train", "--resume", "--out", str(run), "--steps", "6"])

    records = [r for r in read_metrics(run) if "loss" in r]
    assert [r["step"] for r in records] == [2, 4, 6]
    acc = _events(run)
    keys = {k for r in records for k in r if k != "step"}
    assert keys >= {"loss", "lr", "sec_per_step"} and keys <= set(acc.Tags()["scalars"])
    for key in keys:
        logged = [(e.step, e.value) for e in acc.Scalars(key)]  # one value per step: the repeated step 4 purged
        expected = [(r["step"], r[key]) for r in records]
        assert [s for s, _ in logged] == [s for s, _ in expected], key
        assert [v for _, v in logged] == pytest.approx([v for _, v in expected], rel=1e-6), key
    assert [e.step for e in acc.Images("samples")] == [2, 4, 6]


@pytest.mark.parametrize("name, message", [("wandbx", "--log-with must be one of: tensorboard"),
                                           ("tensorboard", "not installed")])
def test_unknown_or_missing_tracker_is_one_line_before_work(name, message, tmp_path, capsys, monkeypatch):
    from diffaccel import validation

    if message == "not installed":
        monkeypatch.setitem(validation.TRACKERS, "tensorboard", ("no_such_tracker_module", "diffaccel[tensorboard]"))
    with pytest.raises(SystemExit) as e:
        main(["train", "--data", "digits", "--log-with", name, "--steps", "1", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()
