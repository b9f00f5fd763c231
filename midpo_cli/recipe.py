"""One training run as a recipe: the MI-DPO loss with the configured prior, from the task's pairs to results.json.

    recipe = Recipe(cfg)                      # checks the config, builds the task and the prior (nothing loads)
    recipe.setup(run_dir)                     # accelerator, models, pairs, reference cache, optimisers, loader
    results = recipe.train()                  # the steps, then the task's evaluation and the saved model

`train()` is a loop over named methods: `step` (forward, backward, the optimiser steps), `log` (a metrics.jsonl
row every trainer.log_every steps, also sent to the trackers: engine/trackers.py), `evaluate` (held-out pairs, and
the trackers' sample table), `checkpoint` and `stop` (a stop signal).
Everything below the recipe receives the sub-config or the values it uses. A pipeline of several trainings
builds one recipe per training.

One process or many (DDP, FSDP, DeepSpeed through `accelerate launch` / `torchrun`): each process trains on its
own shard of every global batch (`trainer.batch_size` pairs per process and micro-batch), metrics are averaged
over processes before they are logged, and only the main process writes. A prior with parameters gets its own
optimiser and schedule and steps as its `updates(step)` says; a prior with state (parameters, or a model it owns
and updates in `on_step`, such as TR-DPO's moving reference) is saved in every checkpoint and beside the policy.
Nothing non-finite is trained on or written: a non-finite loss or gradient stops the run (`trainer.on_nonfinite=
stop`, naming the step, the term and the last good checkpoint) or skips the step (`skip`, counted); weights are
checked before every checkpoint and save. A stop signal ends the step, writes a checkpoint and exits.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from midpo_cli.config import AT_LEAST_ONE, BELOW_ONE, NON_NEGATIVE, POSITIVE
from midpo_cli.data.prepare import build_pairs, check_bad_fraction, save_report
from midpo_cli.data.tokenize import Rules
from midpo_cli.engine import checkpoint, files, refcache, trackers
from midpo_cli.engine.cache import config_hash
from midpo_cli.engine.cross import Layout
from midpo_cli.engine.draws import data_loader, endless, pairs_drawn
from midpo_cli.engine.inputs import pairs_digest, run_inputs, weights_digest
from midpo_cli.engine.lora import AdapterOff, add_lora, merged_for_saving, save_adapter
from midpo_cli.engine.head import unwrap
from midpo_cli.engine.monitor import Displacement
from midpo_cli.engine.models import (check_lengths, check_source, compile_blocks, frozen, load_model,
                                     load_tokenizer, local_path)
from midpo_cli.engine.pack import attention_of, pack_kind
from midpo_cli.engine.optim import build, finite_parameters, schedule, total_norm
from midpo_cli.engine.rundir import check_derived, run_settings
from midpo_cli.engine.stops import Signals
from midpo_cli.engine.trainer import (NonFinite, append_row, diagnose, evaluate_pairs, metrics_rows, metrics_upto,
                                      peak_memory_mb, seed_everything, step_loss, window_row)
from midpo_cli.engine.views import live_reference
from midpo_cli.priors import build_prior
from midpo_cli.report.card import base_model, model_card
from midpo_cli.tasks import Context, build_task

log = logging.getLogger("midpo")
PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}               # ours -> accelerate's mixed_precision


def check_config(cfg: DictConfig) -> None:
    """Value checks of a train config, run before anything loads: a ValueError naming the key, its value and
    what is allowed. Every number must be finite; the bounds are config.py's (AT_LEAST_ONE, ...)."""

    def value(key):
        return OmegaConf.select(cfg, key)

    for keys, ok, rule in ((AT_LEAST_ONE, lambda v: v >= 1, ">= 1"), (NON_NEGATIVE, lambda v: v >= 0, ">= 0"),
                           (POSITIVE, lambda v: v > 0, "> 0"), (BELOW_ONE, lambda v: 0 <= v < 1, "in [0, 1)")):
        for key in keys:
            v = value(key)
            if not math.isfinite(v) or not ok(v):
                extra = " (0 leaves the policy unchanged; a negative lr climbs the loss)" if key == "optimizer.lr" else ""
                raise ValueError(f"{key}={v} must be a finite number {rule}{extra}")
    rows = value("dataset.max_rows")
    if rows is not None and rows < 1:
        raise ValueError(f"dataset.max_rows={rows} must be >= 1 (null = every row)")
    if not 0 <= cfg.seed < 2 ** 32:
        raise ValueError(f"seed={cfg.seed} must be in [0, 2**32 - 1] (numpy's seed range)")
    model = cfg.model
    if str(model.source) == "tiny" and cfg.dataset.max_length > model.max_position_embeddings:   # before any SFT
        raise ValueError(f"dataset.max_length={cfg.dataset.max_length} exceeds the model's context length "
                         f"{model.max_position_embeddings} (model.max_position_embeddings); set dataset.max_length<="
                         f"{model.max_position_embeddings} or raise model.max_position_embeddings")
    for key in ("name_or_path", "gguf_file"):
        if model[key] and str(model.source) != "hf":                    # silently ignored otherwise
            raise ValueError(f"model.{key}={model[key]} is read by model=hf only; model.source={model.source} builds "
                             f"its own model: add model=hf to load {model[key]}")


def prior_optimizer(optimizer_cfg, prior, device="cpu") -> torch.optim.Optimizer:
    """The prior's own optimiser: the optimizer config with prior.lr, over the prior's parameter groups (a group's
    own weight_decay wins: decoupled with AdamW, an L2 term with SGD and RMSprop, as torch defines them)."""
    from hydra.utils import instantiate
    return build(instantiate(optimizer_cfg, lr=prior.lr), prior.param_groups(), device)


def scored_train_pairs(pairs: list, tc, seed: int, processes: int) -> tuple[list, str]:
    """The training pairs the reference pass scores, and why: those steps 1..max_steps draw when the run ends
    within its first epoch (the same permutation the loader deals out: engine/draws.py), else every pair. The
    cache key covers exactly the pairs scored, so a longer run later gets its own entry."""
    if tc.eval_train:
        return pairs, "trainer.eval_train=true scores every training pair at the end"
    drawn = pairs_drawn(len(pairs), seed, tc.batch_size, tc.grad_accum, processes, tc.max_steps)
    on = f"of batch_size={tc.batch_size} on {processes} process{'es' if processes > 1 else ''}"
    if drawn is None:
        return pairs, f"max_steps={tc.max_steps} x grad_accum={tc.grad_accum} micro-batches {on} cover a full epoch"
    return [pairs[i] for i in drawn], (f"those that max_steps={tc.max_steps} x grad_accum={tc.grad_accum} "
                                       f"micro-batches {on} draw, and the one micro-batch the loader collates ahead")


def flatten(d: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists become strings (trackers take scalars)."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


@dataclasses.dataclass(frozen=True)
class Stage:
    """One training of a pipeline (a prior whose run is several trainings: midpo_cli/pipelines), as what differs
    from the run's own config. The default stage is the run itself, as configured."""
    name: str = ""                    # "": the run itself; else its sub-directory (e.g. "rounds/1"), hashed apart
    prior: dict = dataclasses.field(default_factory=dict)   # prior settings over the run's (e.g. {"snapshot": ...});
                                                            # with a "name": another prior, these settings only
    start: str | None = None          # model directory the policy starts from (None: the task's reference)
    rows: tuple | None = None         # (train rows, eval rows) instead of the task's pairs
    config: dict = dataclasses.field(default_factory=dict)  # dotted config keys over the run's, for this training
                                                            # alone (e.g. {"trainer.max_steps": 40}); hashed with it
    seed: int | None = None           # this training's seed (initialisation, loader order, sampling) instead of the
                                      # run's, which still makes the task's data and reference (their digests key them)

    @property
    def key(self) -> dict:
        """What sets this stage apart in its config hash (the rows enter through the pairs' digest)."""
        return {"stage": self.name, "prior": self.prior, "start": self.start} if self.name else {}


def stage_config(cfg: DictConfig, stage: Stage) -> DictConfig:
    """The run's config with the stage's `config` keys set (a copy; the run's own when there are none)."""
    if not stage.config:
        return cfg
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    for key, value in stage.config.items():
        if OmegaConf.select(cfg, key, default=KeyError) is KeyError:
            raise ValueError(f"stage {stage.name or 'run'}: config key {key} does not exist")
        OmegaConf.update(cfg, key, value, merge=False)
    return cfg


class Recipe:
    """One training run of the config `cfg` (a composed `midpo train` config), or one stage of its pipeline."""

    def __init__(self, cfg: DictConfig, stage: Stage = Stage()):
        cfg = stage_config(cfg, stage)
        check_config(cfg)
        self.cfg, self.tc, self.stage = cfg, cfg.trainer, stage
        self.seed = cfg.seed if stage.seed is None else stage.seed        # the training's; the task's is cfg.seed
        self.task = build_task(cfg.dataset)                                # the task's own settings, checked
        trackers.check(list(self.tc.trackers), self.tc.tracking_uri)       # installed, their server answering
        check_source(cfg.model)                                            # a broken model directory, by its headers
        own = OmegaConf.to_container(cfg.prior, resolve=True, enum_to_str=True)
        self.prior_settings = stage.prior if "name" in stage.prior else {**own, **stage.prior}   # the model card's
        self.prior = build_prior(self.prior_settings)
        self.needs = self.prior.needs()                                    # what the engine computes for it
        if self.needs.cross_prompts and self.tc.batch_size < 2:
            raise ValueError(f"trainer.batch_size={self.tc.batch_size}: prior '{self.prior.name}' scores each response "
                             "after other prompts of its batch; set trainer.batch_size >= 2")
        settings = run_settings(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True))
        if "name" in stage.prior:                                          # another prior: the run's is not trained
            settings["prior"] = stage.prior
        if stage.seed is not None:
            settings["seed"] = stage.seed
        self.settings = settings | stage.key
        self.config_hash = config_hash(self.settings)
        self.lora = cfg.model.lora.r > 0
        self.on_results = []                                               # callables adding to the results

    def inputs(self) -> dict[str, dict]:
        """Fingerprints of every file the run reads (data, model, a prior's snapshot model)."""
        return run_inputs(self.task, self.cfg.model, self.prior, Path(self.cfg.cache_dir) / "fingerprints")

    # -- set-up ------------------------------------------------------------------------------------------------

    def setup(self, run_dir: Path, resume_from: Path | None = None, overrides: list[str] = (),
              rerun: str = "") -> Recipe:
        """Build everything the steps use, once. `overrides`: the command line's (recorded in results.json);
        `rerun`: the command that continues this run, named when a stop signal ends it early."""
        self.run_dir, self.resume_from, self.overrides, self.rerun = run_dir, resume_from, list(overrides), rerun
        self.t_start = time.perf_counter()
        self.acc = self._accelerator()
        self._models()
        self._pairs()
        self._reference_cache()
        self._attach_prior()
        self._compile()
        self._optimisers()
        self._resume()
        self._trackers()
        return self

    def _accelerator(self):
        from accelerate import Accelerator
        from accelerate.utils import GradientAccumulationPlugin

        tc = self.tc
        return Accelerator(mixed_precision=PRECISION[tc.precision], cpu=not torch.cuda.is_available(),
                           step_scheduler_with_optimizer=False, gradient_accumulation_plugin=GradientAccumulationPlugin(
                               num_steps=tc.grad_accum, sync_with_dataloader=False))

    def _trackers(self) -> None:
        """The trackers (main process), started before the first step: the same tracker runs as before when the
        run directory kept their ids (a resumed or requeued run); a sweep job's grouped under its sweep."""
        names = list(self.tc.trackers) if self.acc.is_main_process else []
        sweep = trackers.sweep_of(self.run_dir)
        name = f"{self.run_dir.parent.name}/{self.run_dir.name}"
        if sweep is not None:                                              # priors x seeds: "<sweep>/<job>: dpo seed=0"
            name += f": {self.prior.name} seed={self.seed}"
        self.trackers = trackers.Trackers(names, trackers.Where(self.run_dir, name[:250], sweep, self.tc.tracking_uri))
        self.trackers.start(flatten(OmegaConf.to_container(self.cfg, resolve=True, enum_to_str=True)))

    def _models(self) -> None:
        """The tokenizer, the policy (from the task's reference weights, e.g. after its SFT, or from the stage's
        start) and the reference (always the task's)."""
        model, acc, needs, start = self.cfg.model, self.acc, self.needs, self.stage.start
        self.tokenizer = load_tokenizer(model)
        self.ctx = Context(self.tokenizer, model, self.cfg.seed, Path(self.cfg.cache_dir), acc.device)
        seed_everything(self.cfg.seed)                                     # the task's reference (a seeded init too)
        with acc.main_process_first():                                     # e.g. SFT, cached for the others
            path = self.task.reference_weights(self.ctx)
        self.reference_path = path                                         # None: the model config's own weights
        reference = load_model(model, self.tokenizer, path=path)
        self.reference_digest = weights_digest(reference)                 # the reference cache's key, for resume
        policy = reference if start is None else load_model(model, self.tokenizer, path=start)
        self.start_digest = self.reference_digest if start is None else weights_digest(policy)
        check_lengths(self.cfg.dataset, policy)
        if self.stage.seed is not None:
            seed_everything(self.seed)                                     # the training's own from here (LoRA init)
        self.policy = (add_lora(policy, model.lora) if self.lora else policy).to(acc.device)
        self.pack = pack_kind(self.policy) if self.tc.packing else None   # the layout batches carry (engine/pack.py)
        wants = needs.reference_model or needs.snapshot == "reference" or self.task.evaluates_reference \
            or self.prior.learnable                                        # a learnable prior builds on it in attach
        self.reference = None
        if wants and self.lora and start is None:
            self.reference = AdapterOff(self.policy)                       # the policy without its adapter
        elif wants:
            self.reference = frozen(copy.deepcopy(self.policy) if start is None else reference).to(acc.device)

    def _pairs(self) -> None:
        """The task's rows, tokenised and checked (data_report.json), and the snapshot a prior compares with."""
        acc, needs, dataset = self.acc, self.needs, self.cfg.dataset
        with acc.main_process_first():                                     # e.g. sampled pairs, cached
            train_rows, eval_rows = self.stage.rows or self.task.pairs(self.ctx, self.reference)
        self.snapshot = None
        if needs.snapshot:
            self.snapshot = self.reference if needs.snapshot == "reference" else \
                frozen(load_model(self.cfg.model, self.tokenizer, path=needs.snapshot)).to(acc.device)
        seed_everything(self.seed)
        self.train_pairs, train_report = build_pairs(train_rows, self.tokenizer, dataset, needs.token_columns, "train")
        self.eval_pairs, eval_report = build_pairs(eval_rows, self.tokenizer, dataset, needs.token_columns, "eval")
        self.pairs_digest = pairs_digest(self.train_pairs + self.eval_pairs)
        before = self.resume_from.parent.parent if self.resume_from else None
        derived = {"pairs": self.pairs_digest, "reference": self.reference_digest}
        if self.stage.start is not None:
            derived["start"] = self.start_digest
        check_derived(self.run_dir, derived, before, acc.is_main_process)
        if acc.is_main_process:
            save_report([train_report, eval_report], self.run_dir)
        else:                                                              # the same verdict, without the table
            check_bad_fraction([train_report, eval_report], str(self.run_dir / "data_report.json"))
        if not self.train_pairs:
            raise ValueError("no training pairs left (see the data report above: data_report.json)")
        self.data = {"train_pairs": len(self.train_pairs), "eval_pairs": len(self.eval_pairs),
                     "truncated": train_report["truncated"] + eval_report["truncated"],
                     "dropped": train_report["dropped"] + eval_report["dropped"]}

    def _reference_cache(self) -> None:
        """trainer.ref_cache: the reference's log-probs of the pairs the run uses, computed once and cached (also
        gives reference-free priors their logratio/* metrics)."""
        self.ref_cache = None
        if not self.tc.ref_cache:
            return
        acc = self.acc
        scorer = self.policy if self.reference is None else self.reference   # untrained, the policy is the reference
        scored, why = scored_train_pairs(self.train_pairs, self.tc, self.seed, acc.num_processes)
        log.info("reference log-probs: %d of %d training pairs (%s), and all %d eval pairs", len(scored),
                 len(self.train_pairs), why, len(self.eval_pairs))
        with acc.main_process_first():
            self.ref_cache = refcache.attach(
                [scored, self.eval_pairs], scorer, self.reference_digest, self.tokenizer, Path(self.cfg.cache_dir),
                self.tc.precision, acc.device, self.tokenizer.pad_token_id,
                self.pairs_digest if scored is self.train_pairs else None, self.pack,   # the pairs are hashed once
                self.tc.eval_batch_size)

    def _attach_prior(self) -> None:
        """The prior's own models are built on the policy and reference; a cache replaces the reference copy."""
        needs = self.needs
        self.prior.attach(self.policy, self.reference)
        self.prior.to(self.acc.device)
        needed = live_reference(needs, cached=self.ref_cache is not None) or self.task.evaluates_reference
        if self.reference is not None and not needed and not self.lora:
            self.reference = None
            self.snapshot = None if needs.snapshot == "reference" else self.snapshot

    def _compile(self) -> None:
        """trainer.compile: each decoder block of the policy, the reference and the snapshot compiled (the first
        steps pay for it; results.json's compile_blocks says how many)."""
        self.compiled = compile_blocks(self.policy, self.reference, self.snapshot) if self.tc.compile else 0
        if self.tc.compile and not self.compiled:
            log.warning("trainer.compile=true: no list of decoder blocks found in the model; it runs uncompiled")

    def _optimisers(self) -> None:
        """The policy's optimiser and schedule, the prior's (when it has parameters), the loader: all prepared."""
        from hydra.utils import instantiate

        tc, acc = self.tc, self.acc
        optimizer = build(instantiate(self.cfg.optimizer), [p for p in self.policy.parameters() if p.requires_grad],
                          acc.device)
        sched = schedule(optimizer, tc.lr_schedule, tc.warmup_steps, tc.max_steps)
        required = (refcache.COLUMN,) if tc.ref_cache else ()
        loader = data_loader(self.train_pairs, tc.batch_size, self.seed, self.tokenizer.pad_token_id, required,
                             self.pack)
        self.prior_params, extra = self.prior.trainable(), []
        if self.prior_params:                                              # a learnable prior: its own optimiser
            prior_opt = prior_optimizer(self.cfg.optimizer, self.prior, acc.device)
            extra = [prior_opt, schedule(prior_opt, tc.lr_schedule, tc.warmup_steps, tc.max_steps)]
        self.policy, self.optimizer, self.sched, self.loader, *extra = acc.prepare(
            self.policy, optimizer, sched, loader, *extra)
        self.prior_opt, self.prior_sched = extra if extra else (None, None)
        self.lrs = "optimizer.lr" + (" or prior.lr" if self.prior_opt is not None else "")  # a non-finite stop's advice
        self.models = {"reference": self.reference, "snapshot": self.snapshot,
                       "layout": Layout(Rules(self.cfg.dataset.max_length, self.cfg.dataset.max_prompt_length),
                                        self.tokenizer.pad_token_id)}

    def _resume(self) -> None:
        """Weights, optimisers, schedules, RNG and data position of the checkpoint resumed from; metrics.jsonl."""
        acc, tc = self.acc, self.tc
        self.start_step = 0
        if self.resume_from is not None:
            self.start_step = checkpoint.load(acc, self.resume_from, self.prior, tc.max_steps)
            if acc.is_main_process:
                metrics_upto(self.run_dir, self.resume_from.parent.parent, self.start_step)
            log.info("resumed from %s at step %d", self.resume_from, self.start_step)
        elif acc.is_main_process:
            files.write_text(self.run_dir / "metrics.jsonl", "")            # a restart without checkpoint
        self.batches = endless(acc, self.loader, self.start_step * tc.grad_accum)
        self.window, self.history, self.warnings = [], {}, []
        self.displacement = Displacement(tc.displacement_nats)
        if self.resume_from is not None and acc.is_main_process:             # the monitors see the run from its start
            for row in metrics_rows(self.run_dir / "metrics.jsonl"):
                self.warnings += [{"step": row.get("step"), "warning": w} for w in self.monitors(row)]
        self.tokens, self.skipped = 0, 0
        self.batches_seen = {"micro_batches": 0, "packed": 0, "token_slots": 0, "tokens": 0}   # engine/pack.py
        self.last_ckpt = str(self.resume_from) if self.resume_from else None

    # -- the loop ----------------------------------------------------------------------------------------------

    def train(self) -> dict:
        """Steps start_step+1 .. trainer.max_steps, then the results (results.json on the main process)."""
        from midpo_cli.console import progress

        metrics = self.run_dir / "metrics.jsonl"
        self.metrics_file = metrics.open("a") if self.acc.is_main_process else None
        self.policy.train()
        t0 = time.perf_counter()
        try:
            with progress("train", self.tc.max_steps, "steps", self.start_step) as bar, Signals() as signals:
                for step in range(self.start_step + 1, self.tc.max_steps + 1):
                    m, stopping = self.step(step, signals)
                    bar.info = f"loss {m['loss']:.4f}  acc {m['rewards/accuracies']:.2f}"
                    bar.advance()
                    self.write(step, self.evaluate(step, self.log(step, m)))
                    self.checkpoint(step, stopping)
                    self.stop(step, stopping, signals)
            self._close()
            return self.finish(time.perf_counter() - t0)
        except BaseException:                                              # a stop signal, a failure: the tracker
            self.trackers.finish(ok=False)                                 # runs end as killed (resumable)
            raise

    def step(self, step: int, signals: Signals) -> tuple[dict, bool]:
        """One optimiser step over trainer.grad_accum micro-batches: its metrics (averaged over processes) and
        whether any process got a stop signal (by the end of its backward passes)."""
        policy_on, prior_on = self.prior.updates(step)
        micro, views = self._backward()
        m = self._reduced(micro, self._clip(), signals.got > 0)
        stopping = m.pop("_signal") > 0
        finite = all(math.isfinite(m[k]) for k in ("loss", "grad_norm", "prior/grad_norm") if k in m)
        if finite:
            self._apply(policy_on, prior_on)
        else:
            self._skip(step, micro, views)
        self.optimizer.zero_grad(set_to_none=True)
        if self.prior_opt is not None:
            self.prior_opt.zero_grad(set_to_none=True)
        if finite:
            self.prior.on_step(step, self.acc.unwrap_model(self.policy))
        m["lr"], m["skipped_steps"] = self.sched.get_last_lr()[0], self.skipped
        self.tokens += m["tokens"]
        return m, stopping

    def _backward(self) -> tuple[list[dict], list]:
        """Loss and gradients of each micro-batch; the prior's gradients averaged over processes (not DDP-wrapped)."""
        acc, micro, views = self.acc, [], []
        for _ in range(self.tc.grad_accum):
            batch = next(self.batches)
            with acc.accumulate(self.policy), acc.autocast():
                loss, m, view = step_loss(batch, self.policy, self.prior, self.models, self.tc.kl_chunk, host=False)
                acc.backward(loss)
            self._count(batch, view)
            micro.append(m)
            views.append(view)
        if self.prior_params and acc.num_processes > 1:
            for p in self.prior_params:
                if p.grad is not None:
                    p.grad = acc.reduce(p.grad, reduction="mean")
        return micro, views

    def _count(self, batch: dict, view) -> None:
        """How the micro-batch ran: packed or padded, and the token slots a padded batch holds (padding included)."""
        seen = self.batches_seen
        seen["micro_batches"] += 1
        seen["packed"] += int(view.packed)
        seen["token_slots"] += batch["attention_mask"].numel()
        seen["tokens"] += batch["tokens"]

    def _reduced(self, micro: list[dict], norms: dict, signalled: bool) -> dict:
        """The step's metrics as floats: the micro-batches' means (tokens summed), the gradient norms and whether a
        stop signal arrived, averaged over processes. The values still on the device leave it in one transfer (one
        collective with several processes): the step's only host-device synchronisation, which the non-finite
        guard needs anyway. A non-finite micro-batch loss makes the mean loss non-finite."""
        keys = [k for k in micro[0] if k != "tokens"]
        held = [k for k in keys if all(isinstance(x[k], torch.Tensor) for x in micro)]   # the rest: host values
        host = {k: sum(float(x[k]) for x in micro) / len(micro) for k in keys if k not in held}
        host["tokens"] = float(sum(x["tokens"] for x in micro))
        host["_signal"] = float(signalled)
        device = [torch.stack([x[k].detach().float().reshape(()) for x in micro]).mean() for k in held]
        device += [v.detach().float().reshape(()).to(self.acc.device) for v in norms.values()]
        names = [*held, *norms]
        if self.acc.num_processes > 1:                                    # one collective for everything
            names += list(host)
            device += [torch.tensor(list(host.values()), device=self.acc.device)]
            values = self.acc.reduce(torch.cat([d.reshape(-1) for d in device]), reduction="mean").tolist()
            m = dict(zip(names, values))
            m["tokens"] *= self.acc.num_processes
        else:
            m = dict(zip(names, torch.stack(device).tolist())) | host
        return {k: m[k] for k in [*keys, "tokens", *norms, "_signal"]}

    def _clip(self) -> dict:
        """Gradient norms of the policy and the prior (0-d tensors), clipped where trainer.max_grad_norm /
        prior.max_grad_norm say."""
        tc, params = self.tc, self.prior_params
        out = {"grad_norm": total_norm(self.policy.parameters()) if tc.max_grad_norm <= 0 else
               self.acc.clip_grad_norm_(self.policy.parameters(), tc.max_grad_norm)}
        if params:
            out["prior/grad_norm"] = total_norm(params) if self.prior.max_grad_norm <= 0 else \
                torch.nn.utils.clip_grad_norm_(params, self.prior.max_grad_norm)
        return out

    def _apply(self, policy_on: bool, prior_on: bool) -> None:
        if policy_on:
            self.optimizer.step()
            self.sched.step()
        if self.prior_opt is not None and prior_on:
            self.prior_opt.step()
            self.prior_sched.step()

    def _skip(self, step: int, micro: list[dict], views: list) -> None:
        """A non-finite step: stop the run (trainer.on_nonfinite=stop, or weights already non-finite) or skip it."""
        where = next((diagnose(v, self.prior) for v, x in zip(views, micro) if not math.isfinite(x["loss"])),
                     "the gradients (finite loss, non-finite gradient norm)")
        weights_ok = finite_parameters(self.acc.unwrap_model(self.policy), self.prior)
        if self.tc.on_nonfinite == "stop" or not weights_ok:
            broken = "" if weights_ok else "the weights themselves are no longer finite; "
            raise self._nonfinite(f"non-finite values at step {step}, in {where}; {broken}nothing was trained on "
                                  "them and no non-finite weights were written", ", check the data, or "
                                  "trainer.on_nonfinite=skip")
        self.skipped += 1
        log.warning("step %d skipped (trainer.on_nonfinite=skip): non-finite values in %s", step, where)

    def _nonfinite(self, what: str, advice: str) -> NonFinite:
        """The one message of every non-finite stop: what, the last good checkpoint, what to lower."""
        last = f"last good checkpoint: {self.last_ckpt}" if self.last_ckpt else "no checkpoint was written"
        return NonFinite(f"{what}; {last}. Lower {self.lrs}{advice}")

    def log(self, step: int, m: dict) -> dict | None:
        """The step's metrics join the window; every trainer.log_every steps (and at the end) they become a row."""
        self.window.append(m)
        if step % self.tc.log_every and step != self.tc.max_steps:
            return None
        row, self.window = {"step": step, **window_row(self.window)}, []
        return row

    def evaluate(self, step: int, row: dict | None) -> dict | None:
        """Held-out preference metrics every trainer.eval_every steps and at the end; with trainer.eval_train, the
        final J on every training pair too."""
        tc, pad = self.tc, self.tokenizer.pad_token_id
        last = step == tc.max_steps
        if tc.eval_every and step % tc.eval_every == 0 or last:
            ev = evaluate_pairs(self.acc, self.policy, self.prior, self.models, self.eval_pairs, tc, pad)
            bad = [k for k, v in ev.items() if not math.isfinite(v)]
            if bad:
                raise self._nonfinite(f"non-finite held-out metrics at step {step} ({', '.join(bad)})",
                                      " or check the eval data")
            row = (row or {"step": step}) | ev
            self._sample_table(step)
        if tc.eval_train and last:
            row = (row or {"step": step}) | evaluate_pairs(self.acc, self.policy, self.prior, self.models,
                                                           self.train_pairs, tc, pad, prefix="train/")
        return row

    def _sample_table(self, step: int) -> None:
        """The trackers' table of trainer.sample_table held-out prompts, sampled from policy and reference by the
        task (main process); the training's random state is left as it was."""
        if not self.trackers.live or not self.tc.sample_table:
            return
        with torch.random.fork_rng(devices=[self.acc.device] if self.acc.device.type == "cuda" else []):
            torch.manual_seed(self.seed + step)
            rows = self.task.sample_rows(self.ctx, self.acc.unwrap_model(self.policy), self.reference,
                                         self.tc.sample_table)
        self.trackers.table("samples", rows, step)

    def write(self, step: int, row: dict | None) -> None:
        """A row: the prior's and the run's monitor warnings (engine/monitor.py), metrics.jsonl, the trackers (main
        process)."""
        if not row:
            return
        main = self.acc.is_main_process
        for w in self.monitors(row):
            if main:
                log.warning("step %d: %s", step, w)
            self.warnings.append({"step": step, "warning": w})
        if main:
            append_row(self.metrics_file, row)
            self.trackers.scalars({k: v for k, v in row.items() if k != "step"}, step)
            self.history.update(row)

    def monitors(self, row: dict) -> list[str]:
        """Warnings of a metrics row: the prior's own (e.g. a learnable prior's collapse) and the run's."""
        return [*self.prior.monitor(row), *self.displacement(row)]

    def checkpoint(self, step: int, stopping: bool) -> None:
        """Every trainer.save_every steps, and when a stop signal arrived (not at the last step: the run ends)."""
        tc = self.tc
        if step >= tc.max_steps or not (stopping or tc.save_every and step % tc.save_every == 0):
            return
        if not finite_parameters(self.acc.unwrap_model(self.policy), self.prior):
            last = f"; last good checkpoint: {self.last_ckpt}" if self.last_ckpt else ""
            raise NonFinite(f"the weights are not finite at step {step}; no checkpoint was written{last}")
        self.last_ckpt = str(checkpoint.save(self.acc, self.run_dir, step, self.config_hash, self.prior))

    def stop(self, step: int, stopping: bool, signals: Signals) -> None:
        """A stop signal ends the run after its checkpoint, naming the command that continues it; at the last
        step nothing is left to continue, so the run finishes instead."""
        if not stopping:
            return
        if step == self.tc.max_steps:
            log.warning("signal %d at the last step: finishing the run (evaluation, saving) instead of stopping",
                        int(signals.got or 0))
            return
        self._close()
        signals.stop(step, self.last_ckpt, self.rerun)

    def _close(self) -> None:
        if self.metrics_file:
            self.metrics_file.close()
            self.metrics_file = None

    # -- the end -----------------------------------------------------------------------------------------------

    def finish(self, train_wall: float) -> dict:
        """The results: final metrics, throughput, the task's sampled evaluation; the model and the prior's state
        (a learned prior, a moving reference) saved (only when finite); results.json written last."""
        acc, policy = self.acc, self.acc.unwrap_model(self.policy)
        results = {"config": OmegaConf.to_container(self.cfg, resolve=True, enum_to_str=True),
                   "overrides": self.overrides, "prior": self.prior.name, "seed": self.seed, "data": self.data,
                   "ref_cache": self.ref_cache, "resumed_from": str(self.resume_from) if self.resume_from else None,
                   "final": self.history, "train_wall_s": train_wall,
                   "tokens_per_s": self.tokens / train_wall if train_wall else 0.0, "skipped_steps": self.skipped,
                   "warnings": self.warnings, "peak_memory_mb": peak_memory_mb(acc.device),
                   "world_size": acc.num_processes, "batches": self._batches(),
                   "compiled_blocks": self.compiled}
        if acc.is_main_process:
            seed_everything(self.seed + 3)
            ev = self.task.evaluate(self.ctx, policy, self.reference)
            if ev:
                results["eval"], results["eval_title"] = ev, self.task.title
        if not finite_parameters(policy, self.prior):
            raise NonFinite("the trained weights are not finite; nothing was saved. Lower optimizer.lr")
        if acc.is_main_process and self.prior.state_dict():
            with files.published_dir(self.run_dir / "prior", "the prior's state") as tmp:
                self.prior.save(tmp)
        for add in self.on_results:
            add(results)
        if self.tc.save_model:                                             # its card holds the results so far
            self._save_model(policy, {**results, "wall_time_s": time.perf_counter() - self.t_start})
        results["wall_time_s"] = time.perf_counter() - self.t_start
        if acc.is_main_process:
            files.write_json(self.run_dir / "results.json", results)
            self._end_trackers(results)
        acc.wait_for_everyone()
        return results

    def _end_trackers(self, results: dict) -> None:
        """The final table, results.json and the prior's saved state (a learned prior's parameters) to the
        trackers; their runs finish."""
        self.trackers.table("final", trackers.final_rows(results), self.tc.max_steps)
        for path in (self.run_dir / "results.json", *sorted((self.run_dir / "prior").glob("*"))):
            self.trackers.artifact(path)
        self.trackers.finish(ok=True)

    def _batches(self) -> dict:
        """How this process's training batches ran (engine/pack.py): the layout and attention, the share of
        micro-batches that ran packed, and the share of a padded batch's token slots that are padding."""
        seen, base = self.batches_seen, unwrap(self.policy)
        n = max(1, seen["micro_batches"])
        return {"packing": self.pack or "off", "attention": attention_of(base), "packed_share": seen["packed"] / n,
                "padding_share": 1 - seen["tokens"] / seen["token_slots"] if seen["token_slots"] else 0.0,
                "micro_batches": seen["micro_batches"]}

    def _save_model(self, policy, results: dict) -> None:
        """model/ (LoRA merged into the weights) with its model card (README.md: report/card.py), appearing only
        when whole; a LoRA run also saves adapter/ (peft's adapter files, the tokenizer and a card), before the merge.
        Only the main process writes the cards."""
        acc, main = self.acc, self.acc.is_main_process
        multi = acc.num_processes > 1
        about = {"results": results, "prior": self.prior_settings, "reference": self.reference_path,
                 "start": self.stage.start, "stage": self.stage.name}
        if self.lora:
            base = self._adapter_base()
            with files.published_dir(self.run_dir / "adapter", "the LoRA adapter", main) as tmp:
                save_adapter(policy, tmp, base, main, acc.get_state_dict(policy) if multi else None)
                if main:
                    self.tokenizer.save_pretrained(tmp)
                    files.write_text(tmp / "README.md", model_card(**about, adapter=base or ""))
                acc.wait_for_everyone()
        saved = merged_for_saving(policy) if self.lora else policy
        with files.published_dir(self.run_dir / "model", "the final model", main) as tmp:
            saved.save_pretrained(tmp, safe_serialization=True, is_main_process=main,
                                  state_dict=acc.get_state_dict(saved) if multi else None)
            if main:
                self.tokenizer.save_pretrained(tmp)
                files.write_text(tmp / "README.md", model_card(**about))
            acc.wait_for_everyone()

    def _adapter_base(self) -> str | None:
        """The model a LoRA adapter goes on: the directory the policy was loaded from (the stage's start, the task's
        reference, a local model.name_or_path), else the Hub id it came from; None for a model built in code."""
        model = self.cfg.model
        path = self.stage.start or self.reference_path
        if path is None and model.source == "hf":
            path = local_path(str(model.name_or_path))
        return str(Path(path).resolve()) if path is not None else base_model(model)
