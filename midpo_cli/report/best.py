"""What `+experiment=tune` (midpo_cli/sweeps/tune.py) leaves in its sweep directory, besides the sweep table:

tune_best.json  per prior: the searched keys' best values (and defaults), the objective on the search seed,
                trials finished/run, the best job, and the confirm runs (seeds, objective, jobs)
tune_best.md    the same as tables: best setting per prior; priors each at its best setting (confirm seeds,
                mean±std: the fair comparison of priors); the commands that rerun them with more seeds
"""
from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

import pandas as pd

from midpo_cli.console import console
from midpo_cli.report import tables
from midpo_cli.report.objective import of_job as score

RERUN_SEEDS = "0,1,2,3,4"


def run_dir(ret: Any) -> Path:
    return Path(ret.hydra_cfg.hydra.runtime.output_dir)


def _number(text: str) -> float | str:
    try:
        return float(text)
    except ValueError:
        return text


def setting(ret: Any, keys: list[str]) -> dict[str, float | str]:
    """The searched keys' values in a job's overrides, e.g. {"prior.beta": 0.0731}."""
    pairs = dict(o.split("=", 1) for o in ret.overrides if "=" in o)
    return {k: _number(pairs[k]) for k in keys if k in pairs}


def short(v: Any) -> str:
    """4 significant digits for a number (beta, lr), the text otherwise."""
    return f"{v:.4g}" if isinstance(v, float) else "" if v is None else str(v)


def summary(objective: str, direction: str, studies: dict, winners: dict, confirm: dict, plan: dict,
            sweep_dir: Path) -> dict:
    """tune_best.json's content (see the module docstring)."""
    def job(ret) -> str:
        return tables.job_name(run_dir(ret), sweep_dir)

    priors = {}
    for p, rets in studies.items():
        w, keys = winners.get(p), plan[p]["keys"]
        values = [score(r) for r in confirm.get(p, [])]
        ok = [v for v in values if v is not None]
        priors[p] = {"best": setting(w, keys) if w else None, "default": plan[p]["defaults"],
                     "search": plan[p]["space"], "value": score(w) if w else None, "job": job(w) if w else None,
                     "trials": len(rets), "finished": sum(score(r) is not None for r in rets),
                     "confirm": {"values": values, "mean": sum(ok) / len(ok) if ok else None,
                                 "jobs": [job(r) for r in confirm.get(p, [])]}}
    return {"objective": objective, "direction": direction, "priors": priors}


def rerun_commands(best: dict, fixed: list[str], sweep_dir: Path) -> list[str]:
    """One `midpo train --multirun` per prior at its best setting with more seeds, then one report."""
    lines = []
    for p, entry in best["priors"].items():
        if entry["best"] is None:
            continue
        args = [f"prior={p}", *(f"{k}={v}" for k, v in entry["best"].items()), f"seed={RERUN_SEEDS}", *fixed,
                f"hydra.sweep.dir={sweep_dir / 'rerun' / p}"]
        lines.append("midpo train --multirun " + " ".join(shlex.quote(a) for a in args))
    return lines + [f"midpo report {shlex.quote(str(sweep_dir / 'rerun'))}"]


def comparison(best: dict, winners: dict, confirm: dict, sweep_dir: Path) -> tuple[pd.DataFrame, str]:
    """The pivot of priors each at its best setting: the confirm runs (or, without any, the best trials)."""
    runs = {p: rets for p, rets in confirm.items() if rets} or {p: [w] for p, w in winners.items() if w}
    label = {p: " ".join([p, *(f"{k}={short(v)}" for k, v in (e["best"] or {}).items())])
             for p, e in best["priors"].items()}
    rows = [dict(tables.read_run(run_dir(r), sweep_dir), group=label[p]) for p, rets in runs.items() for r in rets]
    if not rows:
        return pd.DataFrame(), ""
    df = pd.DataFrame(rows)
    seeds = sorted({int(s) for s in df["seed"].dropna()})
    note = (f"confirm seeds {', '.join(map(str, seeds))}: mean±std over seeds" if confirm else
            f"the best trials themselves (search seed {', '.join(map(str, seeds))}): optimistic, no confirm seeds")
    return tables.pivot(tables.aggregate(df), tables.summary_columns(df)), note


def write(sweep_dir: Path, objective: str, direction: str, studies: dict, winners: dict, confirm: dict,
          fixed: list[str], plan: dict) -> list[Path]:
    """tune_best.json and tune_best.md in the sweep directory; prints the tables and the rerun commands."""
    best = summary(objective, direction, studies, winners, confirm, plan, sweep_dir)
    keys = sorted({k for p in plan.values() for k in p["keys"]})
    table = pd.DataFrame([{"prior": p, **{k: short((e["best"] or {}).get(k)) for k in keys},
                           **{f"{k} default": short(e["default"].get(k)) for k in keys},
                           f"{objective} (search seed)": e["value"], "trials ok": f"{e['finished']}/{e['trials']}",
                           "best job": e["job"] or "none finished"} for p, e in best["priors"].items()])
    pivot, note = comparison(best, winners, confirm, sweep_dir)
    commands = rerun_commands(best, fixed, sweep_dir)
    md = [f"# midpo tune: {sweep_dir}", "",
          f"Objective: `{objective}` ({direction}). Each prior searched around its own default "
          "(search ranges in tune_best.json).", "",
          "## Best setting per prior", "", tables.markdown(table), ""]
    if not pivot.empty:
        md += [f"## Priors each at its best setting ({note})", "", tables.markdown(pivot), ""]
    md += ["## Rerun the best settings with more seeds", "", "```", *commands, "```", ""]
    paths = [sweep_dir / "tune_best.json", sweep_dir / "tune_best.md"]
    paths[0].write_text(json.dumps(best, indent=2))
    paths[1].write_text("\n".join(md))
    tables.print_table(table, f"tune: best setting per prior ({objective}, {direction})")
    if not pivot.empty:
        tables.print_table(pivot, f"priors each at its best setting: {note}")
    console.print("rerun with more seeds:\n  " + "\n  ".join(commands) +
                  f"\ntune results: {paths[0]}, {paths[1]}", highlight=False, soft_wrap=True)
    return paths
