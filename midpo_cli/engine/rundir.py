"""Run directories: a run owns its directory for its whole life and never shares it with another run.

Claiming is atomic: an exclusive lock (fcntl.flock on `.midpo.lock`, released by the OS when the process
ends, SIGKILL included) plus `run.json`, the run marker, recording the config hash, the settings and the
fingerprints of the files the run reads (engine/inputs.py). Nothing else is written before the claim. What a
claim finds decides what the run does:

    new directory, or one holding nothing       -> a new run
    a folder that is not midpo's (no run.json   -> refused, nothing written (an explicit directory); the next
      but files)                                   name (a time-stamped or sweep job directory)
    locked by a live process                    -> an explicit directory: an error; a time-stamped name: the
                                                   next name (`<time>-1`, ...); a sweep job: waits when the
                                                   holder runs the same config, else the next slot (`<n>-1`)
    same config and inputs, unfinished          -> continue from its latest complete checkpoint (or start over
      (trainer.resume=auto)                        when it has none): a requeued or restarted job
    same config and inputs, finished (auto)     -> reused: not retrained, `reused.json` records it
    same config, other inputs                   -> an error naming the file that changed (old/new hash)
    another config                              -> an error naming the settings that differ (a sweep job
                                                   takes the next slot instead: sweeps may share a directory)
    trainer.resume=restart                      -> start over here: the run found is moved to
                                                   `replaced/<time>/` first (never deleted)

Its files are written by engine/files.py: atomically, JSON strictly, a failed write as one `WriteFailed`.
"""
from __future__ import annotations

import fcntl
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from midpo_cli.engine.files import read_json, write_json
from midpo_cli.engine.inputs import InputsChanged, changed, derived_changed

LOCK, RUN, REPLACED = ".midpo.lock", "run.json", "replaced"
OWN = {LOCK, "job.json", REPLACED, ".hydra"}    # what a directory may hold before its run.json and still be new
MODES = ("explicit", "default", "sweep")        # hydra.run.dir given | Hydra's time-stamped name | a sweep job
# Trainer settings that change where or how often a run logs, evaluates or saves, not what it computes.
IGNORED = ("resume", "save_every", "eval_every", "log_every", "save_model", "objective", "trackers", "eval_train",
           "displacement_nats", "tracking_uri", "sample_table")
log = logging.getLogger("midpo")


def run_settings(config: dict) -> dict:
    """A run's identity: its resolved config (a plain dict) without the settings in IGNORED and cache_dir."""
    c = {**config, "trainer": {k: v for k, v in config["trainer"].items() if k not in IGNORED}}
    c.pop("cache_dir", None)
    return c


@dataclass
class Claim:
    path: Path
    state: str          # "new" | "resume" | "finished"
    fd: int             # the open lock file; closing it releases the directory

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class InUse(ValueError):
    pass


class NotARun(ValueError):
    """A non-empty folder without a midpo run marker: somebody's files, never written into."""


class Relayed(ValueError):
    """The main process's refusal, relayed to the other processes of a multi-process run (printed once, there)."""


class _Next(Exception):
    """This name is taken; a time-stamped run or a sweep job tries the next one."""


def _lock(path: Path, wait: bool = False) -> int:
    path.mkdir(parents=True, exist_ok=True)
    fd = os.open(path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except OSError:
        os.close(fd)
        raise InUse(f"run directory {path} is in use by another running midpo process")
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    return fd


def differences(old: dict | None, new: dict, limit: int = 6) -> str:
    """The settings that differ between two runs, as `key: old -> new` (first `limit`; '' when unknown)."""
    if not isinstance(old, dict):
        return ""
    def flat(d: dict, pre: str = "") -> dict:
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{pre}{k}.") if isinstance(v, dict) else {f"{pre}{k}": v})
        return out

    a, b = flat(old), flat(new)
    keys = sorted(k for k in a.keys() | b.keys() if a.get(k, "<unset>") != b.get(k, "<unset>"))
    return listing([f"{k}: {a.get(k, '<unset>')} -> {b.get(k, '<unset>')}" for k in keys], limit)


def listing(items: list[str], limit: int = 5) -> str:
    """`a, b, c and 4 more`: the first `limit` items of a list for a one-line message."""
    return ", ".join(items[:limit]) + (f" and {len(items) - limit} more" if len(items) > limit else "")


def strangers(path: Path) -> list[str]:
    """What `path` holds besides midpo's own leftovers (its lock, a job.json, replaced/, temp files)."""
    if not path.is_dir():
        return []
    return sorted(p.name for p in path.iterdir()
                  if p.name not in OWN and not (p.name.startswith(".") and p.name.endswith(".tmp")))


def _record(want: str, settings: dict | None, inputs: dict | None) -> dict:
    return {"config_hash": want, "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "pid": os.getpid(),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"), "settings": settings, "inputs": inputs or {}}


def move_aside(path: Path) -> Path:
    """Move everything a run left in `path` (all but the lock and earlier replaced runs) to replaced/<time>/."""
    dest = path / REPLACED / time.strftime("%Y-%m-%d_%H-%M-%S")
    k = 0
    while dest.exists():
        k += 1
        dest = dest.with_name(f"{dest.name.split('.')[0]}.{k}")
    dest.mkdir(parents=True)
    for p in path.iterdir():
        if p.name not in (LOCK, REPLACED):
            os.replace(p, dest / p.name)
    return dest


def _foreign(path: Path, mode: str) -> None:
    """Refuse (explicit) or pass over (other modes) a folder that holds files but no run marker."""
    found = [] if (path / RUN).exists() else strangers(path)
    if not found:
        return
    if mode != "explicit":
        raise _Next()
    raise NotARun(f"run directory {path} is not empty and is not a midpo run directory (no {RUN}; it holds "
                  f"{listing(found)}); nothing was written into it: pick a new or empty hydra.run.dir")


def _requeued(record: dict) -> bool:
    """The run found was started by this very SLURM job (a requeue keeps SLURM_JOB_ID): restart must not
    start it over at every requeue."""
    job = os.environ.get("SLURM_JOB_ID")
    return bool(job) and record.get("slurm_job_id") == job


def _inspect(path: Path, want: str, resume: str | None, mode: str, settings: dict | None,
             inputs: dict | None) -> str:
    """What the (locked) directory holds, as the claim state; raises for what the run may not use."""
    record = read_json(path / RUN)
    if (path / RUN).exists() and not isinstance(record, dict):             # a marker that is not one
        if mode != "explicit":
            raise _Next()
        if resume != "restart":
            raise ValueError(f"{path / RUN} is damaged (not a run record), so what {path} holds is unknown; pick a "
                             "new hydra.run.dir, or trainer.resume=restart to start over there (what it holds is "
                             f"moved to {REPLACED}/)")
        record = {}
    if not isinstance(record, dict):
        _foreign(path, mode)
        write_json(path / RUN, _record(want, settings, inputs))
        return "new"
    if mode == "default":                                                  # a time-stamped name is never reused
        raise _Next()
    same = record.get("config_hash") == want
    if resume == "restart" and not _requeued(record):
        if not same and mode == "sweep":                                   # another sweep's job: not ours to move
            raise _Next()
        moved = move_aside(path)
        log.warning("trainer.resume=restart: the run that was in %s is now in %s; starting over", path, moved)
        write_json(path / RUN, _record(want, settings, inputs))
        return "new"
    if not same:
        if mode == "sweep":
            raise _Next()
        diff = differences(record.get("settings"), settings or {})
        raise ValueError(f"run directory {path} holds a run with a different config "
                         f"({diff or 'see its config.yaml'}); use the same overrides to continue it, pick a new "
                         "hydra.run.dir / hydra.sweep.dir, or trainer.resume=restart to start over there (the "
                         f"old run is moved to {REPLACED}/)")
    if resume not in ("auto", "restart"):
        raise ValueError(f"run directory {path} already holds this run; trainer.resume=auto continues or reuses "
                         f"it, or pick a new hydra.run.dir (trainer.resume={resume})")
    what = changed(record.get("inputs"), inputs or {})
    if what:
        state = "finished" if (path / "results.json").exists() else "checkpointed"
        raise InputsChanged(f"run directory {path} holds a {state} run of this config trained on other inputs: "
                            f"{what}. Its results and checkpoints are of the old inputs, so it is neither reused "
                            f"nor resumed: pick a new hydra.run.dir / hydra.sweep.dir, or trainer.resume=restart "
                            f"to start over there (the old run is moved to {path / REPLACED}/<time>/)")
    if inputs and record.get("inputs") != inputs:                         # only times moved: keep the cheap test
        write_json(path / RUN, {**record, "inputs": inputs})
    return "finished" if (path / "results.json").exists() else "resume"


def check_derived(run_dir: Path, derived: dict, resumed_run: Path | None, write: bool) -> None:
    """What set-up computed from the inputs (engine/inputs.py: the pairs' token ids, the reference weights) must
    be what the run being resumed trained on (`resumed_run`: the directory of its checkpoint; None for a fresh
    start); `write`: record it in this run's run.json (the main process)."""
    if resumed_run is not None:
        record = read_json(resumed_run / RUN)
        what = derived_changed(record.get("derived") if isinstance(record, dict) else None, derived)
        if what:
            raise InputsChanged(f"the checkpoint in {resumed_run} was trained on other inputs than this run would "
                                f"continue with: {what}. Resuming would train on a mix: pick a new hydra.run.dir, or "
                                f"trainer.resume=restart to start over there (the old run is moved to {REPLACED}/)")
    if write:
        record = read_json(run_dir / RUN)
        write_json(run_dir / RUN, {**(record if isinstance(record, dict) else {}), "derived": derived})


def _config_of(path: Path) -> str | None:
    record = read_json(path / RUN)
    return record.get("config_hash") if isinstance(record, dict) else None


def _candidates(path: Path, want: str, mode: str):
    """The names a claim tries, in order. A sweep job first tries the job directories of its sweep directory that
    already hold its config (another job number in an earlier sweep: reused or resumed there, not trained twice)."""
    if mode == "sweep" and path.parent.is_dir():
        yield from sorted((p for p in path.parent.iterdir() if p.is_dir() and _config_of(p) == want),
                          key=lambda p: (p != path, p.name))
    for k in range(1000):
        yield path if k == 0 else path.with_name(f"{path.name}-{k}")


def claim(path: Path, want: str, resume: str | None, mode: str = "explicit", settings: dict | None = None,
          inputs: dict | None = None, on_refusal=None) -> Claim:
    """Claim `path` (a time-stamped run or a sweep job: the first usable `<name>-k`). `settings`: what `want`
    hashes, kept in run.json so that a later mismatch names the settings that differ; `inputs`: the fingerprints
    of the files the run reads. `on_refusal(path, error)` runs, lock held, when a sweep job's own directory
    refuses it (its inputs changed), so that the sweep table can show the refusal."""
    if mode not in MODES:
        raise ValueError(f"claim mode {mode!r} is not one of {MODES}")
    for p in _candidates(path, want, mode):
        try:
            _foreign(p, mode)                                              # not even a lock file goes in
        except _Next:
            continue
        try:
            fd = _lock(p)
        except InUse:
            if mode == "explicit":
                raise
            if mode != "sweep" or _config_of(p) != want:
                continue
            log.info("waiting for the job that runs this config in %s to end", p)
            fd = _lock(p, wait=True)
        try:
            return Claim(p, _inspect(p, want, resume, mode, settings, inputs), fd)
        except _Next:
            os.close(fd)
        except InputsChanged as e:
            if on_refusal is not None and mode == "sweep":
                on_refusal(p, e)
            os.close(fd)
            raise
        except BaseException:
            os.close(fd)
            raise
    raise ValueError(f"no free run directory next to {path}")
