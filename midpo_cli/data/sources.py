"""Where preference rows come from: local files (jsonl, json, csv, parquet) or a hub dataset id.

Local files are read here, row by row, so each row keeps where it came from (`Row.where`):
"FILE:LINE" for jsonl (the physical line), json arrays and csv (the line the row starts on), lines
1-based; "FILE row N" for parquet (N 1-based); "ID SPLIT row N" for the hub. A row that cannot be read
(not JSON, nested too deeply, a key given twice, not UTF-8, not an object, a csv row with the wrong number
of cells) becomes a bad row with its reason, dropped and counted or refused like any other
(dataset.on_bad_rows). A file that cannot be read at all (missing, a directory, a pipe or device,
unreadable, empty, binary or compressed, an unknown extension, a JSON array that does not parse, a csv
file with another delimiter) is one error naming it: DataFileError / DataFileNotFound.
"""
from __future__ import annotations

import csv
import json
import logging
import random
import re
import stat
import sys
from pathlib import Path

from midpo_cli.console import progress
from midpo_cli.data.rows import BadRow, BadRowError, Row, check_row, describe, is_messages
from midpo_cli.data.settings import DataSettings

log = logging.getLogger("midpo")

_WS = re.compile(r"[ \t\r\n]*")
_COMPRESSED = {b"\x1f\x8b": "gzip-compressed: decompress it first (gunzip)", b"PK\x03\x04": "a zip archive "
               "(or a spreadsheet): extract or export it first", b"BZh": "bzip2-compressed: decompress it first",
               b"\xfd7zXZ": "xz-compressed: decompress it first", b"(\xb5/\xfd": "zstd-compressed: decompress it first"}


class DataFileError(ValueError):
    """A data file that cannot be read at all; the message names it and says what to do."""


class DataFileNotFound(FileNotFoundError):
    """dataset.path names nothing."""


class _Strict:
    """JSON parsing that hides nothing: a key given twice in an object (json keeps the last value without a
    word) is recorded in `duplicates` (reset by the caller per row), and nesting too deep for the parser
    (RecursionError) becomes a ValueError."""
    DEEP = "nested too deeply to parse"

    def __init__(self):
        self.duplicates: list[str] = []
        self.decoder = json.JSONDecoder(object_pairs_hook=self._object)

    def _object(self, pairs):
        obj = dict(pairs)
        if len(obj) != len(pairs):
            seen = set()
            self.duplicates.append(next(k for k, _ in pairs if k in seen or seen.add(k)))
        return obj

    def loads(self, text: str):
        try:
            return self.decoder.decode(text)
        except RecursionError:
            raise ValueError(self.DEEP) from None

    def raw_decode(self, text: str, i: int):
        try:
            return self.decoder.raw_decode(text, i)
        except RecursionError:
            raise ValueError(self.DEEP) from None


def _duplicate(parser: _Strict, where: str, index: int):
    """The bad row for an object with a key given twice (None when there is none)."""
    if not parser.duplicates:
        return None
    return _bad(where, index, "key given twice", f"'{parser.duplicates[0]}'",
                "JSON keeps only the last value of a repeated key: keep the one you mean")


def _decode(value, text: bool, any_json: bool):
    """A string cell holding a JSON list: messages in a text column, any list (e.g. per-token values) in a
    csv file's other columns. Anything else stays as it is (and is checked later)."""
    if not (isinstance(value, str) and value.lstrip()[:1] == "[") or not (text or any_json):
        return value
    try:
        parsed = _Strict().loads(value)
    except ValueError:
        if text and value.lstrip()[:2] == "[{":
            return BadRow("cell is not valid JSON", "a message list must be written as JSON",
                          "write message lists with json.dumps (pandas' to_csv writes Python reprs)")
        return value
    if text:
        return parsed if is_messages(parsed) and parsed else value
    return parsed if isinstance(parsed, list) else value


def _row(data: dict, where: str, index: int, text_columns: set, any_json: bool = False) -> Row:
    out = {k: _decode(v, k in text_columns, any_json) for k, v in data.items()}
    bad = next((v for v in out.values() if isinstance(v, BadRow)), None)
    if bad is not None:
        col = next(k for k, v in out.items() if v is bad)
        bad = BadRow(f"column '{col}': {bad.reason}", bad.detail, bad.hint)
    return Row(out, where, index, bad)


def _bad(where: str, index: int, reason: str, detail: str = "", hint: str = "") -> Row:
    return Row({}, where, index, BadRow(reason, detail, hint))


def _open(path: Path, shown: str, kind: str) -> bytes:
    """The file's first 8 kB, after the checks that make a whole file unreadable."""
    if path.is_dir():
        inside = sorted(p.name for p in path.iterdir() if p.suffix.lower() in READERS)[:5]
        raise DataFileError(f"dataset.path={shown} is a directory, not a file; "
                            + (f"point it at a file inside ({', '.join(inside)})" if inside else
                               "point it at a jsonl, json, csv or parquet file"))
    mode = path.stat().st_mode
    if not stat.S_ISREG(mode):
        what = "a named pipe (FIFO)" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "a device"
        raise DataFileError(f"{shown}: {what}, not a regular file (it would be read more than once, or block); "
                            "write the data to a file first")
    try:
        with open(path, "rb") as f:
            head = f.read(8192)
    except PermissionError:
        raise DataFileError(f"{shown}: cannot be read (permission denied); check its permissions (ls -l)") from None
    except OSError as e:
        raise DataFileError(f"{shown}: cannot be read ({e.strerror or e})") from None
    if not head.strip():
        raise DataFileError(f"{shown}: the file is empty (no rows)")
    for magic, what in _COMPRESSED.items():
        if head.startswith(magic):
            raise DataFileError(f"{shown}: not {kind} text but {what}")
    if kind == "parquet":
        if not head.startswith(b"PAR1"):
            raise DataFileError(f"{shown}: not a parquet file (no PAR1 header); if it holds text, name it .jsonl/.csv")
    elif head.startswith(b"PAR1"):
        raise DataFileError(f"{shown}: a parquet file, not {kind}; name it .parquet")
    elif head[:2] in (b"\xff\xfe", b"\xfe\xff"):
        raise DataFileError(f"{shown}: UTF-16 text; save it as UTF-8")
    elif b"\x00" in head:
        raise DataFileError(f"{shown}: a binary file, not {kind} text (it holds NUL bytes)")
    return head


def _text(path: Path, shown: str) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataFileError(f"{shown}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x}); save the file as UTF-8") from None


def _json_line(raw: bytes, where: str, n: int, text_columns: set, parser: _Strict) -> Row:
    try:
        line = raw.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError as e:
        return _bad(where, n, "not valid UTF-8", f"byte 0x{raw[e.start]:02x} at column {e.start + 1}",
                    "save the file as UTF-8")
    parser.duplicates.clear()
    try:
        obj = parser.loads(line)
    except json.JSONDecodeError as e:
        return _bad(where, n, "not valid JSON", f"{e.msg} at column {e.colno}", "fix or delete the line")
    except ValueError as e:
        return _bad(where, n, "not valid JSON", str(e), "a row is one object of texts or message lists")
    if isinstance(obj, dict) and parser.duplicates:
        return _duplicate(parser, where, n)
    if not isinstance(obj, dict):
        return _bad(where, n, "not a JSON object", describe(obj),
                    'each row is one object: {"prompt": ..., "chosen": ..., "rejected": ...}')
    return _row(obj, where, n, text_columns)


def read_jsonl(path: Path, shown: str, text_columns: set) -> list[Row]:
    """One object per line, parsed line by line: a bad line is a bad row; blank lines are skipped."""
    _open(path, shown, "JSON Lines")
    rows, parser = [], _Strict()
    with open(path, "rb") as f, progress(f"reading {path.name}", _lines(f), "lines") as bar:
        for n, raw in enumerate(f, 1):
            bar.advance()
            if n == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")                     # a UTF-8 byte-order mark
            if not raw.strip():
                continue
            row = _json_line(raw, f"{shown}:{n}", n, text_columns, parser)
            if not rows and row.problem is not None and raw.lstrip()[:1] == b"[":
                raise DataFileError(f"{shown}:{n}: a JSON array, not JSON Lines; name the file .json "
                                    "(or write one object per line)")
            rows.append(row)
    return rows


def _lines(f) -> int:
    """The lines of an open binary file (the last one may lack its newline), counted in 1 MB blocks; the file is
    left at its start."""
    n, last = 0, b"\n"
    for block in iter(lambda: f.read(1 << 20), b""):
        n, last = n + block.count(b"\n"), block[-1:]
    f.seek(0)
    return n + (last != b"\n")


def read_json(path: Path, shown: str, text_columns: set) -> list[Row]:
    """A JSON array of row objects (each item's line is kept), or JSON Lines in a .json file."""
    _open(path, shown, "JSON")
    text = _text(path, shown)
    i = _WS.match(text).end()
    if i == len(text):
        raise DataFileError(f"{shown}: the file is empty (no rows)")
    if text[i] == "{":
        try:
            _Strict().loads(text)
        except ValueError:
            return read_jsonl(path, shown, text_columns)                   # JSON Lines named .json
        raise DataFileError(f"{shown}: one JSON object, not a list of rows; write an array [{{...}}, ...] "
                            "or one object per line (JSON Lines)")
    if text[i] != "[":
        raise DataFileError(f"{shown}: not a JSON array of rows (it starts with {text[i:i + 10]!r})")
    parser, rows, line, last = _Strict(), [], 1, 0
    i += 1
    while True:
        i = _WS.match(text, i).end()
        if text[i:i + 1] == "]":
            break
        line += text.count("\n", last, i)
        last = i
        parser.duplicates.clear()
        try:
            obj, i = parser.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise DataFileError(f"{shown}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno}); a JSON array "
                                "cannot be read past an error: fix it (in JSON Lines a bad line drops only "
                                "that line)") from None
        except ValueError as e:
            raise DataFileError(f"{shown}:{line}: not valid JSON (an item {e}); a JSON array cannot be read past "
                                "an error: fix it (in JSON Lines a bad line drops only that line)") from None
        where = f"{shown}:{line}"
        if not isinstance(obj, dict):
            rows.append(_bad(where, len(rows), "not a JSON object", describe(obj),
                             'each item is one object: {"prompt": ..., "chosen": ..., "rejected": ...}'))
        elif parser.duplicates:
            rows.append(_duplicate(parser, where, len(rows)))
        else:
            rows.append(_row(obj, where, len(rows), text_columns))
        i = _WS.match(text, i).end()
        if text[i:i + 1] == ",":
            i += 1
        elif text[i:i + 1] != "]":
            line += text.count("\n", last, i)
            raise DataFileError(f"{shown}:{line}: not valid JSON (expected ',' or ']' after an item)")
    if text[_WS.match(text, i + 1).end():]:
        raise DataFileError(f"{shown}: not valid JSON (text after the closing ']')")
    return rows


def read_csv(path: Path, shown: str, text_columns: set) -> list[Row]:
    """A header line, then one row per record (a quoted cell may span lines: the row's first line is kept).
    Cells are text; a cell holding a JSON list (messages, per-token values) is parsed."""
    _open(path, shown, "csv")
    csv.field_size_limit(min(sys.maxsize, 2 ** 31 - 1))                    # long texts are legal cells
    reader = csv.reader(_text(path, shown).splitlines(keepends=True))
    rows, start = [], 1
    try:
        header = next(reader, None)
        if not header:
            raise DataFileError(f"{shown}: the file is empty (no header, no rows)")
        if len(set(header)) != len(header):
            raise DataFileError(f"{shown}:1: repeated column names in the header {header}")
        other = next((d for d in ";\t|" if len(header) == 1 and d in header[0]), None)
        if other is not None:
            name = {";": "semicolon", "\t": "tab", "|": "pipe"}[other]
            raise DataFileError(f"{shown}:1: the header is one column ({header[0][:60]!r}): the file looks "
                                f"{name}-separated, and midpo reads comma-separated csv; save it with commas "
                                f"(e.g. pandas.read_csv(path, sep={other!r}).to_csv(new_path, index=False))")
        start = reader.line_num + 1
        for cells in reader:
            where, start = f"{shown}:{start}", reader.line_num + 1
            if not any(c.strip() for c in cells):
                continue
            if len(cells) != len(header):
                rows.append(_bad(where, len(rows), "wrong number of cells", f"{len(cells)} cells, the header has "
                                 f"{len(header)}", "quote cells holding commas, quotes or line breaks"))
                continue
            rows.append(_row(dict(zip(header, cells)), where, len(rows), text_columns, any_json=True))
    except csv.Error as e:
        raise DataFileError(f"{shown}:{reader.line_num}: not valid CSV ({e})") from None
    if not rows:
        raise DataFileError(f"{shown}: a header but no rows")
    return rows


def read_parquet(path: Path, shown: str, text_columns: set) -> list[Row]:
    import pyarrow.parquet as pq

    _open(path, shown, "parquet")
    try:
        table = pq.read_table(path)
    except Exception as e:                                                 # pyarrow's errors have no common base
        raise DataFileError(f"{shown}: not a readable parquet file ({str(e).splitlines()[0][:200]})") from None
    return [_row(r, f"{shown} row {n}", n, text_columns) for n, r in enumerate(table.to_pylist(), 1)]


READERS = {".jsonl": read_jsonl, ".json": read_json, ".csv": read_csv, ".parquet": read_parquet}


def read_file(dataset) -> list[Row]:
    """Every row of a local file (bad rows included, each with its problem)."""
    if not dataset.path:
        raise ValueError("dataset=local needs dataset.path=FILE (jsonl, json, parquet or csv)")
    path = Path(dataset.path).expanduser()
    if not path.exists():
        raise DataFileNotFound(f"dataset.path={dataset.path}: no such file (cwd: {Path.cwd()})")
    reader = READERS.get(path.suffix.lower())
    if reader is None and not path.is_dir():
        extra = "; decompress it first" if path.suffix.lower() in (".gz", ".zip", ".bz2", ".xz", ".zst") else ""
        raise DataFileError(f"dataset.path={dataset.path}: unsupported extension '{path.suffix}'; "
                            f"use one of {', '.join(READERS)}{extra}")
    text_columns = {dataset.prompt_column, dataset.chosen_column, dataset.rejected_column}
    rows = (reader or read_jsonl)(path, str(dataset.path), text_columns)
    if not rows:
        raise DataFileError(f"{dataset.path}: the file is empty (no rows)")
    return rows


def load_rows(dataset, reader: str | None = None) -> tuple[list[dict], list[dict]]:
    """(train rows, eval rows) as Rows that know where they came from. `reader`: "local" (a file) or "hub" (a
    hub dataset id), by default dataset.source (a task of its own that reads a data file passes its reader).
    With dataset.on_bad_rows=error the first bad row in file order stops here (those that need the tokenizer:
    in prepare.build_pairs)."""
    settings = DataSettings.of(dataset)                                        # checked; read once, not per row
    reader = reader or dataset.source
    if reader == "local":
        ds = {dataset.split: read_file(dataset)}
    elif reader == "hub":
        from datasets import load_dataset

        if not dataset.path:
            raise ValueError("dataset=hub needs dataset.path=<hub dataset id>")
        ds = load_dataset(dataset.path)
    else:
        raise ValueError(f"dataset.source='{dataset.source}' reads no data file (readers: local, hub)")
    if dataset.split not in ds:
        raise ValueError(f"dataset split '{dataset.split}' not found; available: {sorted(ds)}")
    if dataset.eval_split and dataset.eval_split not in ds:
        raise ValueError(f"dataset.eval_split '{dataset.eval_split}' not found; available: {sorted(ds)}")

    def rows_of(split):
        if reader == "local":
            return ds[split]
        text_columns = {dataset.prompt_column, dataset.chosen_column, dataset.rejected_column}
        return [_row(r, f"{dataset.path} {split} row {n}", n, text_columns) for n, r in enumerate(ds[split], 1)]

    train = rows_of(dataset.split)
    if dataset.eval_split:
        evals = rows_of(dataset.eval_split)
    else:
        random.Random(0).shuffle(train)
        n_eval = int(len(train) * dataset.eval_fraction)
        evals, train = train[:n_eval], train[n_eval:]
        if dataset.eval_fraction > 0 and not evals:
            log.warning("dataset.eval_fraction=%s of %d rows holds out no row: no held-out metrics (eval/*) in "
                        "this run; give more rows, a larger fraction or dataset.eval_split", dataset.eval_fraction,
                        len(train))
    if dataset.max_rows:
        train = train[:dataset.max_rows]
    if settings.on_bad_rows == "error":
        for group in (train, evals) if dataset.eval_split else (sorted(train + evals, key=lambda r: r.index),):
            for row in sorted(group, key=lambda r: r.index):
                try:
                    check_row(row, settings)
                except BadRow as bad:
                    raise BadRowError(row.where, bad) from None
    return train, evals
