"""The number a sweeper optimises: one held-out metric of a finished run, chosen by `trainer.objective`.

`midpo train` returns it from its task function (Hydra's Optuna sweeper reads that return value).
Keys are the sweep table's column names without `final/`:
- `eval/<metric>`: the last held-out preference metrics (metrics.jsonl / results.json `final`), e.g.
  `eval/rewards/accuracies` (the prior's own reward: comparable within a prior, not across priors),
  `eval/logratio/margins` (prior-independent, needs the reference), `eval/logps/margin`, `eval/loss`;
- `task/<name>`: a metric the run's task declares (Task.metrics: its evaluation of sampled responses on
  held-out prompts), `task/<name>_ref` its reference's value, and `task/<headline>_gain` the task's headline
  metric minus the same seed's reference; the direction is the declared one.
"""
from __future__ import annotations

import math

from midpo_cli.tasks import TASKS, Metric, metrics_of, source_of

# key: the direction that is better. Other keys of results.json's `final` work too; give the direction yourself.
OBJECTIVES = {
    "eval/rewards/accuracies": "maximize",   # held-out preference accuracy of the prior's own reward
    "eval/rewards/margins": "maximize",      # ... its margin (prior-specific units)
    "eval/logratio/margins": "maximize",     # prior-independent held-out log-ratio margin (nats)
    "eval/logps/margin": "maximize",         # log pi(y_w|x) - log pi(y_l|x) on held-out pairs (nats)
    "eval/loss": "minimize",                 # held-out loss of the prior's own objective
}
DIRECTIONS = {"max": "maximize", "min": "minimize"}


def task_columns(metrics: tuple[Metric, ...]) -> dict[str, tuple[Metric, str]]:
    """{`task/<name>` column: (metric, what of it)} of a task's metrics; what = policy | reference | gain."""
    out = {}
    for m in metrics:
        out[f"task/{m.name}"] = (m, "policy")
        if m.reference:
            out[f"task/{m.name}_ref"] = (m, "reference")
            if m.headline:
                out[f"task/{m.name}_gain"] = (m, "gain")
    return out


def task_value(ev: dict, m: Metric, what: str) -> float | None:
    """One `task/...` column of a run's evaluation (`eval` of results.json)."""
    pol, ref = ev.get(m.key), ev.get(m.reference) if m.reference else None
    if what == "gain":
        return pol - ref if isinstance(pol, (int, float)) and isinstance(ref, (int, float)) else None
    return pol if what == "policy" else ref


def declared_metrics(source: str | None) -> tuple[Metric, ...]:
    """The metrics of the task `source`; of every registered task (first declaration of a name) when `source` is
    not a registered task (results without dataset.source, a plug-in not loaded)."""
    if source in TASKS:
        return metrics_of(source)
    return tuple({m.name: m for cls in reversed(list(TASKS.values())) for m in cls.metrics}.values())


def direction(key: str, source: str | None = None) -> str:
    """maximize | minimize for a known objective (`source`: the run's task, whose declared metrics give the
    `task/...` directions); a ValueError that lists them for another key."""
    tasks = {c: DIRECTIONS[m.direction] for c, (m, what) in task_columns(declared_metrics(source)).items()
             if m.direction and what != "reference"}
    known = {**OBJECTIVES, **tasks}
    if key not in known:
        raise ValueError(f"trainer.objective='{key}' has no known direction; use one of {sorted(known)} "
                         "or give it: hydra.sweeper.direction=maximize|minimize")
    return known[key]


def value(results: dict, key: str) -> float | None:
    """The objective of a run's results.json, or None when the run lacks it or it is not finite."""
    final, ev = results.get("final") or {}, results.get("eval") or {}
    columns = task_columns(declared_metrics(source_of(results.get("config"))))
    if key in columns:
        v = task_value(ev, *columns[key])
    elif key.endswith("logps/margin"):
        pre = key[:-len("logps/margin")]
        v = final.get(f"{pre}logps/chosen", math.nan) - final.get(f"{pre}logps/rejected", math.nan)
    else:
        v = final.get(key)
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None


def available(results: dict) -> list[str]:
    """The objective keys a run's results offer (for error messages)."""
    keys = {*OBJECTIVES, *task_columns(declared_metrics(source_of(results.get("config")))), *(results.get("final") or {})}
    return sorted(k for k in keys if value(results, k) is not None)


def of_job(ret) -> float | None:
    """A sweep job's objective (a Hydra JobReturn): its return value when it finished with a finite number."""
    from hydra.core.utils import JobStatus

    v = ret.return_value if ret.status == JobStatus.COMPLETED else None
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None
