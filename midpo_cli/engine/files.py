"""Files a run writes: atomically (temp file + rename, so a reader sees the old file or the whole new one),
JSON strictly (no NaN literals: a non-finite value is null), directories published by rename when complete, and
every failed write as one `WriteFailed` naming the path and the OS error."""
from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import shutil
from pathlib import Path


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
