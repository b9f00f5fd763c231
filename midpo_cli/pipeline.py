"""Set-up of one run: tokenizer, policy, reference (a frozen copy, or the LoRA policy with adapters off),
snapshot, and the train/eval rows (the built-in task's cached SFT reference and pairs, or a dataset)."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

from midpo_cli.tasks import builtin
from midpo_cli.data.sources import load_rows
from midpo_cli.engine.lora import AdapterOff, add_lora
from midpo_cli.engine.models import check_lengths, frozen, load_model, load_tokenizer


@dataclass
class Setup:
    tokenizer: object
    policy: object
    reference: object | None          # what computes pi_ref live (None when nothing needs it)
    snapshot: object | None
    train_rows: list
    eval_rows: list
    task: object | None = None        # the built-in task's settings, when dataset=builtin
    eval_strings: list = field(default_factory=list)


def _reference_of(policy, cfg, device):
    return AdapterOff(policy) if cfg.model.lora.r > 0 else frozen(copy.deepcopy(policy)).to(device)


def prepare(cfg, needs, device) -> Setup:
    tokenizer = load_tokenizer(cfg.model)
    cache_root = Path(cfg.cache_dir)
    task = cfg.dataset.task if cfg.dataset.source == "builtin" else None
    path = None
    if task is not None:
        builtin.check(task)
        path = str(builtin.sft_reference(task, cfg.model, tokenizer, cfg.seed, cache_root, device))
    policy = load_model(cfg.model, tokenizer, path=path)
    check_lengths(cfg.dataset, policy)
    if cfg.model.lora.r > 0:
        policy = add_lora(policy, cfg.model.lora)
    policy.to(device)
    wants_reference = needs.reference_model or needs.snapshot == "reference" or task is not None
    reference = _reference_of(policy, cfg, device) if wants_reference else None
    eval_strings = []
    if task is not None:
        data = builtin.preference_pairs(task, reference, tokenizer, Path(path).name, cfg.seed, cache_root, device)
        rows = data["pairs"]
        n_eval = int(len(rows) * task.eval_pairs_fraction)
        eval_rows, train_rows, eval_strings = rows[:n_eval], rows[n_eval:], data["eval_strings"]
    else:
        train_rows, eval_rows = load_rows(cfg.dataset)
    snapshot = None
    if needs.snapshot:
        snapshot = reference if needs.snapshot == "reference" else \
            frozen(load_model(cfg.model, tokenizer, path=needs.snapshot)).to(device)
    return Setup(tokenizer, policy, reference, snapshot, train_rows, eval_rows, task, eval_strings)
