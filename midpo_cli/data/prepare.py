"""From raw rows to tokenised pairs, with a data report: formats, rows read, kept, dropped (per reason, with
example locations) and truncated.

Each row is checked on its own (rows.check_row), so a file may mix TRL's formats. Bad rows are lines that
could not be read, missing / null / empty / non-text fields, and pairs whose chosen equals rejected before
or after truncation. dataset.on_bad_rows=drop (the default) drops them and counts each reason with
up to three locations (FILE:LINE) in data_report.json; dataset.on_bad_rows=error stops at the first one,
naming its file, line and column. Under drop, more than dataset.max_bad_fraction bad rows (train and eval
together) fail the run once the report is written: that many is a systematic problem (a wrong column
mapping, a broken export), and training on the rest would be a different experiment. Pairs skipped by
dataset.truncation=drop are counted too, but they are a chosen policy, not bad data.
"""
from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

from midpo_cli.console import progress
from midpo_cli.data.rows import BadRow, BadRowError, check_row, split_implicit, where_of  # noqa: F401
from midpo_cli.data.settings import DataSettings
from midpo_cli.data.tokenize import CHUNK, BatchIds, Dropped, Rules, char_limit, encode_pairs
from midpo_cli.engine.files import write_text

log = logging.getLogger("midpo")
EXAMPLES = 3                                                               # locations kept per reason


class TooManyBadRows(ValueError):
    """More than dataset.max_bad_fraction of the rows are bad."""


class Tally:
    """Counts per reason, with the first few locations of each in file order."""

    def __init__(self):
        self.counts, self._first = Counter(), {}

    def add(self, reason: str, example: str, order: int) -> None:
        self.counts[reason] += 1
        first = self._first.setdefault(reason, [])
        if len(first) < EXAMPLES or order < first[-1][0]:
            first.append((order, example))
            first.sort(key=lambda x: x[0])
            del first[EXAMPLES:]

    @property
    def examples(self) -> dict:
        return {k: [e for _, e in v] for k, v in self._first.items()}

    def total(self) -> int:
        return sum(self.counts.values())


def _identical(p, dataset) -> BadRow:
    if p.truncated:
        return BadRow("chosen identical to rejected after truncation", f"max_length={dataset.max_length}, "
                      f"max_prompt_length={dataset.max_prompt_length}", "they differ only in what truncation cut: "
                      "raise dataset.max_length / max_prompt_length, or let such pairs be dropped")
    return BadRow("chosen and rejected tokenise identically", hint="they differ only in what the tokenizer or "
                  "chat template does not keep (e.g. trailing spaces): fix or delete the row")


def build_pairs(rows: list[dict], tokenizer, dataset, columns=(), split: str = "train", chunk: int = CHUNK):
    """(pairs, report) for one split. Rows that cannot train are dropped and counted, never silently
    (or, under dataset.on_bad_rows=error, the first one stops the run). Rows are checked and tokenised `chunk`
    at a time (tokenize.encode_pairs), then met one by one in row order: the same pairs, counts, report and
    errors as one row at a time."""
    pairs, _, report = pairs_of_rows(rows, tokenizer, dataset, columns, split, chunk)
    return pairs, report


def pairs_of_rows(rows: list[dict], tokenizer, dataset, columns=(), split: str = "train", chunk: int = CHUNK):
    """build_pairs, and which rows the pairs come from: (pairs, row positions, report), the i-th pair made from
    rows[positions[i]] (a pipeline that adds columns to the rows a run trains on: midpo_cli/pipelines/tisdpo.py)."""
    dataset = DataSettings.of(dataset)                                             # read once, not per row
    strict = dataset.on_bad_rows == "error"
    columns = tuple(columns)
    rules = Rules(dataset.max_length, dataset.max_prompt_length, columns, dataset.truncation, char_limit(tokenizer, dataset.max_length))
    batch_ids = BatchIds(tokenizer)
    pairs, positions, formats, bad, policy, truncated, hints, first_bad = [], [], Tally(), Tally(), Tally(), Tally(), \
        {}, None
    with progress(f"{split} pairs", len(rows), "rows") as bar:
        for start in range(0, len(rows), chunk):
            checked = [_checked(raw, dataset, columns) for raw in rows[start:start + chunk]]
            ok = [c[1] for c in checked if not isinstance(c, Exception)]
            encoded = iter(encode_pairs(tokenizer, ok, rules, chunk, batch_ids))
            for i, (raw, c) in enumerate(zip(rows[start:start + chunk], checked), start):
                where, order = where_of(raw, split, i), getattr(raw, "index", i)
                try:
                    if isinstance(c, Exception):                               # what check_row raised for this row
                        raise c
                    formats.add(c[0], where, order)
                    p = next(encoded)
                    if isinstance(p, Exception):                               # what encode_pair raised for this row
                        raise p
                    if p.chosen == p.rejected:
                        raise _identical(p, dataset)
                except BadRow as e:
                    if strict and (first_bad is None or order < first_bad[0]):
                        first_bad = (order, where, e)                          # refused below: the first in file order
                    bad.add(e.reason, f"{where} ({e.detail})" if e.detail else where, order)
                    hints.setdefault(e.reason, e.hint)
                    continue
                except Dropped as e:
                    policy.add(str(e), where, order)
                    continue
                except ValueError as e:                                        # a run-level problem met on this row
                    raise ValueError(f"{where}: {e}") from None
                if p.truncated:
                    truncated.add(f"{p.truncated} truncated to fit", where, order)
                pairs.append(p)
                positions.append(i)
            bar.advance(len(checked))
    if first_bad is not None:
        raise BadRowError(first_bad[1], first_bad[2])
    kinds = dict(formats.counts)
    if len(kinds) > 1:
        log.warning("%s: rows in %d formats (%s); each row is read in its own format. First rows of each: %s",
                    split, len(kinds), ", ".join(f"{k} {v}" for k, v in kinds.items()),
                    "; ".join(f"{k}: {', '.join(formats.examples[k])}" for k in kinds))
    report = {"split": split, "source": dataset.path or dataset.source,
              "format": next(iter(kinds)) if len(kinds) == 1 else ("mixed" if kinds else "none"),
              "formats": kinds, "format_examples": formats.examples,
              "rows_read": len(rows), "kept": len(pairs), "dropped": bad.total() + policy.total(),
              "bad": bad.total(), "dropped_reasons": {**bad.counts, **policy.counts},
              "dropped_examples": {**bad.examples, **policy.examples}, "hints": hints,
              "truncated": truncated.total(), "truncated_reasons": dict(truncated.counts),
              "truncated_examples": truncated.examples,
              "on_bad_rows": dataset.on_bad_rows, "max_bad_fraction": dataset.max_bad_fraction}
    return pairs, positions, report


def _checked(raw, dataset: DataSettings, columns: tuple) -> tuple[str, dict] | Exception:
    """check_row's (format, row), or what it raised (met in row order by build_pairs)."""
    try:
        return check_row(raw, dataset, columns)
    except Exception as e:                                                 # noqa: BLE001
        return e


def _summary(reports: list[dict], n: int = 3) -> str:
    counts, first = Counter(), {}
    for r in reports:
        for reason, k in r["dropped_reasons"].items():
            if reason in r.get("hints", {}):
                counts[reason] += k
                first.setdefault(reason, r["dropped_examples"][reason][0])
    return "; ".join(f"{reason}: {k} (first: {first[reason]})" for reason, k in counts.most_common(n))


def check_bad_fraction(reports: list[dict], where: str = "data_report.json") -> None:
    """Under dataset.on_bad_rows=drop: warn about dropped bad rows, or fail when there are too many."""
    read, bad = sum(r["rows_read"] for r in reports), sum(r.get("bad", 0) for r in reports)
    if not bad:
        return
    limit = min(r.get("max_bad_fraction", 1.0) for r in reports)
    top = max(((k, r["hints"][reason]) for r in reports for reason, k in r["dropped_reasons"].items()
               if reason in r.get("hints", {})), default=(0, ""))[1]
    text = f"{bad} of {read} rows are bad ({bad / read:.1%}): {_summary(reports)}"
    if bad / read > limit:
        raise TooManyBadRows(f"{text}. More than dataset.max_bad_fraction={limit} is a systematic problem, not "
                             f"noise: {top}. Fix the data, or raise dataset.max_bad_fraction to train on the "
                             f"rest (every row and reason: {where})")
    log.warning("dropped %s; counted in %s", text, where)


def save_report(reports: list[dict], run_dir: Path) -> None:
    """Write data_report.json, print the table; then fail if more than max_bad_fraction of rows are bad."""
    from rich.table import Table
    from midpo_cli.console import console

    write_text(run_dir / "data_report.json", json.dumps(reports, indent=2))
    t = Table(title="data report")
    for c in ("split", "format", "rows read", "kept", "dropped", "truncated"):
        t.add_column(c)
    t.add_column("reasons (first location)", overflow="fold")
    for r in reports:
        fmt = r["format"] if r["format"] != "mixed" else ", ".join(f"{k} {v}" for k, v in r["formats"].items())
        examples = {**r.get("dropped_examples", {}), **r.get("truncated_examples", {})}
        counts = sorted({**r["dropped_reasons"], **r["truncated_reasons"]}.items(), key=lambda kv: -kv[1])
        reasons = "\n".join(f"{k}: {v}" + (f", first {examples[k][0]}" if examples.get(k) else "") for k, v in counts)
        t.add_row(r["split"], fmt, str(r["rows_read"]), str(r["kept"]), str(r["dropped"]),
                  str(r["truncated"]), reasons or "-")
    console.print(t)
    check_bad_fraction(reports, str(run_dir / "data_report.json"))
