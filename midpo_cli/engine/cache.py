"""Content-addressed caches under cfg.cache_dir: a key is a hash of everything that changes the value."""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import uuid
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

log = logging.getLogger("midpo")


def config_hash(obj) -> str:
    def plain(x):
        if isinstance(x, (DictConfig, ListConfig)):
            return OmegaConf.to_container(x, resolve=True, enum_to_str=True)
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        return x
    return hashlib.sha256(json.dumps(plain(obj), sort_keys=True, default=str).encode()).hexdigest()[:16]


@contextlib.contextmanager
def publish(path: Path):
    """Write into a private temporary path, then move it into place atomically: readers never see
    half-written cache entries (a failed or interrupted write removes its temporary path), and concurrent
    writers of the same key do not corrupt each other. A failed write is one WriteFailed naming the entry."""
    from midpo_cli.engine.files import writing

    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    try:
        with writing(path, "cache entry"):
            path.parent.mkdir(parents=True, exist_ok=True)
            if not path.suffix:
                tmp.mkdir()
            yield tmp
            if path.exists():                                              # another writer won the race
                return
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()


@contextlib.contextmanager
def build_lock(path: Path):
    """Hold the exclusive right to build the cache entry `path` (fcntl.flock on `.locks/<name>.lock` beside it,
    released by the OS if the process dies). Concurrent jobs with the same key (a parallel sweep on a cold
    cache) then build it once: the others wait here and find it built. Check for the entry inside the lock."""
    lock = path.parent / ".locks" / f"{path.name}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another job that is building %s", path)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def readable_model(path: Path) -> bool:
    """Whether a cached save_pretrained directory is whole: config.json parses and every safetensors file's
    header and size agree (a truncated or half-copied entry is rebuilt instead of failing every later run)."""
    try:
        json.loads((path / "config.json").read_text())
        files = list(path.glob("*.safetensors"))
        if not files:
            return False
        for f in files:
            with f.open("rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                header = json.loads(fh.read(n))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
            if f.stat().st_size != 8 + n + end:
                return False
        return True
    except (OSError, ValueError, KeyError, TypeError):
        return False


def read_json_entry(path: Path, what: str, keys: tuple[str, ...] = ()):
    """A cached JSON entry, or None when there is none or it is damaged (then it is removed, with a warning,
    and the caller builds it again instead of failing every later run). `keys`: what a whole entry holds (an
    object with these keys); anything else is damaged too."""
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        if keys and not (isinstance(data, dict) and all(k in data for k in keys)):
            raise ValueError("not a whole entry")
    except (OSError, ValueError):
        log.warning("%s: cache entry %s is damaged: building it again", what, path)
        path.unlink(missing_ok=True)
        return None
    log.info("%s: cache hit %s", what, path)
    return data
