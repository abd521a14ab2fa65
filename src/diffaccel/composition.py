"""Which accelerations stack: method × space × sampler option, read from the method classes themselves.

A cell is supported when the method's own flags take it (``--autoencoder`` among its training flags for the
latent space, ``--pds`` among its sampling flags) and the method does not refuse the pair; otherwise the reason
is the method's ``composition_notes`` entry or a generic one. ``tests/test_composition.py`` runs every
supported cell and checks that every unsupported one is refused with one line, so the table cannot drift from
the code; ``python -m diffaccel.composition`` prints it for docs/architecture.md.
"""

from __future__ import annotations

import argparse

SPACES = ("pixel", "latent")
OPTIONS = ("plain", "pds")
GENERATIVE = ("baseline", "kl", "dvdp", "subspace", "score-ve", "ddgan", "lddgan")


def _flags(register) -> set[str]:
    group = argparse.ArgumentParser(add_help=False).add_argument_group()
    register(group)
    return set(group._option_string_actions)


def cell(method: str, space: str, option: str) -> tuple[bool, str]:
    """(supported, reason) of training ``method`` in ``space`` and sampling it with ``option``."""
    from diffaccel.methods import method_class

    cls = method_class(method)
    notes = getattr(cls, "composition_notes", {})
    latent_flag = "--autoencoder" in _flags(cls.add_arguments)
    latent_only = getattr(cls, "latent_only", False)
    if space == "pixel" and latent_only:
        return False, notes.get("pixel", f"{method} is defined on latents only")
    if space == "latent" and not latent_flag:
        return False, notes.get("latent", f"{method} has no --autoencoder setting yet")
    if option == "pds":
        if "--pds" not in _flags(cls.add_sample_arguments):
            return False, notes.get("pds", f"{method} has no preconditioned sampler")
        if f"{space}+pds" in notes:
            return False, notes[f"{space}+pds"]
    return True, ""


def table() -> list[dict]:
    return [{"method": m, "space": s, "sampler": o, "supported": ok, "reason": why}
            for m in GENERATIVE for s in SPACES for o in OPTIONS for ok, why in [cell(m, s, o)]]


def markdown() -> str:
    lines = ["| method | pixel | pixel + PDS | latent | latent + PDS |", "|---|---|---|---|---|"]
    for m in GENERATIVE:
        cells = []
        for s in SPACES:
            for o in OPTIONS:
                ok, why = cell(m, s, o)
                cells.append("yes" if ok else f"no: {why}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown())
