"""One preference row: where it came from, which of TRL's formats it is in, and whether it can train.

Every row is checked on its own (a file may mix formats): *standard* (prompt, chosen, rejected: text),
*conversational* (prompt: a list of {role, content} messages; chosen/rejected: messages, or text taken as
the assistant's reply) or *implicit prompt* (no prompt column: chosen and rejected share a beginning,
which becomes the prompt). Values are never converted: a number, boolean, null or object where text or
messages belong makes the row bad, with a reason (`BadRow`) that names the column and what to do.
"""
from __future__ import annotations

import math

from midpo_cli.data.settings import DataSettings

FORMATS = ("standard", "conversational", "implicit prompt")
_CHUNK = 1 << 16


class Row(dict):
    """A row's columns, plus `where` ("FILE:LINE", "FILE row N", ...), its position in the source (for
    file-order checks) and, for a line that could not be read at all, `problem` (a BadRow)."""
    __slots__ = ("where", "index", "problem")

    def __init__(self, data=(), where: str = "", index: int = 0, problem: BadRow | None = None):
        super().__init__(data)
        self.where, self.index, self.problem = where, index, problem


class BadRow(ValueError):
    """A row that cannot train. `reason` is its key in the data report, `detail` says exactly what is
    wrong with this row, `hint` what to do."""

    def __init__(self, reason: str, detail: str = "", hint: str = ""):
        super().__init__(reason + (f" ({detail})" if detail else ""))
        self.reason, self.detail, self.hint = reason, detail, hint


class BadRowError(ValueError):
    """dataset.on_bad_rows=error: the first bad row stops the run, in one line."""

    def __init__(self, where: str, bad: BadRow):
        super().__init__(f"{where}: {bad}; {bad.hint or 'fix or delete the row'}. (dataset.on_bad_rows=error "
                         "stops at the first bad row; dataset.on_bad_rows=drop drops and counts them instead)")


def where_of(row, split: str, i: int) -> str:
    return getattr(row, "where", "") or f"{split} row {i + 1}"


def is_messages(x) -> bool:
    return isinstance(x, list) and all(isinstance(m, dict) and "role" in m for m in x)


def describe(value) -> str:
    """'a number (3)', 'a boolean (True)', 'null', ... for messages; short, one line."""
    if value is None:
        return "null"
    kind = {bool: "a boolean", int: "a number", float: "a number", dict: "an object", list: "a list"}.get(
        type(value), f"a {type(value).__name__}")
    text = repr(value)
    return f"{kind} ({text[:40]}{'...' if len(text) > 40 else ''})"


def _unicode(text: str, where: str, part: str = "") -> None:
    """A lone surrogate (a JSON escape like "\\ud800" without its pair) is not text: no tokenizer can read it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise BadRow(f"{where}: not valid Unicode", f"{part}a lone surrogate \\u{ord(text[e.start]):04x} at "
                     f"character {e.start + 1}", "escapes \\ud800-\\udfff only come in pairs (one character): fix the "
                     "text, or delete the row") from None


def _text_or_messages(value, column: str, empty_ok: bool = False) -> str:
    """'text' or 'messages'; anything else raises BadRow. `empty_ok`: an empty text is a real (empty) answer."""
    where = f"column '{column}'"
    if value is None:
        raise BadRow(f"{where}: null", hint=f"give the {column} as text (or messages), or delete the row")
    if isinstance(value, str):
        _unicode(value, where)
        if not value.strip() and not empty_ok:
            raise BadRow(f"{where}: empty", hint=f"give the {column}, or delete the row (or, if an empty answer "
                                                 "is meant, dataset.allow_empty_completions=true)")
        return "text"
    if isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
        for k, m in enumerate(value, 1):
            if not isinstance(m.get("role"), str) or not m["role"]:
                raise BadRow(f"{where}: not a message list", f"message {k} has no text 'role'",
                             "each message is {\"role\": ..., \"content\": ...} with text values")
            if not isinstance(m.get("content"), str):
                raise BadRow(f"{where}: not a message list", f"message {k} content is {describe(m.get('content'))}",
                             "each message is {\"role\": ..., \"content\": ...} with text values")
            _unicode(m["role"], where, f"message {k} role: ")
            _unicode(m["content"], where, f"message {k} content: ")
        if not any(m["content"].strip() for m in value):
            raise BadRow(f"{where}: empty", "every message's content is empty", f"give the {column}, or delete the row")
        return "messages"
    if isinstance(value, list) and not value:
        raise BadRow(f"{where}: empty", "an empty list", f"give the {column}, or delete the row")
    raise BadRow(f"{where}: not text", describe(value),
                 "give text or a list of {\"role\", \"content\"} messages; values are never converted "
                 "(write \"42\" if you mean the text 42)")


def common_prefix(a: str, b: str) -> int:
    """Length of the common beginning of two strings (compared in C, chunk by chunk: fast on huge rows)."""
    n, i = min(len(a), len(b)), 0
    while i < n and a[i:i + _CHUNK] == b[i:i + _CHUNK]:
        i += _CHUNK
    i = min(i, n)
    while i < n and a[i] == b[i]:
        i += 1
    return i


def split_implicit(chosen, rejected):
    """(prompt, chosen, rejected) from two responses that share their beginning (TRL's implicit prompt)."""
    if is_messages(chosen) and is_messages(rejected):
        n = 0
        while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
            n += 1
        return chosen[:n], chosen[n:], rejected[n:]
    i = common_prefix(chosen, rejected)
    if 0 < i and chosen[i - 1] == " ":                                     # keep the space with the answer
        i -= 1
    return chosen[:i], chosen[i:], rejected[i:]


def _numbers(value, column: str) -> None:
    ok = isinstance(value, list) and all(
        isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in value)
    if not ok:
        raise BadRow(f"column '{column}': not a list of numbers", describe(value),
                     f"the prior reads per-token values from '{column}': a list of numbers per row")


def check_row(row, dataset, columns: tuple[str, ...] = ()) -> tuple[str, dict]:
    """(format, prompt/chosen/rejected row) for one raw row, or BadRow. Applies the column mapping and the
    implicit-prompt split; `columns` are per-token data columns a prior needs (chosen_<c>, rejected_<c>).
    `dataset`: the dataset settings; loops over rows pass DataSettings.of(dataset), converted once."""
    problem = getattr(row, "problem", None)
    if problem is not None:
        raise problem
    dataset = DataSettings.of(dataset)
    names = dataset.columns
    for ours in ("chosen", "rejected"):
        if names[ours] not in row:
            raise BadRow(f"missing column '{names[ours]}'", f"columns: {', '.join(sorted(map(str, row))) or 'none'}",
                         "TRL's format needs prompt/chosen/rejected (or chosen/rejected for an implicit prompt); "
                         "name yours with dataset.prompt_column= / chosen_column= / rejected_column=")
    out = {k: v for k, v in row.items() if k not in names.values()}
    kinds, empty_ok = {}, dataset.allow_empty_completions
    for ours, theirs in names.items():
        if theirs in row:
            out[ours] = row[theirs]
            kinds[ours] = _text_or_messages(row[theirs], theirs, empty_ok and ours != "prompt")
    for name in columns:
        for side in ("chosen", "rejected"):
            key = f"{side}_{name}"
            if key not in row:
                raise BadRow(f"missing column '{key}'", f"columns: {', '.join(sorted(map(str, row)))}",
                             f"the prior needs per-token values in '{key}' (a list of numbers per row)")
            _numbers(row[key], key)
    if "prompt" not in out:
        fmt = "implicit prompt"
        if kinds["chosen"] != kinds["rejected"]:
            raise BadRow(f"column '{names['rejected']}': {kinds['rejected']} while '{names['chosen']}' is "
                         f"{kinds['chosen']}", hint="give chosen and rejected both as text or both as messages")
        if out["chosen"] == out["rejected"]:
            raise BadRow("chosen identical to rejected", hint="a pair with chosen == rejected carries no "
                         "preference: fix or delete the row")
        prompt, chosen, rejected = split_implicit(out["chosen"], out["rejected"])
        if not (prompt.strip() if isinstance(prompt, str) else prompt):
            raise BadRow("implicit prompt: no shared beginning",
                         hint=f"a row without a '{names['prompt']}' column is read as an implicit prompt (chosen "
                              "and rejected start with the same prompt); if your prompt is in another column, "
                              "set dataset.prompt_column=NAME")
        for side, value in (("chosen", chosen), ("rejected", rejected)):
            if not (value.strip() if isinstance(value, str) else value):
                raise BadRow(f"implicit prompt: {names[side]} is only the shared beginning",
                             hint=f"{names[side]} must continue past the prompt it shares with the other side")
        out.update(prompt=prompt, chosen=chosen, rejected=rejected)
    elif kinds["prompt"] == "messages":
        fmt = "conversational"
    else:
        fmt = "standard"
        for side in ("chosen", "rejected"):
            if kinds[side] == "messages":
                raise BadRow(f"column '{names[side]}': messages while the prompt is text",
                             hint="give prompt, chosen and rejected all as text, or the prompt as messages too "
                                  "(conversational)")
    if out["chosen"] == out["rejected"]:
        raise BadRow("chosen identical to rejected",
                     hint="a pair with chosen == rejected carries no preference: fix or delete the row")
    return fmt, out
