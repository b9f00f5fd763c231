"""Run-level warnings read off the logged metrics rows, whatever the prior: likelihood displacement.

DPO-family losses only see the margin between the chosen and the rejected response, so a policy can widen the
margin while lowering the likelihood of both (likelihood displacement): the probability mass goes to responses
in neither set. The signal is read from the prior-independent log-ratios against the reference
(`logratio/chosen`, `logratio/rejected`, `logratio/margins`, mean nats per sequence), which start where the
policy starts and do not move with the lengths a batch happens to hold; without a reference (no cache, a
reference-free prior) the raw `logps/*` are read instead, against their first logged values.
"""
from __future__ import annotations

import math

SIGNALS = (("logratio/chosen", "logratio/rejected", "logratio/margins"),   # against the reference (preferred)
           ("logps/chosen", "logps/rejected", None))                       # the raw sums: margin = chosen - rejected


class Displacement:
    """Warns once per run when, for `patience` logged rows in a row, both the chosen and the rejected log-probs
    sit `nats` or more below where they started while the margin between them sits `nats` or more above.

    Each metrics prefix ("" for training rows, "eval/" for held-out ones) keeps its own starting point (its
    first finite row): held-out rows score the same pairs every time, training rows a new batch each."""

    PREFIXES = ("", "eval/")

    def __init__(self, nats: float, patience: int = 2):
        self.nats, self.patience = nats, patience
        self.start: dict[str, tuple] = {}
        self.streak = dict.fromkeys(self.PREFIXES, 0)
        self.warned = False

    def __call__(self, row: dict) -> list[str]:
        if self.warned or self.nats <= 0:
            return []
        for prefix in self.PREFIXES:
            now = _read(row, prefix)
            if now is None:
                continue
            signal, values = now
            first = self.start.setdefault(prefix, now)
            if first[0] != signal:                               # the reference came or went: start over
                self.start[prefix], self.streak[prefix] = now, 0
                continue
            chosen, rejected, margin = (v - v0 for v, v0 in zip(values, first[1]))
            moved = chosen <= -self.nats and rejected <= -self.nats and margin >= self.nats
            self.streak[prefix] = self.streak[prefix] + 1 if moved else 0
            if self.streak[prefix] >= self.patience:
                self.warned = True
                return [self._message(row.get("step"), prefix, signal, chosen, rejected, margin)]
        return []

    def _message(self, step, prefix: str, signal: str, chosen: float, rejected: float, margin: float) -> str:
        where = "held-out" if prefix else "training"
        against = "the reference's" if signal == "logratio" else "their first logged values"
        return (f"likelihood displacement at step {step} ({where} pairs): the policy's log-probs of the chosen "
                f"({chosen:+.2f} nats) and of the rejected responses ({rejected:+.2f}) both fell below "
                f"{against} while the margin grew ({margin:+.2f}, {prefix}{signal}/*): the preference is being "
                "learnt by pushing both down, which moves probability to responses in neither set. Try a larger "
                "prior scale (e.g. prior.beta), a lower optimizer.lr or fewer trainer.max_steps, a prior that "
                "keeps the chosen likelihood (compare with `midpo train --multirun prior=...`), or check for "
                f"pairs whose two responses are nearly the same (trainer.displacement_nats={self.nats:g} sets "
                "this warning's threshold; 0 turns it off)")


def _read(row: dict, prefix: str) -> tuple[str, tuple[float, float, float]] | None:
    """(signal name, (chosen, rejected, margin)) from a row's first complete, finite signal; None if none."""
    for chosen, rejected, margin in SIGNALS:
        values = [row.get(prefix + chosen), row.get(prefix + rejected)]
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
            continue
        m = row.get(prefix + margin) if margin else values[0] - values[1]
        if isinstance(m, (int, float)) and math.isfinite(m):
            return chosen.split("/")[0], (values[0], values[1], m)
    return None
