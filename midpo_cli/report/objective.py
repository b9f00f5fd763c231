"""The number a sweeper optimises: one held-out metric of a finished run, chosen by `trainer.objective`.

`midpo train` returns it from its task function (Hydra's Optuna sweeper reads that return value).
Keys are the sweep table's column names without `final/`:
- `eval/<metric>`: the last held-out preference metrics (metrics.jsonl / results.json `final`), e.g.
  `eval/rewards/accuracies` (the prior's own reward: comparable within a prior, not across priors),
  `eval/logratio/margins` (prior-independent, needs the reference), `eval/logps/margin`, `eval/loss`;
- `task/<metric>` (a task with a true reward, e.g. dataset=builtin or sentiment): sampled responses on held-out prompts, e.g.
  `task/true_reward`, `task/true_reward_gain` (minus the same seed's reference), `task/win_rate`.
"""
from __future__ import annotations

import math

# key: the direction that is better. Other keys of results.json's `final` work too; give the direction yourself.
OBJECTIVES = {
    "eval/rewards/accuracies": "maximize",   # held-out preference accuracy of the prior's own reward
    "eval/rewards/margins": "maximize",      # ... its margin (prior-specific units)
    "eval/logratio/margins": "maximize",     # prior-independent held-out log-ratio margin (nats)
    "eval/logps/margin": "maximize",         # log pi(y_w|x) - log pi(y_l|x) on held-out pairs (nats)
    "eval/loss": "minimize",                 # held-out loss of the prior's own objective
    "task/true_reward": "maximize",          # built-in task: mean true reward of sampled responses (0-1)
    "task/true_reward_gain": "maximize",     # ... minus the same seed's reference policy
    "task/win_rate": "maximize",             # ... win-rate against the reference's samples
    "task/exact": "maximize",                # ... fraction of exact answers
}
TASK_KEYS = {"task/true_reward": "true_reward/policy", "task/win_rate": "win_rate", "task/exact": "exact/policy",
             "task/kl": "kl/policy_ref", "task/length": "length/policy"}


def direction(key: str) -> str:
    """maximize | minimize for a known objective; a ValueError that lists them for another key."""
    if key not in OBJECTIVES:
        raise ValueError(f"trainer.objective='{key}' has no known direction; use one of {sorted(OBJECTIVES)} "
                         "or give it: hydra.sweeper.direction=maximize|minimize")
    return OBJECTIVES[key]


def value(results: dict, key: str) -> float | None:
    """The objective of a run's results.json, or None when the run lacks it or it is not finite."""
    final, task = results.get("final") or {}, results.get("eval") or {}
    if key == "task/true_reward_gain" and task:
        v = task.get("true_reward/policy", math.nan) - task.get("true_reward/reference", math.nan)
    elif key in TASK_KEYS:
        v = task.get(TASK_KEYS[key])
    elif key.endswith("logps/margin"):
        pre = key[:-len("logps/margin")]
        v = final.get(f"{pre}logps/chosen", math.nan) - final.get(f"{pre}logps/rejected", math.nan)
    else:
        v = final.get(key)
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None


def available(results: dict) -> list[str]:
    """The objective keys a run's results offer (for error messages)."""
    return sorted(k for k in {*OBJECTIVES, *(results.get("final") or {})} if value(results, k) is not None)


def of_job(ret) -> float | None:
    """A sweep job's objective (a Hydra JobReturn): its return value when it finished with a finite number."""
    from hydra.core.utils import JobStatus

    v = ret.return_value if ret.status == JobStatus.COMPLETED else None
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None
