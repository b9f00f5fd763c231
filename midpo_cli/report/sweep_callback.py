"""End of every `midpo train --multirun`: the sweep table (a row per job) in the sweep directory.

Registered under `hydra.callbacks` in conf/train.yaml. Writes sweep_table.csv / .parquet / .md, prints a
summary, and exits 1 (after writing) when any job failed, so scripts and CI see the failure.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig


class SweepTable(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
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
        bad = df[df["status"] != "ok"]
        if not bad.empty:
            console.error(f"{len(bad)} of {len(df)} jobs did not finish (job {', '.join(bad['job'])}); "
                          f"their errors: the error column of {paths[0]}, and each job's error.json")
            raise SystemExit(1)
