"""Discriminator health: is a GAN's discriminator telling real from fake at all?

A dead discriminator outputs about the same logit for every input: its loss sits at 2·ln 2 and the generator
learns only from whatever other term it has (e.g. a reconstruction loss), while the run looks healthy. Every
discriminator in diffaccel logs its mean logit on real inputs (``{prefix}d_real``) and on fake inputs
(``{prefix}d_fake``) in each metrics record; this module judges those records, during training (one warning)
and afterwards (``diffaccel doctor``).
"""

from __future__ import annotations

from typing import Callable, Iterable

# |mean D(real) - mean D(fake)| below this many logits counts as "no signal" (a D loss within 5e-4 of 2 ln 2).
# Measured on a toy two-mode set (tests/test_gan_learns.py): a D that teaches its G keeps gaps of 0.005-0.02
# averaged over t (a GAN near equilibrium has small gaps, so this is a warning, not a verdict), while the D of
# the same GAN on data scaled to std 0.12, whose G learns nothing, sits at 3e-4-1e-3.
DEAD_GAP = 1e-3


def logit_gap(record: dict, prefix: str = "") -> float | None:
    real, fake = record.get(f"{prefix}d_real"), record.get(f"{prefix}d_fake")
    if not isinstance(real, (int, float)) or not isinstance(fake, (int, float)):
        return None
    return float(real) - float(fake)


def discriminator_prefixes(records: Iterable[dict]) -> list[str]:
    """The prefixes of every discriminator that logged logits in these records ("" for DDGAN's, "patch_" ...)."""
    found = []
    for record in records:
        for key in record:
            if key.endswith("d_real") and key[:-len("d_real")] not in found:
                found.append(key[:-len("d_real")])
    return found


class DiscriminatorMonitor:
    """Warns once when the logit gap stays below ``threshold`` for ``patience`` steps after ``warmup`` steps."""

    def __init__(self, prefix: str = "", name: str = "discriminator", threshold: float = DEAD_GAP,
                 patience: int = 1000, warmup: int = 500):
        self.prefix, self.name, self.threshold = prefix, name, float(threshold)
        self.patience, self.warmup = int(patience), int(warmup)
        self.dead_since: int | None = None
        self.warned = False

    def update(self, record: dict, log: Callable[[str], None]) -> None:
        gap, step = logit_gap(record, self.prefix), int(record.get("step", 0))
        if gap is None or self.patience <= 0 or step < self.warmup:
            return
        if abs(gap) >= self.threshold:
            self.dead_since = None
            return
        self.dead_since = step if self.dead_since is None else self.dead_since
        if not self.warned and step - self.dead_since >= self.patience:
            self.warned = True
            log(f"warning: the {self.name} looks dead: |D(real) - D(fake)| = {abs(gap):.3g} < {self.threshold} "
                f"logits since step {self.dead_since}; unless the samples are already good (a GAN at equilibrium "
                "has small gaps too), the generator is learning nothing from it: check the data scale (unit std), "
                "the learning rates and the R1 weight")


def logit_gaps(records: Iterable[dict], prefix: str = "") -> list[float]:
    """Every logged gap D(real) − D(fake) of the discriminator ``prefix``, oldest first."""
    return [g for g in (logit_gap(r, prefix) for r in records) if g is not None]


def mean_abs_gap(gaps: list[float]) -> float:
    return sum(abs(g) for g in gaps) / len(gaps)


def dead_discriminators(records: list[dict], threshold: float = DEAD_GAP, tail: int = 5) -> dict[str, float]:
    """{prefix: mean |gap| over the last ``tail`` records} for every discriminator whose recent gap is below threshold."""
    dead = {}
    for prefix in discriminator_prefixes(records):
        gaps = logit_gaps(records, prefix)[-tail:]
        if gaps and mean_abs_gap(gaps) < threshold:
            dead[prefix] = mean_abs_gap(gaps)
    return dead
