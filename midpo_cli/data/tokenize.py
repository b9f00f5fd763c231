"""Tokenisation correct by construction: the completion's tokens start exactly where the prompt ends.

A row is TRL-shaped: prompt (string or list of messages) with chosen/rejected (strings or messages).
The prompt and each completion are tokenised separately and concatenated, so no prefix matching is
ever guessed; EOS is appended once; both completions of a pair are truncated by the same rule.

Before tokenising, every text field is cut to `char_limit` characters (the prompt keeps its end, a
completion its beginning): 2 x max_length x the longest token of the vocabulary (at least 16 characters).
max_length tokens never span more than half of that, so the cut removes only text that token truncation
would remove anyway, and a 50 MB field costs what a 16 kB one does instead of being tokenised whole.

encode_pair does one row; encode_pairs many, CHUNK rows per tokenizer call (BatchIds), with exactly the ids,
truncation, values and errors encode_pair gives each row (tests/test_data_prep.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from midpo_cli.data.rows import is_messages

CHUNK = 256                                      # rows per tokenizer call: enough for the Rust side to spread over
                                                 # its threads, few enough that the encodings held at once stay small


def render(tokenizer, prompt, completion) -> tuple[str, str]:
    """(prompt_text, completion_text); conversational rows go through the tokenizer's chat template.
    Values are never converted: text must be str (prepare.check_row says which row and column is not)."""
    if not is_messages(prompt):
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise TypeError(f"a standard row needs text prompt and completion, got {type(prompt).__name__} "
                            f"and {type(completion).__name__}")
        return prompt, completion
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("conversational rows need a tokenizer with a chat template; this model has none "
                         "(use standard prompt/chosen/rejected strings, or a model with a chat template)")
    if not is_messages(completion):
        if not isinstance(completion, str):
            raise TypeError(f"a completion is text or messages, got {type(completion).__name__}")
        completion = [{"role": "assistant", "content": completion}]
    p_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(prompt + completion, tokenize=False)
    if not full.startswith(p_text):
        # Some templates rewrite earlier turns when a reply follows: render the reply alone after the prompt.
        only = tokenizer.apply_chat_template(completion, tokenize=False)
        return p_text, only
    return p_text, full[len(p_text):]


_LONGEST: dict[int, int] = {}


def char_limit(tokenizer, max_length: int) -> int:
    """Characters kept per text field before tokenising (see the module docstring)."""
    key = id(tokenizer)
    if key not in _LONGEST:
        try:
            _LONGEST[key] = max(map(len, tokenizer.get_vocab()), default=16)
        except Exception:                                                  # a tokenizer without a vocabulary
            _LONGEST[key] = 64
    return 2 * max_length * max(16, _LONGEST[key])


def cap(value, limit: int, keep_end: bool):
    """(value cut to `limit` characters, whether it was cut): text, or messages' contents taken together."""
    if isinstance(value, str):
        if len(value) <= limit:
            return value, False
        return (value[-limit:] if keep_end else value[:limit]), True
    if not is_messages(value) or sum(len(m.get("content") or "") for m in value) <= limit:
        return value, False
    kept, left = [], limit
    for m in (reversed(value) if keep_end else value):
        if left <= 0:
            break                                                          # beyond what any truncation keeps
        c = m.get("content") or ""
        if len(c) > left:
            m = {**m, "content": c[-left:] if keep_end else c[:left]}
        kept.append(m)
        left -= len(c)
    return (kept[::-1] if keep_end else kept), True


def _ids(tokenizer, text: str, specials: bool) -> list[int]:
    return tokenizer(text, add_special_tokens=specials)["input_ids"]


class BatchIds:
    """Token ids of many texts per call, the same ids as `tokenizer(text)["input_ids"]` for each text.

    A fast tokenizer encodes a batch in Rust, spread over its threads. Its Rust tokenizer's encode_batch_fast
    runs the same pipeline without tracking each token's character offsets, which nothing here reads (they took
    ~45% of the byte-level tokenizer's Rust time, ~10% of a BPE's; benchmarks/data_prep.py). It is trusted per
    kind of call (with or without special tokens) once it gave the same ids as the plain call on that kind's
    first batch: the plain call runs first and puts the Rust tokenizer in the state transformers wants (no
    truncation or padding saved in tokenizer.json, special tokens split as configured), and a subclass that
    changes ids in Python fails the check and keeps the plain call. A slow tokenizer always takes the plain call."""

    def __init__(self, tokenizer):
        rust = getattr(tokenizer, "backend_tokenizer", None)
        self.tokenizer, self.trusted = tokenizer, set()
        self.rust = rust if hasattr(rust, "encode_batch_fast") else None

    def __call__(self, texts: list[str], specials: bool) -> list[list[int]]:
        if not texts:
            return []
        if self.rust is not None and specials in self.trusted:
            return self._fast(texts, specials)
        ids = self.tokenizer(texts, add_special_tokens=specials, return_attention_mask=False,
                             return_token_type_ids=False)["input_ids"]   # only the ids become Python lists
        if self.rust is not None:
            if self._fast(texts, specials) == ids:
                self.trusted.add(specials)
            else:
                self.rust = None
        return ids

    def _fast(self, texts: list[str], specials: bool) -> list[list[int]]:
        return [e.ids for e in self.rust.encode_batch_fast(texts, add_special_tokens=specials)]


@dataclass
class EncodedPair:
    prompt: list[int]
    chosen: list[int]
    rejected: list[int]
    truncated: str = ""                          # "", "prompt", "completion" or "prompt+completion"
    values: dict = field(default_factory=dict)   # per-token columns: name -> (chosen list, rejected list)


class Dropped(ValueError):
    """A pair the truncation policy drops; the message is the reason shown in the data report."""


@dataclass(frozen=True)
class Rules:
    """How rows become pairs: the lengths, the truncation policy, the per-token columns, the character cap."""
    max_length: int
    max_prompt_length: int
    columns: tuple[str, ...] = ()
    truncation: str = "keep_end"
    limit: int = 0                               # characters kept per field before tokenising (char_limit)

    def too_long(self) -> Dropped:
        return Dropped(f"longer than max_length={self.max_length} / max_prompt_length={self.max_prompt_length}")


@dataclass
class _Texts:
    """One row rendered and cut to the character cap, waiting for its token ids."""
    row: dict
    prompt: str
    chosen: str
    rejected: str
    cut_prompt: bool
    cut_completion: bool


def _texts(tokenizer, row: dict, rules: Rules) -> _Texts:
    prompt_in, cut_prompt = cap(row["prompt"], rules.limit, keep_end=True)
    chosen_in, cut_chosen = cap(row["chosen"], rules.limit, keep_end=False)
    rejected_in, cut_rejected = cap(row["rejected"], rules.limit, keep_end=False)
    if rules.truncation == "drop" and (cut_prompt or cut_chosen or cut_rejected):
        raise rules.too_long()
    p_text, c_text = render(tokenizer, prompt_in, chosen_in)
    _, r_text = render(tokenizer, prompt_in, rejected_in)
    return _Texts(row, p_text, c_text, r_text, cut_prompt, cut_chosen or cut_rejected)


def fit(prompt: list[int], sides: list[list[int]], rules: Rules) -> tuple[list[int], list[list[int]], list[str]]:
    """The length rule of every pair: the prompt keeps its last max_prompt_length tokens, then every completion is
    cut to the same budget, max_length - len(prompt). Returns (prompt, sides, what was cut: "prompt", "completion");
    with truncation="drop", a pair that does not fit raises Dropped instead. Sides are token ids, EOS included."""
    cut = []
    longest = max(map(len, sides))
    fits = len(prompt) <= rules.max_prompt_length and len(prompt) + longest <= rules.max_length
    if rules.truncation == "drop" and not fits:
        raise rules.too_long()
    if len(prompt) > rules.max_prompt_length:
        prompt = prompt[-rules.max_prompt_length:]                         # keep the prompt's end
        cut.append("prompt")
    budget = rules.max_length - len(prompt)
    if budget < 1:
        raise ValueError(f"max_length={rules.max_length} leaves no room for the completion after a "
                         f"{len(prompt)}-token prompt; raise dataset.max_length or lower max_prompt_length")
    if longest > budget:
        sides = [s[:budget] for s in sides]                                # same rule for both sides
        cut.append("completion")
    return prompt, sides, cut


def _pair(t: _Texts, prompt: list[int], chosen: list[int], rejected: list[int], bos, eos, rules: Rules) -> EncodedPair:
    """The pair from its texts' token ids: BOS once, EOS once, both sides truncated alike, per-token values."""
    if bos is not None and len(prompt) > 1 and prompt[0] == bos and prompt[1] == bos:
        prompt = prompt[1:]                                                # template and tokenizer both added BOS
    sides = []
    for ids in (chosen, rejected):
        if eos is not None and (not ids or ids[-1] != eos):
            ids = ids + [eos]
        sides.append(ids)
    prompt, sides, fitted = fit(prompt, sides, rules)
    cut = ["prompt"] if t.cut_prompt or "prompt" in fitted else []
    if "completion" in fitted or t.cut_completion:                         # in tokens, or in characters only
        cut.append("completion")
    values = {}
    for name in rules.columns:
        pair = []
        for side, ids in (("chosen", sides[0]), ("rejected", sides[1])):
            key = f"{side}_{name}"
            if key not in t.row:                                           # a row encode_pair got unchecked
                raise ValueError(f"the prior needs the per-token column '{key}', missing from the data row")
            vals = [float(x) for x in t.row[key][:len(ids)]]
            pair.append(vals + [0.0] * (len(ids) - len(vals)))            # EOS (and any gap) gets 0
        values[name] = tuple(pair)
    return EncodedPair(prompt, sides[0], sides[1], "+".join(cut), values)


def encode_pair(tokenizer, row: dict, max_length: int, max_prompt_length: int,
                columns: tuple[str, ...] = (), truncation: str = "keep_end", limit: int | None = None) -> EncodedPair:
    """Tokenise one row. truncation="keep_end": keep the prompt's end and cut both completions to the same
    budget; "drop": raise Dropped for a pair that does not fit. `limit`: characters kept per field before
    tokenising (default char_limit(tokenizer, max_length)). Many rows: encode_pairs, same result, faster."""
    limit = char_limit(tokenizer, max_length) if limit is None else limit
    rules = Rules(max_length, max_prompt_length, tuple(columns), truncation, limit)
    return _one(tokenizer, _texts(tokenizer, row, rules), tokenizer.bos_token_id, tokenizer.eos_token_id, rules)


def encode_pairs(tokenizer, rows: list[dict], rules: Rules, chunk: int = CHUNK,
                 batch_ids: BatchIds | None = None) -> list[EncodedPair | Exception]:
    """encode_pair for each row, `chunk` rows per tokenizer call: per row, its pair or the exception encode_pair
    would have raised for it (returned, not raised, so that the caller meets them in row order). `batch_ids`:
    a caller that calls again with the same tokenizer passes its BatchIds, checked once."""
    out: list[EncodedPair | Exception] = []
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id             # properties that look the token up
    batch_ids = batch_ids or BatchIds(tokenizer)
    for start in range(0, len(rows), chunk):
        texts = [_outcome(_texts, tokenizer, row, rules) for row in rows[start:start + chunk]]
        ready = [t for t in texts if isinstance(t, _Texts)]
        try:
            prompts = batch_ids([t.prompt for t in ready], specials=True)
            sides = batch_ids([x for t in ready for x in (t.chosen, t.rejected)], specials=False)
        except Exception:                                                   # noqa: BLE001
            out += [_outcome(_one, tokenizer, t, bos, eos, rules) if isinstance(t, _Texts) else t for t in texts]
            continue                                                        # (the failing row fails as alone)
        ids = iter(zip(prompts, sides[0::2], sides[1::2]))
        out += [_outcome(_pair, t, *next(ids), bos, eos, rules) if isinstance(t, _Texts) else t for t in texts]
    return out


def _one(tokenizer, t: _Texts, bos, eos, rules: Rules) -> EncodedPair:
    """One row's pair, one tokenizer call per text (in the order prompt, chosen, rejected)."""
    prompt = _ids(tokenizer, t.prompt, specials=True)
    chosen = _ids(tokenizer, t.chosen, specials=False)
    rejected = _ids(tokenizer, t.rejected, specials=False)
    return _pair(t, prompt, chosen, rejected, bos, eos, rules)


def _outcome(fn, *args) -> EncodedPair | _Texts | Exception:
    """fn(*args), or the exception it raised: a row's own outcome, met by the caller in row order."""
    try:
        return fn(*args)
    except Exception as e:                                                  # noqa: BLE001
        return e


def collate(pairs: list[EncodedPair], pad_id: int, pack: str | None = None) -> dict:
    """Stack a list of pairs into one concatenated batch: rows 0..B-1 chosen, B..2B-1 rejected.

    input_ids/attention_mask: [2B, L]; labels/mask: [2B, L-1] aligned with logits[:, :-1];
    values: name -> [2B, L-1] per-token columns on the same positions; tokens: the non-padding tokens. `pack`
    ('tree' or 'flat'): the batch also carries its padding-free layout under "packed" (engine/pack.py), which the
    engine runs when the model reproduces the padded forward with it.
    """
    seqs, starts = [], []
    for side in ("chosen", "rejected"):
        for p in pairs:
            seqs.append(p.prompt + getattr(p, side))
            starts.append(len(p.prompt))
    length = max(len(s) for s in seqs)
    n = len(seqs)
    input_ids = torch.full((n, length), pad_id, dtype=torch.long)
    attention = torch.zeros((n, length), dtype=torch.long)
    mask = torch.zeros((n, length - 1))
    names = list(pairs[0].values) if pairs else []
    values = {k: torch.zeros((n, length - 1)) for k in names}
    for i, (s, st) in enumerate(zip(seqs, starts)):
        input_ids[i, :len(s)] = torch.tensor(s)
        attention[i, :len(s)] = 1
        mask[i, st - 1:len(s) - 1] = 1.0                                   # label t predicts token t+1
        pair, side = pairs[i % len(pairs)], i // len(pairs)
        for k in names:
            vals = pair.values[k][side]
            values[k][i, st - 1:st - 1 + len(vals)] = torch.tensor(vals)
    labels = input_ids[:, 1:].clone()
    batch = {"input_ids": input_ids, "attention_mask": attention, "labels": labels, "mask": mask, "values": values,
             "tokens": sum(len(s) for s in seqs)}                       # counted here: no device sync for it
    if pack and pairs and all(p.prompt for p in pairs):
        from midpo_cli.engine.pack import pack as packed
        batch["packed"] = packed(pairs, pack, mask)
    return batch
