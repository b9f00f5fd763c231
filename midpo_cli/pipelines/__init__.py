"""Runs that are several trainings: a prior whose method trains more than once returns a Pipeline from
`Prior.pipeline()` (DICE's rounds), and the train command runs it instead of one recipe.

A pipeline composes recipe runs (midpo_cli/recipe.py), each a `Stage` (what differs from the run's config: the
prior's settings, the model the policy starts from, the pairs). Every stage but the last is a sub-run in its own
directory under the run (or under the cache, for models shared by runs), with its own run.json, checkpoints,
metrics, results and model; the last stage is the run itself, so the run directory holds what any run holds
(metrics.jsonl, checkpoints, model/, results.json) and `midpo report` reads it like any other. A killed pipeline,
rerun with the same command, reuses finished stages, resumes the stage it was in from its latest checkpoint, and
reads the pairs it had made from disk. The train command never looks at which prior (or pipeline) it runs.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

from omegaconf import OmegaConf

from midpo_cli.engine import checkpoint, files, rundir
from midpo_cli.recipe import Recipe, Stage

log = logging.getLogger("midpo")


class Pipeline:
    """What a pipeline prior's run does. `run` trains its stages through the runner and returns the run's results
    (the last stage's, which `runner.final` writes to results.json)."""

    def run(self, runner: Runner) -> dict:
        raise NotImplementedError


class Runner:
    """Trains the stages of one run. `recipe`: the run's own (its config, hash and settings); `run_dir`: the
    claimed run directory; `resume_from`: the checkpoint the run itself continues from (the last stage's);
    `overrides`, `rerun`: the command line's, recorded in results and named when a stop signal ends a stage."""

    def __init__(self, recipe: Recipe, run_dir: Path, resume_from: Path | None, state, overrides: list[str] = (),
                 rerun: str = ""):
        self.recipe, self.cfg, self.run_dir, self.resume_from = recipe, recipe.cfg, run_dir, resume_from
        self.state, self.overrides, self.rerun = state, list(overrides), rerun
        self._offline = self._reference = None

    def sub_recipe(self, stage: Stage) -> Recipe:
        """The recipe of a sub-run: its model is always saved (a later stage starts from it) and it opens no tracker
        run of its own (both settings are outside the config hash)."""
        extra = {"trainer.save_model": True, "trainer.trackers": []}
        return Recipe(self.cfg, dataclasses.replace(stage, config={**stage.config, **extra}))

    def subrun(self, stage: Stage, directory: Path | None = None) -> dict:
        """Train `stage` in `directory` (default: <run dir>/<stage.name>): reused when it finished there, resumed from
        its latest checkpoint when it stopped there, trained from its start otherwise. Returns its results."""
        self._reference = None                                             # not held while a stage trains
        recipe = self.sub_recipe(stage)
        path = Path(directory) if directory is not None else self.run_dir / stage.name
        main = self.state.is_main_process
        inputs = recipe.inputs() if main else None
        claim, done = None, None
        if main:
            path.mkdir(parents=True, exist_ok=True)
            claim = rundir.claim(path, recipe.config_hash, "auto", "explicit", settings=recipe.settings, inputs=inputs)
            done = claim.state
        done = self.shared(done)
        try:
            if done == "finished":
                results = files.read_json(path / "results.json")
                if results is None:
                    raise ValueError(f"{path / 'results.json'} is unreadable; move {path} away to train that stage again")
                log.info("%s: finished before; its results and model are reused", path)
                return results
            resume = checkpoint.find("auto", path, recipe.config_hash, recipe.settings, inputs) \
                if done == "resume" and main else None
            resume = self.shared(None if resume is None else str(resume))
            if main:
                files.write_text(path / "config.yaml", OmegaConf.to_yaml(recipe.cfg, resolve=True))
            log.info("%s: %s", path, f"resuming from {resume}" if resume else "training")
            return recipe.setup(path, Path(resume) if resume else None, self.overrides, self.rerun).train()
        finally:
            if claim is not None:
                claim.release()

    def final(self, stage: Stage, on_results=None) -> dict:
        """Train the last stage as the run itself (in the run directory, from the run's own checkpoint when it
        resumes); `on_results(results)` may add to the results before results.json is written."""
        self._reference = None
        recipe = Recipe(self.cfg, Stage(name="", prior=stage.prior, start=stage.start, rows=stage.rows))
        if on_results is not None:
            recipe.on_results.append(on_results)
        return recipe.setup(self.run_dir, self.resume_from, self.overrides, self.rerun).train()

    def shared(self, value):
        """The main process's `value`, on every process."""
        if self.state.num_processes == 1:
            return value
        from accelerate.utils import broadcast_object_list
        return broadcast_object_list([value], from_process=0)[0]

    def made_once(self, path: Path, make) -> dict:
        """A JSON file a stage's data is kept in (e.g. a round's pairs): read when it exists (a resumed run trains
        on exactly what it made before), else `make()` on the main process, written atomically, read by all."""
        with self.state.main_process_first():
            data = files.read_json(path)
            if data is None:
                if not self.state.is_main_process:
                    raise ValueError(f"{path} is missing or unreadable after the main process made it")
                data = make()
                path.parent.mkdir(parents=True, exist_ok=True)
                files.write_text(path, json.dumps(data))
        return data

    def offline_rows(self) -> tuple[list[dict], list[dict]]:
        """The task's own (train rows, eval rows), as a single run of this config would train on."""
        if self._offline is None:
            reference = self.reference()
            with self.state.main_process_first():                          # e.g. sampled pairs, cached
                self._offline = self.recipe.task.pairs(self.context(), reference)
        return self._offline

    def reference(self):
        """The task's reference policy, frozen on the device, built as a run of this config builds it (seeded: a
        model made from its config gets the run's initialisation); kept until the next stage trains."""
        if self._reference is None:
            from midpo_cli.engine.models import frozen, load_model
            from midpo_cli.engine.trainer import seed_everything

            seed_everything(self.cfg.seed)
            with self.state.main_process_first():                          # e.g. SFT, cached for the others
                path = self.recipe.task.reference_weights(self.context())
            self._reference = frozen(load_model(self.cfg.model, self.tokenizer(), path=path)).to(self.device())
        return self._reference

    def context(self):
        """What the task may use (tasks.Context): the run's tokenizer, model settings, seed, cache and device."""
        from midpo_cli.tasks import Context
        return Context(self.tokenizer(), self.cfg.model, self.cfg.seed, Path(self.cfg.cache_dir), self.device())

    def tokenizer(self):
        from midpo_cli.engine.models import load_tokenizer
        if not hasattr(self, "_tokenizer"):
            self._tokenizer = load_tokenizer(self.cfg.model)
        return self._tokenizer

    def device(self):
        return self.state.device
