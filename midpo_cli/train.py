"""`midpo train`: one run = task -> policy/reference -> MI-DPO training with the prior -> evaluation -> results.

One process or many (`accelerate launch` / `torchrun`): the main process claims the run directory and is the
only one that writes; every process trains on its own shard of each batch.
"""
from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from midpo_cli import console
from midpo_cli.engine import checkpoint, files, rundir, stops
from midpo_cli.recipe import Recipe

log = logging.getLogger("midpo")
RESUME = ("auto", "latest", "never", "restart")


def in_sweep() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    return HydraConfig.get().mode == RunMode.MULTIRUN


def overrides() -> list[str]:
    """The run's task overrides (a sweep job's own)."""
    from hydra.core.hydra_config import HydraConfig
    return list(HydraConfig.get().overrides.task)


def _claim_mode() -> str:
    """How the run directory is chosen: `sweep` (a --multirun job), `default` (Hydra's time-stamped name: a
    taken name moves on to a fresh one) or `explicit` (hydra.run.dir given: exactly that directory)."""
    from hydra.core.hydra_config import HydraConfig
    if in_sweep():
        return "sweep"
    explicit = any(o.split("=", 1)[0].lstrip("+") == "hydra.run.dir" for o in HydraConfig.get().overrides.hydra)
    return "explicit" if explicit else "default"


def rerun_command(run_dir: Path) -> str:
    """The command that continues this run: its task overrides (a sweep job's own) and its directory, named
    (a default directory is time-stamped, so the same command line would start a new run)."""
    import shlex
    return shlex.join(["midpo", "train", *overrides(), f"hydra.run.dir={run_dir.resolve()}"])


def record_failure(run_dir: Path, exc: BaseException) -> None:
    """A failed run leaves error.json (its row in the sweep table, status failed); when that cannot be written
    either (the disk that failed the run is full), one warning follows the run's own error."""
    import traceback
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        files.write_json(run_dir / "error.json", {
            "status": "failed", "error": f"{type(exc).__name__}: {exc}", "overrides": overrides(),
            "traceback": "".join(traceback.format_exception(exc))})
    except OSError as e:
        console.line(f"error.json not written either: {e}", "warning", "bold yellow")


def claim_directory(recipe: Recipe, state, inputs: dict | None) -> tuple[rundir.Claim, dict | None]:
    """The main process claims the run directory; every process learns its path, the claim's state and the
    input fingerprints (computed once, by the main process), or the main process's refusal."""
    from hydra.core.hydra_config import HydraConfig
    hydra_dir = Path(HydraConfig.get().runtime.output_dir)
    resume = recipe.tc.resume or "never"
    if resume not in RESUME and not Path(resume).expanduser().exists():
        raise ValueError(f"trainer.resume={resume}: not one of {RESUME} and no such checkpoint or run directory")
    claim, refused = None, None
    if state.is_main_process:
        try:
            claim = rundir.claim(hydra_dir, recipe.config_hash, resume, _claim_mode(), settings=recipe.settings,
                                 inputs=inputs, on_refusal=record_failure)
        except (ValueError, OSError) as e:
            if state.num_processes == 1:
                raise
            refused = e
        else:
            if claim.path != hydra_dir:                                    # a fresh name: drop Hydra's empty one
                _drop_empty(hydra_dir)
            if in_sweep():
                from midpo_cli.sweeps.resources import record_job
                record_job(claim.path)
    if state.num_processes > 1:
        from accelerate.utils import broadcast_object_list
        box = broadcast_object_list([("refused", str(refused)) if refused else
                                     None if claim is None else (str(claim.path), claim.state, inputs)],
                                    from_process=0)[0]
        if refused is not None:
            raise refused
        if box[0] == "refused":                                            # the main process's verdict, here too
            raise rundir.Relayed(box[1])
        path, st, inputs = box
        if claim is None:
            if Path(path) != hydra_dir:                                    # this process's own time-stamped dir
                _drop_empty(hydra_dir)
            claim = rundir.Claim(Path(path), st, -1)
    return claim, inputs


def _drop_empty(path: Path) -> bool:
    """Remove a directory Hydra made that stayed empty (another name was claimed, or the run was refused first);
    whether it was removed."""
    try:
        path.rmdir()                                                       # only when empty
    except OSError:
        return False
    return True


def _drop_unclaimed() -> None:
    """A config refused before the run directory was claimed: remove the empty directory Hydra made for it
    (and its empty date folder), so a typo leaves nothing behind."""
    from hydra.core.hydra_config import HydraConfig
    path = Path(HydraConfig.get().runtime.output_dir)
    if _drop_empty(path):
        _drop_empty(path.parent)


def run(cfg: DictConfig) -> float | None:
    """Hydra task. Bad input exits 1 with one message and no traceback; in a sweep, a failing job is
    recorded (error.json) and the sweep continues. Returns trainer.objective (what a sweeper optimises);
    None for a failed job or a missing/non-finite objective (the Optuna sweeper marks that trial failed)."""
    from accelerate import PartialState
    import torch

    state = PartialState(cpu=not torch.cuda.is_available())
    claim = None
    console.setup_logging(None, state.is_main_process)                     # the claim may log (a restart, a wait)
    try:
        recipe = Recipe(cfg)
        claim, inputs = claim_directory(recipe, state, recipe.inputs() if state.is_main_process else None)
        console.setup_logging(claim.path / "train.log" if state.is_main_process else None, state.is_main_process)
        results = reuse(claim.path) if claim.state == "finished" else train(recipe, claim, inputs, state)
    except KeyboardInterrupt as e:                                         # Ctrl-C (in training: a second one)
        if state.is_main_process:
            console.stopped(stops.interrupted(e, claim and claim.path, claim and rerun_command(claim.path)))
        raise SystemExit(stops.EXIT_INTERRUPTED) from None                 # a sweep stops too
    except (ValueError, KeyError, OSError, FloatingPointError) as e:     # OSError: e.g. cache_dir is a file
        return failed(e, state, claim)
    except Exception as e:                                                 # a crash: keep the sweep going
        if not in_sweep():
            raise
        return failed(e, state, claim, crash=True)
    finally:
        if claim is not None:
            claim.release()
        if state.num_processes == 1:                                       # sweep jobs in one process may change
            from midpo_cli.compat import reset_accelerate_state           # precision: start each from a clean state
            reset_accelerate_state()
    if not state.is_main_process:                                          # the others hold no final results
        return None
    console.final_table(results)
    log.info("run directory: %s", claim.path)
    return objective_of(results, cfg.trainer.objective)


def failed(e: BaseException, state, claim: rundir.Claim | None, crash: bool = False) -> None:
    """A run that failed: one line (not repeated by the other processes), error.json in its claimed directory
    (or Hydra's empty directory removed); in a sweep the next job goes on, else the command exits 1."""
    if crash:
        console.error(f"job failed: {type(e).__name__}: {e}")
    elif not isinstance(e, rundir.Relayed):                                # the main process said it already
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        console.error(f"{e}; {stops.on_disk(claim and claim.path, claim and rerun_command(claim.path))}"
                      if isinstance(e, files.WriteFailed) else f"{type(e).__name__}: {msg}")
    if state.is_main_process and claim is not None:
        record_failure(claim.path, e)
    elif state.is_main_process and not crash:
        _drop_unclaimed()
    if not in_sweep() and not crash:
        sys.exit(1)
    return None


def train(recipe: Recipe, claim: rundir.Claim, inputs: dict | None, state) -> dict:
    """Train in the claimed directory: from the checkpoint the claim or trainer.resume names, else from step 0."""
    run_dir, resume = claim.path, recipe.tc.resume or "never"
    resume_from = None
    if claim.state == "resume" or resume not in ("auto", "never", "restart"):
        resume_from = checkpoint.find(resume, run_dir, recipe.config_hash, recipe.settings, inputs)
    for w in recipe.prior.warnings():
        log.warning(w)
    if state.is_main_process:
        (run_dir / "error.json").unlink(missing_ok=True)                   # an earlier attempt's failure
        files.write_text(run_dir / "config.yaml", OmegaConf.to_yaml(recipe.cfg, resolve=True))
    pipeline = recipe.prior.pipeline()
    if pipeline is None:
        return recipe.setup(run_dir, resume_from, overrides(), rerun_command(run_dir)).train()
    from midpo_cli.pipelines import Runner
    return pipeline.run(Runner(recipe, run_dir, resume_from, state, overrides(), rerun_command(run_dir)))


def reuse(run_dir: Path) -> dict:
    """A finished run of the same config: its results stand; nothing is retrained."""
    results = files.read_json(run_dir / "results.json")
    if results is None:
        raise ValueError(f"{run_dir / 'results.json'} is unreadable; move the run directory away to rerun it")
    files.write_json(run_dir / "reused.json", {"reused_at": time.strftime("%Y-%m-%dT%H:%M:%S")})
    (run_dir / "error.json").unlink(missing_ok=True)                       # an earlier attempt's refusal
    console.console.print(f"{run_dir}: this config already finished here; its results are reused (reused.json)",
                          highlight=False)
    return results


def objective_of(results: dict, key: str) -> float | None:
    from midpo_cli.report import objective
    score = objective.value(results, key)
    if score is None:
        log.warning("trainer.objective=%s is not in this run's results; it has: %s", key,
                    ", ".join(objective.available(results)))
    return score
