"""End of every `midpo train --multirun`: the sweep table (a row per job) in the sweep directory.

Registered under `hydra.callbacks` in conf/train.yaml; it runs in the launching process after every job has
returned, whichever launcher ran them (basic, joblib, submitit local or SLURM), and reads only the sweep
directory, so `midpo report DIR` rebuilds the same rows later. Writes sweep_table.csv / .parquet / .md,
prints a summary (failed, unfinished and reused jobs named), and exits 1 (after writing) when a job did
not finish, so scripts and CI see it. In a search (`+experiment=tune`) a failed trial is part of the
search: it exits 1 only when a prior has no finished trial at all (tune_best.json).

Several sweeps may share a sweep directory, one at a time: a sweep holds the directory's `.midpo-sweep.lock`
from its start to its end, so a second sweep started into it while the first runs is refused before it writes
anything (one line, exit 1); Hydra's default time-stamped directory moves on to a fresh name (`<time>-1`)
instead. Each sweep keeps its own record (`.sweeps/<time>-<pid>.yaml`, the config Hydra also writes as
multirun.yaml, which the latest sweep overwrites). Jobs of different sweeps never share a job directory (a job
whose slot holds another config takes a fresh slot `<n>-1`: engine/rundir.py). The table files list every job
directory of the sweep directory; the printed summary and the exit code are those of this sweep's own jobs.

When the launcher itself raises before every job has returned (a joblib worker killed, a submitit job that
died or ran out of requeues), Hydra never calls on_multirun_end; `midpo train` then calls `after_launcher_failure`,
which writes the same table from the sweep directory (the jobs that did not return are rows: incomplete or not
started) and exits 1.
"""
from __future__ import annotations

import fcntl
import itertools
import json
import os
import sys
import time
from contextlib import ExitStack
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
_lock_fd: int | None = None                                     # its hold on the sweep directory
_jobs_bar: tuple[ExitStack, Any] | None = None                  # its progress bar (jobs done), open until its end
_failed_jobs = 0                                                # of its jobs returned in this process
LOCK = ".midpo-sweep.lock"


def _explicit_dir(config: DictConfig) -> bool:
    return any(o.split("=", 1)[0].lstrip("+") == "hydra.sweep.dir" for o in config.hydra.overrides.hydra)


def _try_lock(sweep_dir: Path) -> int | None:
    """The sweep directory's lock (an open descriptor), or None when another running sweep holds it."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(sweep_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({"pid": os.getpid(), "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
                             "command": " ".join(sys.argv)}).encode())
    return fd


def _holder(sweep_dir: Path) -> str:
    try:
        h = json.loads((sweep_dir / LOCK).read_text())
        return f"pid {h['pid']}, started {h['started']}: {h['command']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


def _move_to(config: DictConfig, sweep_dir: Path) -> None:
    """Point this sweep (the launcher's own copy of the config, and every job composed from it) at `sweep_dir`."""
    from omegaconf import open_dict, read_write
    with read_write(config.hydra), open_dict(config.hydra):
        config.hydra.sweep.dir = str(sweep_dir)
        config.hydra.overrides.hydra.append(f"hydra.sweep.dir={sweep_dir}")


def _foreign(sweep_dir: Path) -> list[str]:
    """What an existing sweep directory holds when it is not a midpo sweep directory (no lock, no sweep record,
    no multirun.yaml, no job directory with a run in it): someone's folder. [] when it is one, or empty."""
    if not sweep_dir.is_dir():
        return []
    entries = sorted(p.name for p in sweep_dir.iterdir())
    marked = any(m in entries for m in (LOCK, ".sweeps", "multirun.yaml")) or any(
        (sweep_dir / e / m).exists() for e in entries for m in ("run.json", "results.json", "job.json"))
    return [] if marked else entries


def claim_sweep_dir(config: DictConfig) -> Path:
    """Hold the sweep directory for this sweep (see the module docstring); exits 1, writing nothing, when an
    explicit hydra.sweep.dir is held by another running sweep."""
    global _lock_fd
    from midpo_cli import console
    sweep_dir = Path(config.hydra.sweep.dir)
    explicit = _explicit_dir(config)
    try:
        for k in range(1000):
            candidate = sweep_dir if k == 0 else sweep_dir.with_name(f"{sweep_dir.name}-{k}")
            if not explicit and candidate.exists() and any(candidate.iterdir()):
                continue                                                   # another sweep's time-stamped name
            found = _foreign(candidate)
            if found:
                from midpo_cli.engine.rundir import listing
                console.error(f"sweep directory {candidate} is not empty and is not a midpo sweep directory (it "
                              f"holds {listing(found)}); nothing was written into it: pick a new or empty "
                              "hydra.sweep.dir")
                raise SystemExit(1)
            fd = _try_lock(candidate)
            if fd is not None:
                break
            if explicit:
                console.error(f"sweep directory {sweep_dir} is in use by another running sweep ({_holder(sweep_dir)}); "
                              "nothing was written: wait for it to end (then the same command reuses its finished "
                              "jobs), or pick another hydra.sweep.dir")
                raise SystemExit(1)
        else:
            raise OSError(f"no free sweep directory next to {sweep_dir}")
    except OSError as e:
        console.error(f"sweep directory {sweep_dir}: {e}")
        raise SystemExit(1) from None
    if candidate != sweep_dir:
        _move_to(config, candidate)
    _lock_fd = fd
    from omegaconf import OmegaConf
    (candidate / ".sweeps").mkdir(exist_ok=True)
    OmegaConf.save(config, _new_record(candidate / ".sweeps", f"{time.strftime('%Y-%m-%d_%H-%M-%S')}-{os.getpid()}"))
    return candidate


def _new_record(folder: Path, stem: str) -> Path:
    """A record name no earlier sweep holds (two sweeps of one process may start within the same second):
    `<stem>.yaml`, else `<stem>-1.yaml`, ..., created exclusively."""
    for n in itertools.count():
        path = folder / f"{stem}{f'-{n}' if n else ''}.yaml"
        try:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            continue
        return path


def release_sweep_dir() -> None:
    """The sweep directory's lock, and the sweep's bar (however the sweep ended: the terminal's cursor comes back)."""
    global _lock_fd
    end_jobs_bar()
    if _lock_fd is not None:
        os.close(_lock_fd)
        _lock_fd = None


def start_jobs_bar(config: DictConfig) -> None:
    """The sweep's bar: jobs done of the jobs a basic sweep runs (jobs_of; a search's number is not known ahead).
    Jobs that the launcher runs in other processes (joblib, submitit) call on_job_end there, where no bar is
    open: only jobs run in this process (the basic launcher) advance it, and the others show in the sweep table."""
    global _jobs_bar, _failed_jobs
    from midpo_cli.console import progress
    from midpo_cli.report.tables import jobs_of

    jobs, _failed_jobs = jobs_of(config.hydra), 0
    stack = ExitStack()
    _jobs_bar = stack, stack.enter_context(progress("sweep", None if jobs is None else len(jobs), "jobs"))


def end_jobs_bar() -> None:
    global _jobs_bar
    if _jobs_bar is not None:
        stack, _jobs_bar = _jobs_bar[0], None
        stack.close()


def after_launcher_failure() -> None:
    """The sweep stopped before on_multirun_end (the launcher raised: its error is printed above): write the
    table of what the sweep directory holds, as on_multirun_end would. Nothing when no sweep had started jobs."""
    global _unfinished
    end_jobs_bar()
    config, _unfinished = _unfinished, None
    sweep_dir = None if config is None else Path(config.hydra.sweep.dir)
    if sweep_dir is None or not sweep_dir.is_dir() or \
            not any(p.is_dir() and not p.name.startswith(".") for p in sweep_dir.iterdir()):
        release_sweep_dir()
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
        claim_sweep_dir(config)
        _unfinished = config
        start_jobs_bar(config)

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        global _failed_jobs
        from hydra.core.utils import JobStatus
        if _jobs_bar is not None:                                     # None in a launcher's worker process
            _failed_jobs += job_return.status == JobStatus.FAILED
            _jobs_bar[1].info = f"{_failed_jobs} failed" if _failed_jobs else ""
            _jobs_bar[1].advance()

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        global _unfinished
        end_jobs_bar()
        _unfinished = None
        try:
            self._end(config)
        finally:
            from midpo_cli.engine.trackers import end_sweep
            end_sweep(Path(config.hydra.sweep.dir))                  # its tracker parent run (if any) finished
            release_sweep_dir()

    def _end(self, config: DictConfig) -> None:
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
        everything, df = df, tables.own_rows(df, tables.jobs_of(config.hydra))
        tables.print_table(tables.sweep_summary(df), f"sweep {sweep_dir}: {len(df)} jobs")
        others = len(everything) - len(df)
        console.console.print(f"sweep table: {', '.join(str(p) for p in paths)}"
                              + (f" (with {others} job(s) of earlier sweeps in this directory)" if others else "")
                              + f"\nreport and plots: midpo report {sweep_dir}", highlight=False, soft_wrap=True)
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
