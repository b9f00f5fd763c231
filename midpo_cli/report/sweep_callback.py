"""End of every `midpo train --multirun`: the sweep table (a row per job) in the sweep directory.

Registered under `hydra.callbacks` in conf/train.yaml; it runs in the launching process after every job has
returned, whichever launcher ran them (basic, joblib, submitit local or SLURM), and reads only the sweep
directory, so `midpo report DIR` rebuilds the same rows later. Writes sweep_table.csv / .parquet / .md,
prints a summary (failed, unfinished and reused jobs named), and exits 1 (after writing) when a job did
not finish, so scripts and CI see it. In a search (`+experiment=tune`) a failed trial is part of the
search: it exits 1 only when a prior has no finished trial at all (tune_best.json).

When the launcher itself raises before every job has returned (a joblib worker killed, a submitit job that
died or ran out of requeues), Hydra never calls on_multirun_end; `midpo train` then calls `after_launcher_failure`,
which writes the same table from the sweep directory (the jobs that did not return are rows: incomplete or not
started) and exits 1.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig


def is_search(config: DictConfig) -> bool:
    """Any sweeper but Hydra's basic grid sweeper (the Optuna sweeper, midpo's tune sweeper)."""
    return not str(config.hydra.sweeper.get("_target_", "")).endswith("BasicSweeper")


def unsearched(sweep_dir: Path) -> list[str]:
    """Priors of a tune sweep with no finished trial (from tune_best.json)."""
    try:
        priors = json.loads((sweep_dir / "tune_best.json").read_text())["priors"]
    except (OSError, ValueError, KeyError):
        return []
    return [p for p, e in priors.items() if e.get("best") is None]


_unfinished: DictConfig | None = None                           # the sweep running in this process, until its end


def after_launcher_failure() -> None:
    """The sweep stopped before on_multirun_end (the launcher raised: its error is printed above): write the
    table of what the sweep directory holds, as on_multirun_end would. Nothing when no sweep had started jobs."""
    global _unfinished
    config, _unfinished = _unfinished, None
    sweep_dir = None if config is None else Path(config.hydra.sweep.dir)
    if sweep_dir is None or not sweep_dir.is_dir() or \
            not any(p.is_dir() and not p.name.startswith(".") for p in sweep_dir.iterdir()):
        return
    from midpo_cli import console
    console.error("the sweep stopped before its end (the error is above: e.g. the launcher lost a job whose process "
                  "was killed); the sweep table lists what the sweep directory holds, and the same command "
                  "finishes the rest")
    try:
        SweepTable().on_multirun_end(config)
    except SystemExit:                                               # the sweep exits 1 either way
        pass


class SweepTable(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        global _unfinished
        _unfinished = config

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        global _unfinished
        _unfinished = None
        from midpo_cli import console
        from midpo_cli.report import tables                        # deferred: single runs never need pandas

        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            df = tables.collect([sweep_dir]) if sweep_dir.is_dir() else None
            if df is None or df.empty:
                console.error(f"sweep table: no job directories under {sweep_dir}")
                raise SystemExit(1)
            paths = tables.write_table(df, sweep_dir, "sweep_table")
        except Exception as e:                                        # Hydra would turn it into a warning
            console.error(f"sweep table not written: {type(e).__name__}: {e}")
            raise SystemExit(1) from e
        tables.print_table(tables.sweep_summary(df), f"sweep {sweep_dir}: {len(df)} jobs")
        console.console.print(f"sweep table: {', '.join(str(p) for p in paths)}\n"
                              f"report and plots: midpo report {sweep_dir}", highlight=False, soft_wrap=True)
        reused = df[df["reused"]]
        if not reused.empty:
            console.console.print(f"{len(reused)} of {len(df)} jobs reused the finished results already in their "
                                  f"directory, not retrained (job {', '.join(reused['job'])}; reused.json)",
                                  highlight=False, soft_wrap=True)
        if (sweep_dir / "tune_best.md").exists():
            console.console.print(f"best setting per prior and the comparison: {sweep_dir / 'tune_best.md'}",
                                  highlight=False, soft_wrap=True)
        bad, missing = df[df["status"] != "ok"], unsearched(sweep_dir)
        if missing:                                                   # trials ran, none returned the objective
            console.error(f"tune: no trial of prior {', '.join(missing)} returned trainer.objective="
                          f"{config.trainer.objective} (see each trial's train.log and error.json)")
        if bad.empty:
            if missing:
                raise SystemExit(1)
            return
        states = ", ".join(f"{n} {s}" for s, n in bad["status"].value_counts().items())
        where = (f"job {', '.join(bad['job'])}; errors: the error column of {paths[0]} and each job's error.json, "
                 f"logs: each job's train.log" + (" and .submitit/" if (sweep_dir / ".submitit").is_dir() else ""))
        if is_search(config) and (df["status"] == "ok").any() and not missing:
            console.console.print(f"{len(bad)} of {len(df)} trials did not finish ({states}): a search tries "
                                  f"settings that can fail ({where})", highlight=False, soft_wrap=True)
            return
        console.error(f"{len(bad)} of {len(df)} jobs did not finish ({states}; {where})")
        raise SystemExit(1)
