"""Checkpoints (full state: policy, optimisers, schedules, RNG states, data position, the prior's own state) and resume.

A checkpoint is <run>/checkpoints/step-N/: accelerate's save_state (safetensors weights; optimiser, schedule
and RNG states loaded back with torch.load(weights_only=True), so a planted pickle is refused, never run),
`prior.safetensors` for a prior with state, `trainer_state.json` (step, config hash) and `manifest.json`
(size and xxh3-128 hash of every file). It is written under a temporary name and renamed when complete;
a damaged file (truncated, changed, missing, or one the manifest does not list) and a damaged manifest or
trainer state are found before anything is loaded: one line naming the file and the previous good step.

`trainer.resume`: auto (default) continues this run directory's latest intact checkpoint when it holds the
same config (engine/rundir.py decides; a damaged one is skipped with a warning, so a requeued job goes on
from the one before it instead of failing at every start); latest = the newest checkpoint of a run with
this config (this directory first, then sibling runs under the same outputs root); a path names a
checkpoint or a run directory.
A mismatching config is refused, never silently mixed.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from midpo_cli.engine.files import read_json, writing
from midpo_cli.engine.inputs import InputsChanged, changed, file_hash
from midpo_cli.engine.rundir import differences

STATE, MANIFEST, PRIOR = "trainer_state.json", "manifest.json", "prior.safetensors"
log = logging.getLogger("midpo")


def save(acc, run_dir: Path, step: int, config_hash: str, prior) -> Path:
    """Write the checkpoint of `step` (every process takes part; the main process publishes it). A failed or
    interrupted write leaves no part of it: WriteFailed names the checkpoint and the OS error."""
    path = run_dir / "checkpoints" / f"step-{step}"
    tmp = path.with_name(f".{path.name}.partial")
    try:
        with writing(path, "checkpoint"):
            _write(acc, path, tmp, step, config_hash, prior)
    except BaseException:
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _write(acc, path: Path, tmp: Path, step: int, config_hash: str, prior) -> None:
    if acc.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    acc.wait_for_everyone()
    acc.save_state(str(tmp))
    if acc.is_main_process:
        state = prior.state_dict()
        if state:
            from safetensors.torch import save_file
            save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(tmp / PRIOR))
        (tmp / STATE).write_text(json.dumps({"step": step, "config_hash": config_hash}))
    acc.wait_for_everyone()
    if acc.is_main_process:
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        manifest = {str(p.relative_to(tmp)): [p.stat().st_size, file_hash(p)] for p in files}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        if path.exists():                                                  # a re-run of this step: replace it
            shutil.rmtree(path)
        tmp.rename(path)                                                   # complete checkpoints only
    acc.wait_for_everyone()


def _state(ckpt: Path) -> dict | None:
    """The checkpoint's trainer state when it is well formed: {"step": N >= 1, "config_hash": "..."}."""
    state = read_json(ckpt / STATE)
    ok = isinstance(state, dict) and type(state.get("step")) is int and state["step"] >= 1 \
        and isinstance(state.get("config_hash"), str)
    return state if ok else None


def damage(ckpt: Path) -> str | None:
    """Why a checkpoint directory is not a complete, intact checkpoint (None when it is)."""
    manifest = read_json(ckpt / MANIFEST)
    entries = manifest.values() if isinstance(manifest, dict) else [None]
    if not all(isinstance(v, list) and len(v) == 2 and type(v[0]) is int and isinstance(v[1], str) for v in entries):
        return f"{ckpt / MANIFEST} is missing or unreadable"
    unlisted = sorted(str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if p.is_file() and p.name != MANIFEST
                      and not p.name.startswith(".") and str(p.relative_to(ckpt)) not in manifest)
    if unlisted:
        return f"{ckpt / unlisted[0]} is not in {MANIFEST} (not written with this checkpoint)"
    for name, (size, digest) in manifest.items():
        f = ckpt / name
        if not f.is_file():
            return f"{f} is missing"
        if f.stat().st_size != size:
            return f"{f} is truncated or changed ({f.stat().st_size} bytes, {size} written)"
        if file_hash(f) != digest:
            return f"{f} does not match what was written (hash differs)"
    if _state(ckpt) is None:
        return f"{ckpt / STATE} is not a trainer state ({{\"step\": N >= 1, \"config_hash\": ...}})"
    return None


def complete(run_dir: Path) -> list[Path]:
    """The run's checkpoint directories (step-N with a trainer state), newest first."""
    found = [p for p in (run_dir / "checkpoints").glob("step-*") if (p / STATE).exists()]
    return sorted(found, key=step_of, reverse=True)


def latest(run_dir: Path) -> Path | None:
    """The run's newest checkpoint (published by rename only when complete; not re-hashed: used in messages)."""
    return next(iter(complete(run_dir)), None)


def _previous_good(ckpt: Path) -> str:
    for p in complete(ckpt.parent.parent):
        if step_of(p) < step_of(ckpt) and damage(p) is None:
            return f"the previous good checkpoint is {p} (step {step_of(p)}): trainer.resume={p}"
    return "no earlier intact checkpoint exists"


def verify(ckpt: Path) -> None:
    """Raise ValueError (one line: the damaged file and the previous good step) unless the checkpoint is intact."""
    why = damage(ckpt)
    if why is not None:
        raise ValueError(f"checkpoint {ckpt} is damaged: {why}; {_previous_good(ckpt)}")


def load(acc, ckpt: Path, prior, max_steps: int | None = None) -> int:
    """Restore every state from an intact checkpoint; returns its step. Pickled objects are refused."""
    import pickle

    from safetensors import SafetensorError

    verify(ckpt)
    step = step_of(ckpt)
    if max_steps is not None and step > max_steps:
        raise ValueError(f"checkpoint {ckpt}: its step {step} is past trainer.max_steps={max_steps} of the same "
                         f"config, so {ckpt / STATE} is not what this run wrote; {_previous_good(ckpt)}")
    refused = (pickle.UnpicklingError, SafetensorError, RuntimeError, EOFError, KeyError, OSError)
    try:
        acc.load_state(str(ckpt))
    except refused as e:
        raise ValueError(f"checkpoint {ckpt}: a file is not a plain tensor/state file, refused without running it "
                         f"({type(e).__name__}: {_first_line(e)})") from None
    _check_rng_files(ckpt)
    if (ckpt / PRIOR).exists():
        from safetensors.torch import load_file
        try:
            prior.load_state_dict(load_file(str(ckpt / PRIOR)))
        except refused as e:
            raise ValueError(f"checkpoint {ckpt}: {PRIOR} is not this prior's state ({type(e).__name__}: "
                             f"{_first_line(e)[:200]})") from None
    return step


def _first_line(e: Exception) -> str:
    """The first line of an exception's message (its type's name when it has none)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _check_rng_files(ckpt: Path) -> None:
    """accelerate skips RNG files it cannot load without a word; loading them here (weights_only) makes a
    refused or broken RNG state an error instead of a silently inexact resume."""
    from accelerate.utils.other import load

    for f in sorted(ckpt.glob("random_states_*.pkl")):
        try:
            load(f, weights_only=True)
        except Exception as e:                                             # noqa: BLE001 (any refusal)
            raise ValueError(f"checkpoint {ckpt}: {f.name} is not a plain RNG state file, refused without running "
                             f"it ({type(e).__name__})") from None


def _other_inputs(ckpt: Path, inputs: dict | None) -> str:
    """What differs between the files the checkpoint's run read (its run.json) and this run's ('' when the same
    or unknown)."""
    record = read_json(ckpt.parent.parent / "run.json")
    return changed(record.get("inputs"), inputs) if isinstance(record, dict) and inputs is not None else ""


def find(resume: str, run_dir: Path, want: str, settings: dict, inputs: dict | None = None) -> Path | None:
    """The checkpoint to continue from (None for a fresh start under resume=auto); raises ValueError saying
    what was looked at. `want`/`settings`: this run's config hash and settings, which the checkpoint's run must
    share (the settings name what differs); `inputs`: this run's input fingerprints, the same."""
    if resume == "auto":                                                   # a requeue: nobody to ask, so a
        found = complete(run_dir)                                          # damaged checkpoint is skipped, loudly
        for ckpt in found:
            why = damage(ckpt)
            if why is None:
                return ckpt
            log.warning("checkpoint %s is damaged (%s); trainer.resume=auto continues from the one before it",
                        ckpt, why)
        if found:
            log.warning("no intact checkpoint in %s: the run starts over", run_dir)
        return None
    if resume != "latest":
        p = Path(resume).expanduser()
        ckpt = p if (p / STATE).exists() else next(iter(complete(p)), None)
        if ckpt is None:
            raise ValueError(f"trainer.resume={resume}: no checkpoint there (expected a step-N directory "
                             f"holding {STATE}, or a run directory with checkpoints/)")
        if _hash_of(ckpt) != want:
            verify(ckpt)                                                   # a damaged one is named as such
            theirs = (read_json(ckpt.parent.parent / "run.json") or {}).get("settings")
            raise ValueError(f"trainer.resume={resume}: that checkpoint was trained with a different config "
                             f"({differences(theirs, settings) or 'see its run config.yaml'}); "
                             "resume with the same overrides")
        what = _other_inputs(ckpt, inputs)
        if what:
            raise InputsChanged(f"trainer.resume={resume}: that checkpoint was trained on other inputs ({what}); "
                                "resuming would train on a mix. Start a new run instead")
        return ckpt
    candidates = [c for d in [run_dir, *_siblings(run_dir)] for c in complete(d)[:1]]
    candidates = [c for c in candidates if _hash_of(c) == want]
    other = [c for c in candidates if _other_inputs(c, inputs)]
    candidates = [c for c in candidates if c not in other]
    if not candidates:
        why = f" ({len(other)} of this config were trained on other inputs: {_other_inputs(other[0], inputs)})" \
            if other else ""
        raise ValueError(f"trainer.resume=latest: no checkpoint of a run with this config and these inputs under "
                         f"{run_dir.parent.parent}{why}; checkpoints are written every trainer.save_every steps")
    return max(candidates, key=lambda c: (c / STATE).stat().st_mtime)


def _hash_of(ckpt: Path) -> str | None:
    return (_state(ckpt) or {}).get("config_hash")


def _siblings(run_dir: Path) -> list[Path]:
    root = run_dir.parent.parent                                           # outputs/<date>/<time> -> outputs
    return [d.parent for d in root.glob("*/*/checkpoints")] + [d.parent for d in root.glob("*/checkpoints")]


def step_of(ckpt: Path) -> int:
    """The checkpoint's step: its trainer state's, else its name's (step-N), else -1."""
    state = _state(ckpt)
    if state is not None:
        return state["step"]
    tail = ckpt.name.rpartition("-")[2]
    return int(tail) if tail.isdigit() else -1
