"""From raw rows to tokenised pairs, with a data report: formats detected, rows kept, dropped, truncated.

Formats (TRL's, detected per dataset): standard (prompt/chosen/rejected strings), conversational
(lists of role/content messages, rendered with the chat template) and implicit prompt (only chosen and
rejected, sharing a prefix: the shared part becomes the prompt).
"""
from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

from midpo_cli.data.tokenize import Dropped, _is_messages, encode_pair

log = logging.getLogger("midpo")


def split_implicit(chosen, rejected):
    """(prompt, chosen, rejected) from two responses that share their beginning (TRL's implicit prompt)."""
    if _is_messages(chosen) and _is_messages(rejected):
        n = 0
        while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
            n += 1
        return chosen[:n], chosen[n:], rejected[n:]
    a, b = str(chosen), str(rejected)
    i = 0
    while i < min(len(a), len(b)) and a[i] == b[i]:
        i += 1
    if 0 < i and a[i - 1] == " ":                                          # keep the space with the answer
        i -= 1
    return a[:i], a[i:], b[i:]


def detect_format(row: dict) -> str:
    if "prompt" not in row:
        return "implicit prompt"
    return "conversational" if _is_messages(row["prompt"]) else "standard"


def normalise(row: dict, cfg) -> dict:
    """Apply the column mapping and the implicit-prompt split; returns a prompt/chosen/rejected row."""
    names = {"prompt": cfg.prompt_column, "chosen": cfg.chosen_column, "rejected": cfg.rejected_column}
    out = {k: v for k, v in row.items() if k not in names.values()}
    for ours, theirs in names.items():
        if theirs in row:
            out[ours] = row[theirs]
    if "prompt" not in out and "chosen" in out and "rejected" in out:
        out["prompt"], out["chosen"], out["rejected"] = split_implicit(out["chosen"], out["rejected"])
    return out


def build_pairs(rows: list[dict], tokenizer, cfg, columns=(), split: str = "train"):
    """(pairs, report) for one split. Rows that cannot train are dropped with a reason, never silently."""
    pairs, dropped, truncated = [], Counter(), Counter()
    for i, raw in enumerate(rows):
        row = normalise(raw, cfg)
        missing = [c for c in ("prompt", "chosen", "rejected") if c not in row]
        if missing:
            raise ValueError(f"{split} row {i}: missing column(s) {missing}; found {sorted(raw)}. Map yours with "
                             "dataset.prompt_column= / chosen_column= / rejected_column=")
        if row["chosen"] == row["rejected"]:
            dropped["chosen identical to rejected"] += 1
            continue
        if isinstance(row["prompt"], (str, list)) and not row["prompt"]:
            dropped["empty prompt (implicit prompt: no shared beginning)"] += 1
            continue
        try:
            p = encode_pair(tokenizer, row, cfg.max_length, cfg.max_prompt_length, columns, cfg.truncation)
        except Dropped as e:
            dropped[str(e)] += 1
            continue
        if p.truncated:
            truncated[f"{p.truncated} truncated to fit"] += 1
        pairs.append(p)
    report = {"split": split, "format": detect_format(rows[0]) if rows else "empty", "rows_read": len(rows),
              "kept": len(pairs), "dropped": sum(dropped.values()), "dropped_reasons": dict(dropped),
              "truncated": sum(truncated.values()), "truncated_reasons": dict(truncated)}
    return pairs, report


def save_report(reports: list[dict], run_dir: Path) -> None:
    from rich.table import Table
    from midpo_cli.console import console

    (run_dir / "data_report.json").write_text(json.dumps(reports, indent=2))
    t = Table(title="data report")
    for c in ("split", "format", "rows read", "kept", "dropped", "truncated", "reasons"):
        t.add_column(c)
    for r in reports:
        reasons = "; ".join(f"{k}: {v}" for k, v in {**r["dropped_reasons"], **r["truncated_reasons"]}.items())
        t.add_row(r["split"], r["format"], str(r["rows_read"]), str(r["kept"]), str(r["dropped"]),
                  str(r["truncated"]), reasons or "-")
    console.print(t)
