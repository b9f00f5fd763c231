"""Checkpoints (full state: model, optimizer, scheduler, RNG states, data position) and resume.

A checkpoint is <run>/checkpoints/step-N/ written by accelerate's save_state plus trainer_state.json
(step, config hash). `trainer.resume=latest` continues the newest checkpoint of a run with the same
config (this run directory first, then sibling runs under the same outputs root); a path names a
checkpoint or a run directory. A mismatching config is refused, never silently mixed.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from omegaconf import OmegaConf

from midpo_cli.engine.cache import config_hash

STATE = "trainer_state.json"
IGNORED = ("resume", "save_every", "eval_every", "log_every", "save_model")   # do not change the trajectory


def run_hash(cfg) -> str:
    c = OmegaConf.to_container(cfg, resolve=True)
    for k in IGNORED:
        c["trainer"].pop(k, None)
    return config_hash(c)


def save(acc, run_dir: Path, step: int, cfg) -> Path:
    path = run_dir / "checkpoints" / f"step-{step}"
    tmp = path.with_name(f".{path.name}.partial")
    if acc.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    acc.wait_for_everyone()
    acc.save_state(str(tmp))
    if acc.is_main_process:
        (tmp / STATE).write_text(json.dumps({"step": step, "config_hash": run_hash(cfg)}))
        tmp.rename(path)                                                   # complete checkpoints only
    acc.wait_for_everyone()
    return path


def _newest(run_dir: Path) -> Path | None:
    found = [p for p in (run_dir / "checkpoints").glob("step-*") if (p / STATE).exists()]
    return max(found, key=lambda p: int(p.name.split("-")[1]), default=None)


def find(resume: str, run_dir: Path, cfg) -> Path:
    """The checkpoint to continue from; raises ValueError saying what was looked at."""
    want = run_hash(cfg)
    if resume != "latest":
        p = Path(resume).expanduser()
        ckpt = p if (p / STATE).exists() else _newest(p)
        if ckpt is None:
            raise ValueError(f"trainer.resume={resume}: no checkpoint there (expected a step-N directory "
                             f"holding {STATE}, or a run directory with checkpoints/)")
        got = json.loads((ckpt / STATE).read_text())["config_hash"]
        if got != want:
            raise ValueError(f"trainer.resume={resume}: that checkpoint was trained with a different config "
                             f"(see its run's config.yaml); resume with the same overrides")
        return ckpt
    candidates = [c for c in [_newest(run_dir)] + [_newest(d) for d in _siblings(run_dir)] if c is not None]
    candidates = [c for c in candidates if json.loads((c / STATE).read_text())["config_hash"] == want]
    if not candidates:
        raise ValueError(f"trainer.resume=latest: no checkpoint of a run with this config under "
                         f"{run_dir.parent.parent}; checkpoints are written every trainer.save_every steps")
    return max(candidates, key=lambda c: (c / STATE).stat().st_mtime)


def _siblings(run_dir: Path) -> list[Path]:
    root = run_dir.parent.parent                                           # outputs/<date>/<time> -> outputs
    return [d.parent for d in root.glob("*/*/checkpoints")] + [d.parent for d in root.glob("*/checkpoints")]


def step_of(ckpt: Path) -> int:
    return int(json.loads((ckpt / STATE).read_text())["step"])
