"""The composition table is the code's behaviour: every supported cell trains and samples, every other is refused."""

import numpy as np
import pytest
from PIL import Image

from diffaccel.cli import main
from diffaccel.composition import table

TINY = ["--data", "digits", "--resolution", "16", "--data-limit", "32", "--preset", "tiny", "--batch-size", "4",
        "--steps", "2", "--log-every", "1", "--checkpoint-every", "2", "--sample-every", "0", "--device", "cpu"]
METHOD_FLAGS = {"kl": ["--kl-terms", "3", "--time-steps", "20"], "score-ve": ["--num-scales", "4"],
                "baseline": ["--time-steps", "20"], "lddgan": [], "ddgan": [], "dvdp": [], "subspace": []}
SAMPLE_FLAGS = {"baseline": ["--steps", "2"], "kl": ["--steps", "2"], "dvdp": ["--steps", "3"],
                "subspace": ["--steps", "3"]}
CELLS = table()


@pytest.fixture(scope="module")
def autoencoder(tmp_path_factory):
    out = tmp_path_factory.mktemp("composition") / "ae"
    main(["train", "--method", "autoencoder", *TINY, "--ae-factor", "2", "--latent-channels", "2", "--out", str(out)])
    return out


@pytest.fixture(scope="module")
def trained(autoencoder):
    """Runs trained on demand, one per (method, space), shared by the plain and the PDS cells."""
    runs = {}

    def get(method, space):
        if (method, space) not in runs:
            out = autoencoder.parent / f"{method}-{space}"
            latent = ["--autoencoder", str(autoencoder)] if space == "latent" else []
            main(["train", "--method", method, *TINY, *METHOD_FLAGS[method], *latent, "--out", str(out)])
            runs[method, space] = out
        return runs[method, space]

    return get


def _refused(argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.mark.slow  # about twenty tiny trainings
@pytest.mark.parametrize("cell", CELLS, ids=lambda c: f"{c['method']}-{c['space']}-{c['sampler']}")
def test_every_cell_runs_or_is_refused_in_one_line(cell, trained, autoencoder, tmp_path, capsys):
    method, space, option = cell["method"], cell["space"], cell["sampler"]
    pds = ["--pds"] if option == "pds" else []
    grid = tmp_path / "grid.png"
    sample = ["sample", "--n", "2", *SAMPLE_FLAGS.get(method, []), *pds, "--out", str(grid), "--device", "cpu"]
    if cell["supported"]:
        run = trained(method, space)
        main([*sample[:1], str(run), *sample[1:]])
        pixels = np.asarray(Image.open(grid))
        assert pixels.size and np.isfinite(pixels).all()
        return
    latent = ["--autoencoder", str(autoencoder)] if space == "latent" else []
    trains = next(c["supported"] for c in CELLS if (c["method"], c["space"], c["sampler"]) == (method, space, "plain"))
    if not trains:  # the space itself is refused at training, before any run directory exists
        out = tmp_path / "run"
        _refused(["train", "--method", method, *TINY, *METHOD_FLAGS[method], *latent, "--out", str(out)], capsys)
        assert not out.exists()
    else:  # the space trains; the sampler option is refused before sampling
        run = trained(method, space)
        capsys.readouterr()  # the training's own progress output
        _refused([*sample[:1], str(run), *sample[1:]], capsys)
        assert not grid.exists()


def test_the_table_names_a_reason_for_every_refusal():
    for c in CELLS:
        assert c["supported"] or len(c["reason"]) > 10, c
    supported = {(c["method"], c["space"], c["sampler"]) for c in CELLS if c["supported"]}
    assert {("baseline", "latent", "plain"), ("lddgan", "latent", "plain"), ("baseline", "pixel", "pds"),
            ("score-ve", "pixel", "pds")} <= supported
    assert ("ddgan", "pixel", "pds") not in supported and ("lddgan", "pixel", "plain") not in supported


def test_docs_carry_the_current_table():
    from pathlib import Path

    from diffaccel.composition import markdown

    docs = (Path(__file__).parent.parent / "docs" / "architecture.md").read_text()
    assert markdown() in docs, "regenerate the table in docs/architecture.md: python -m diffaccel.composition"
