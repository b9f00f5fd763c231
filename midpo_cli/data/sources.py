"""Where preference rows come from: local files (jsonl/json/parquet/csv) or a hub dataset id."""
from __future__ import annotations

import json
import random
from pathlib import Path

FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def _decode(value):
    """CSV cells holding JSON message lists are parsed back into lists."""
    if isinstance(value, str) and value[:1] == "[":
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def load_rows(cfg) -> tuple[list[dict], list[dict]]:
    """(train rows, eval rows) in TRL's prompt/chosen/rejected format."""
    from datasets import load_dataset

    if cfg.source == "local":
        if not cfg.path:
            raise ValueError("dataset=local needs dataset.path=FILE (jsonl, json, parquet or csv)")
        path = Path(cfg.path).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"dataset.path={cfg.path}: no such file (cwd: {Path.cwd()})")
        kind = FORMATS.get(path.suffix.lower())
        if kind is None:
            raise ValueError(f"dataset.path={cfg.path}: unsupported extension '{path.suffix}'; use one of {sorted(FORMATS)}")
        ds = {"train": load_dataset(kind, data_files={"train": str(path)}, split="train")}
    elif cfg.source == "hub":
        if not cfg.path:
            raise ValueError("dataset=hub needs dataset.path=<hub dataset id>")
        ds = load_dataset(cfg.path)
    else:
        raise ValueError(f"dataset.source='{cfg.source}' is not one of builtin, local, hub")
    if cfg.split not in ds:
        raise ValueError(f"dataset split '{cfg.split}' not found; available: {sorted(ds)}")
    train = [{k: _decode(v) for k, v in r.items()} for r in ds[cfg.split]]
    if cfg.eval_split:
        if cfg.eval_split not in ds:
            raise ValueError(f"dataset.eval_split '{cfg.eval_split}' not found; available: {sorted(ds)}")
        evals = [{k: _decode(v) for k, v in r.items()} for r in ds[cfg.eval_split]]
    else:
        random.Random(0).shuffle(train)
        n_eval = int(len(train) * cfg.eval_fraction)
        evals, train = train[:n_eval], train[n_eval:]
    if cfg.max_rows:
        train = train[:cfg.max_rows]
    return train, evals
