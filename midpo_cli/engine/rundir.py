"""Run directories: a run owns its directory for its whole life and never shares it with another run.

Claiming is atomic: an exclusive lock (fcntl.flock on `.midpo.lock`, released by the OS when the process
ends, SIGKILL included) plus `run.json` recording the config hash. What a claim finds decides what the run does:

    empty / new directory                      -> a new run
    locked by a live process                   -> in use: the default time-stamped name moves on to a fresh
                                                  name (`<time>-1`, ...); an explicit directory is an error
    same config, unfinished (trainer.resume=auto) -> continue from its latest complete checkpoint (or start
                                                  over when it has none): a requeued or restarted job
    same config, finished (trainer.resume=auto)  -> reused: not retrained, `reused.json` records it
    another config, or files of another run    -> an error (a default-named directory moves on instead)

Files are written atomically (temp file + rename) and JSON strictly (no NaN literals). A write that fails
(a full disk, a file-size limit) is one `WriteFailed` naming the path and the OS error, whatever library
raised it, and leaves nothing half-written under the final name.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import math
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

LOCK, RUN = ".midpo.lock", "run.json"
FOREIGN = ("results.json", "metrics.jsonl", "config.yaml", "error.json", "checkpoints")


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


def _lock(path: Path) -> int:
    path.mkdir(parents=True, exist_ok=True)
    fd = os.open(path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
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
    shown = [f"{k}: {a.get(k, '<unset>')} -> {b.get(k, '<unset>')}" for k in keys[:limit]]
    return ", ".join(shown) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def _inspect(path: Path, want: str, resume: str | None, settings: dict | None) -> str:
    """What the (locked) directory holds, as the claim state; raises ValueError for another run's files."""
    record = read_json(path / RUN)
    if record is None:
        found = [f for f in FOREIGN if (path / f).exists()]
        if found:
            raise ValueError(f"run directory {path} already holds a run written without a run.json "
                             f"({', '.join(found)}); pick a new hydra.run.dir / hydra.sweep.dir (nothing was changed)")
        write_json(path / RUN, {"config_hash": want, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                "pid": os.getpid(), "settings": settings})
        return "new"
    if record.get("config_hash") != want:
        diff = differences(record.get("settings"), settings or {})
        raise ValueError(f"run directory {path} holds a run with a different config "
                         f"({diff or 'see its config.yaml'}); use the same overrides to continue it, or pick a new "
                         "hydra.run.dir / hydra.sweep.dir")
    if resume != "auto":
        raise ValueError(f"run directory {path} already holds this run; trainer.resume=auto continues or reuses "
                         f"it, or pick a new hydra.run.dir (trainer.resume={resume})")
    return "finished" if (path / "results.json").exists() else "resume"


def claim(path: Path, want: str, resume: str | None, default_name: bool, settings: dict | None = None) -> Claim:
    """Claim `path` (or, for a default time-stamped name, the first free `<name>-k`). `settings`: what `want`
    hashes, kept in run.json so that a later mismatch names the settings that differ."""
    for k in range(1000):
        p = path if k == 0 else path.with_name(f"{path.name}-{k}")
        try:
            fd = _lock(p)
        except InUse:
            if default_name:
                continue
            raise
        try:
            if default_name and any((p / f).exists() for f in (RUN, *FOREIGN)):
                raise InUse(f"{p} is taken")
            return Claim(p, _inspect(p, want, resume, settings), fd)
        except InUse:
            os.close(fd)
        except BaseException:
            os.close(fd)
            raise
    raise ValueError(f"no free run directory next to {path}")


def clean(value):
    """JSON-safe copy: non-finite floats become None (strict JSON has no NaN/Infinity)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    return value


class WriteFailed(OSError):
    """A file or directory could not be written; the message names it and the OS error."""


def reason(e: BaseException, path: Path | None = None) -> str:
    """The OS error behind a failed write, as `File too large (EFBIG)`. torch.save raises a RuntimeError that
    carries no errno (and safetensors a SafetensorError that names it in its text): then a full disk or a file
    stopped at the file-size limit is looked for, else the library's own first line is given."""
    code = e.errno if isinstance(e, OSError) and e.errno else None
    found = re.search(r"os error (\d+)", str(e))                         # safetensors (Rust's io::Error)
    if code is None and found:
        code = int(found.group(1))
    if code is None and path is not None:
        code = _likely_cause(path)
    if code is None:
        text = str(e).strip()
        return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__
    return f"{os.strerror(code)} ({errno.errorcode.get(code, code)})"


def _likely_cause(path: Path) -> int | None:
    """ENOSPC when the disk holding `path` is full; EFBIG when a file of `path` (or of its `.partial`
    directory) stopped at the soft file-size limit (RLIMIT_FSIZE)."""
    import resource
    where = next((p for p in (path, *path.parents) if p.exists()), None)
    if where is not None and shutil.disk_usage(where).free == 0:
        return errno.ENOSPC
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit == resource.RLIM_INFINITY:
        return None
    for p in (path, path.with_name(f".{path.name}.partial")):
        files = [p] if p.is_file() else p.rglob("*") if p.is_dir() else []
        if any(f.is_file() and f.stat().st_size >= limit for f in files):
            return errno.EFBIG
    return None


@contextlib.contextmanager
def writing(path: Path, what: str = ""):
    """Turn an error raised while writing `path` (OSError, torch's RuntimeError, SafetensorError) into one
    WriteFailed: `could not write <what> <path>: <OS error>`."""
    try:
        yield
    except WriteFailed:
        raise
    except Exception as e:                                                 # noqa: BLE001 (narrowed just below)
        from safetensors import SafetensorError
        if not isinstance(e, (OSError, RuntimeError, SafetensorError)):
            raise
        raise WriteFailed(f"could not write {what + ' ' if what else ''}{path}: {reason(e, path)}") from e


@contextlib.contextmanager
def published_dir(path: Path, what: str, main: bool = True):
    """Write a directory under a temporary name beside `path` (yielded) and rename it to `path` once complete:
    a failed or interrupted write leaves no `path`, so nobody takes a half-written model for a whole one.
    Every process of a multi-process save enters; only the main one (`main`) publishes or cleans up."""
    tmp = path.with_name(f".{path.name}.partial")
    try:
        with writing(path, what):
            if main:
                shutil.rmtree(tmp, ignore_errors=True)                     # an earlier attempt's remains
            yield tmp
            if main:
                if path.exists():                                          # an earlier attempt's whole one
                    shutil.rmtree(path)
                os.replace(tmp, path)
    except BaseException:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_text(path: Path, text: str) -> None:
    """Write a file atomically: a reader sees the old file or the whole new one, never a part (and a failed
    write leaves neither a part nor its temporary file)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with writing(path):
            tmp.write_text(text)
            os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: Path, obj) -> None:
    write_text(path, json.dumps(clean(obj), indent=2, allow_nan=False, default=float))


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
