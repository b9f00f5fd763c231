"""Tokenisation correct by construction: the completion's tokens start exactly where the prompt ends.

A row is TRL-shaped: prompt (string or list of messages) with chosen/rejected (strings or messages).
The prompt and each completion are tokenised separately and concatenated, so no prefix matching is
ever guessed; EOS is appended once; both completions of a pair are truncated by the same rule.

Before tokenising, every text field is cut to `char_limit` characters (the prompt keeps its end, a
completion its beginning): 2 x max_length x the longest token of the vocabulary (at least 16 characters).
max_length tokens never span more than half of that, so the cut removes only text that token truncation
would remove anyway, and a 50 MB field costs what a 16 kB one does instead of being tokenised whole.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from midpo_cli.data.rows import is_messages

_is_messages = is_messages                       # older name


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


@dataclass
class EncodedPair:
    prompt: list[int]
    chosen: list[int]
    rejected: list[int]
    truncated: str = ""                          # "", "prompt", "completion" or "prompt+completion"
    values: dict = field(default_factory=dict)   # per-token columns: name -> (chosen list, rejected list)


class Dropped(ValueError):
    """A pair the truncation policy drops; the message is the reason shown in the data report."""


def encode_pair(tokenizer, row: dict, max_length: int, max_prompt_length: int,
                columns: tuple[str, ...] = (), truncation: str = "keep_end", limit: int | None = None) -> EncodedPair:
    """Tokenise one row. truncation="keep_end": keep the prompt's end and cut both completions to the same
    budget; "drop": raise Dropped for a pair that does not fit. `limit`: characters kept per field before
    tokenising (default char_limit(tokenizer, max_length))."""
    limit = char_limit(tokenizer, max_length) if limit is None else limit
    prompt_in, cut_prompt = cap(row["prompt"], limit, keep_end=True)
    chosen_in, cut_chosen = cap(row["chosen"], limit, keep_end=False)
    rejected_in, cut_rejected = cap(row["rejected"], limit, keep_end=False)
    if truncation == "drop" and (cut_prompt or cut_chosen or cut_rejected):
        raise Dropped(f"longer than max_length={max_length} / max_prompt_length={max_prompt_length}")
    p_text, c_text = render(tokenizer, prompt_in, chosen_in)
    _, r_text = render(tokenizer, prompt_in, rejected_in)
    prompt = _ids(tokenizer, p_text, specials=True)
    bos = tokenizer.bos_token_id
    if bos is not None and len(prompt) > 1 and prompt[0] == bos and prompt[1] == bos:
        prompt = prompt[1:]                                                # template and tokenizer both added BOS
    eos = tokenizer.eos_token_id
    sides = []
    for text in (c_text, r_text):
        ids = _ids(tokenizer, text, specials=False)
        if eos is not None and (not ids or ids[-1] != eos):
            ids = ids + [eos]
        sides.append(ids)
    cut = ["prompt"] if cut_prompt else []
    if truncation == "drop" and (len(prompt) > max_prompt_length or len(prompt) + max(map(len, sides)) > max_length):
        raise Dropped(f"longer than max_length={max_length} / max_prompt_length={max_prompt_length}")
    if len(prompt) > max_prompt_length:
        prompt = prompt[-max_prompt_length:]                               # keep the prompt's end
        cut = ["prompt"]
    budget = max_length - len(prompt)
    if budget < 1:
        raise ValueError(f"max_length={max_length} leaves no room for the completion after a "
                         f"{len(prompt)}-token prompt; raise dataset.max_length or lower max_prompt_length")
    if max(len(s) for s in sides) > budget:
        sides = [s[:budget] for s in sides]                                # same rule for both sides
        cut.append("completion")
    elif cut_chosen or cut_rejected:                                       # cut in characters only
        cut.append("completion")
    truncated = "+".join(cut)
    values = {}
    for name in columns:
        pair = []
        for side, ids in (("chosen", sides[0]), ("rejected", sides[1])):
            key = f"{side}_{name}"
            if key not in row:
                raise ValueError(f"the prior needs the per-token column '{key}', missing from the data row")
            vals = [float(x) for x in row[key][:len(ids)]]
            pair.append(vals + [0.0] * (len(ids) - len(vals)))            # EOS (and any gap) gets 0
        values[name] = tuple(pair)
    return EncodedPair(prompt, sides[0], sides[1], truncated, values)


def collate(pairs: list[EncodedPair], pad_id: int) -> dict:
    """Stack a list of pairs into one concatenated batch: rows 0..B-1 chosen, B..2B-1 rejected.

    input_ids/attention_mask: [2B, L]; labels/mask: [2B, L-1] aligned with logits[:, :-1];
    values: name -> [2B, L-1] per-token columns on the same positions.
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
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels, "mask": mask, "values": values}
