"""Padding-free batches: the pairs of a micro-batch packed into a few rows, each pair's prompt computed once.

A padded batch spends FLOPs on every padding slot (every sequence is as long as the batch's longest) and on
each prompt twice (once before the chosen, once before the rejected completion). A packed batch has neither:

    tree   one segment per pair, [prompt | chosen | rejected]. A chosen token sees the prompt and the chosen
           tokens before it; a rejected token sees the prompt and the rejected tokens before it, never the
           chosen ones, and its positions continue from the prompt's, as if the chosen were not there. The
           attention mask is a block-diagonal tree mask (4-D), read by SDPA, eager or flex attention.
    flat   one segment per sequence, [prompt | chosen] [prompt | rejected]: the prompt twice, but still no
           padding. Variable-length kernels (flash-attention) take this from the position ids alone (a new
           segment starts where the positions restart); they cannot express the tree.

Segments are packed first-fit-decreasing into rows as long as the longest segment, so a row's attention costs
at most what the padded rows it replaces cost. Only the states that predict a completion token are kept: the
LM head, the log-probs and the KL run over those M positions (`logps.Selected`) and are scattered back into
the padded [2B, T] grid, so a prior sees exactly the inputs of the padded path (docs/benchmarks.md has the
measurements; tests/test_pack.py the equality, value and gradient, for every prior).

The collated batch keeps its padded tensors too: a model the packed forward does not reproduce (an attention
that ignores 4-D masks or position ids; checked once per model against the padded forward) and a batch
longer than the model's sliding window run padded, with a one-line notice.
"""
from __future__ import annotations

import logging
from weakref import WeakKeyDictionary

import torch
from torch import Tensor

from midpo_cli.engine.logps import Head, Selected, select

log = logging.getLogger("midpo")

KINDS = ("tree", "flat")
PROMPT, CHOSEN, REJECTED = 0, 1, 2                 # a token's branch in the tree (padding: PROMPT of its own segment)


def pack_kind(model) -> str | None:
    """The layout the model's attention can take: 'flat' under flash-attention (variable-length kernels: no
    tree masks), 'tree' otherwise; None for a model already found not to reproduce the padded forward."""
    from midpo_cli.engine.head import unwrap
    base = unwrap(model)
    if verdict(base) is False:
        return None
    return "flat" if "flash" in str(attention_of(base)) else "tree"


def attention_of(base) -> str:
    config = getattr(base, "config", None)
    return str(getattr(config, "_attn_implementation", None) or "eager")


def pack(pairs: list, kind: str, mask: Tensor) -> dict:
    """The packed layout of `pairs` (EncodedPair; rows 0..B-1 chosen, B..2B-1 rejected in the padded batch,
    whose label mask [2B, T] is `mask`):
    input_ids, position_ids, segment, branch [R, L]; state_index [M] (the packed position whose state predicts
    each completion token), token_index [M] (the packed position of that token), label_index [M] (its place in the
    flattened padded [2B, T] grid, row-major, as mask.nonzero() orders them); longest: the longest segment."""
    if kind not in KINDS:
        raise ValueError(f"unknown packing '{kind}' (one of {', '.join(KINDS)})")
    b, width = len(pairs), mask.shape[1]
    items = []                                     # (length, tokens, positions, branches, [(row n, offset of t)])
    for j, p in enumerate(pairs):
        P, C, R = len(p.prompt), len(p.chosen), len(p.rejected)
        if kind == "tree":
            items.append((P + C + R, p.prompt + p.chosen + p.rejected,
                          list(range(P + C)) + list(range(P, P + R)),
                          [PROMPT] * P + [CHOSEN] * C + [REJECTED] * R,
                          [(j, 0, P, C), (b + j, C, P, R)]))
        else:
            items.append((P + C, p.prompt + p.chosen, list(range(P + C)), [PROMPT] * (P + C), [(j, 0, P, C)]))
            items.append((P + R, p.prompt + p.rejected, list(range(P + R)), [PROMPT] * (P + R), [(b + j, 0, P, R)]))
    longest = max(it[0] for it in items)
    rows: list[list] = []                          # first-fit decreasing into rows of at most `longest` tokens
    for it in sorted(items, key=lambda it: -it[0]):
        row = next((r for r in rows if r[0] + it[0] <= longest), None)
        if row is None:
            row = [0, []]
            rows.append(row)
        row[0] += it[0]
        row[1].append(it)
    ids = torch.zeros(len(rows), longest, dtype=torch.long)
    pos, seg = torch.zeros_like(ids), torch.zeros_like(ids)
    branch = torch.zeros(len(rows), longest, dtype=torch.uint8)
    state, token, label = [], [], []
    n_seg = 0
    for r, (_, members) in enumerate(rows):
        at = 0
        for length, toks, positions, branches, seqs in members:
            ids[r, at:at + length] = torch.tensor(toks)
            pos[r, at:at + length] = torch.tensor(positions)
            branch[r, at:at + length] = torch.tensor(branches, dtype=torch.uint8)
            seg[r, at:at + length] = n_seg
            n_seg += 1
            base = r * longest + at
            for n, skip, P, size in seqs:          # label t (P-1 .. P+size-2) predicts sequence token t+1
                if size:                           # the prompt's last state, then the branch's own (shifted by skip)
                    state.append(base + P - 1)
                    state.extend(range(base + P + skip, base + P + size - 1 + skip))
                    token.extend(range(base + P + skip, base + P + size + skip))
                    label.extend(range(n * width + P - 1, n * width + P + size - 1))
            at += length
        if at < longest:                           # padding: a segment of its own, positions from 0
            seg[r, at:] = n_seg
            pos[r, at:] = torch.arange(longest - at)
            n_seg += 1
    order = torch.tensor(label, dtype=torch.long).argsort()
    index = lambda xs: torch.tensor(xs, dtype=torch.long)[order]
    return {"input_ids": ids, "position_ids": pos, "segment": seg, "branch": branch, "state_index": index(state),
            "token_index": index(token), "label_index": index(label), "longest": longest, "kind": kind}


def model_inputs(packed: dict, attention: str, dtype: torch.dtype) -> dict:
    """The forward's keyword arguments for a packed layout under the model's attention implementation: position
    ids alone for flash-attention (flat layouts), a 4-D mask otherwise (boolean for SDPA, additive for the rest)."""
    ids, pos = packed["input_ids"], packed["position_ids"]
    if "flash" in attention:
        return {"input_ids": ids, "position_ids": pos, "attention_mask": None}
    seg, branch = packed["segment"], packed["branch"]
    n = ids.shape[1]
    order = torch.arange(n, device=ids.device)
    allowed = (seg[:, :, None] == seg[:, None, :]) & (order[None, :] <= order[:, None])[None] & (
        (branch[:, None, :] == PROMPT) | (branch[:, None, :] == branch[:, :, None]))        # [R, q, k]
    mask = allowed[:, None]
    if attention != "sdpa":
        mask = torch.zeros(mask.shape, dtype=dtype, device=ids.device).masked_fill_(~mask, torch.finfo(dtype).min)
    return {"input_ids": ids, "position_ids": pos, "attention_mask": mask}


def sliding_window(base) -> int | None:
    """The model's attention window when some layer attends through one (a packed 4-D mask would widen it)."""
    config = getattr(base, "config", None)
    window = getattr(config, "sliding_window", None) or getattr(config, "attention_chunk_size", None)
    if not isinstance(window, int) or window <= 0 or getattr(config, "use_sliding_window", True) is False:
        return None
    return window


def selected(source: Tensor | Head, packed: dict, shape: tuple[int, int]) -> Selected:
    """A packed forward's logits source [R, L, ...] (logits, or a Head over its states) at the positions predicting
    completion tokens, as a Selected source over the padded [N, T] grid."""
    return select(source, packed["label_index"], shape, at=packed["state_index"])


def scatter_positions(x: Tensor, packed: dict, shape: tuple[int, int]) -> Tensor:
    """Per-token values at the packed positions of the completion tokens themselves [R, L, ...] -> [N, T, ...]
    on the padded grid (zero elsewhere): hidden-state inputs, aligned as views.layer_means aligns them."""
    picked = x.reshape(-1, *x.shape[2:])[packed["token_index"]]
    out = x.new_zeros(shape[0] * shape[1], *x.shape[2:])
    return out.index_copy(0, packed["label_index"], picked).view(*shape, *x.shape[2:])


_CHECKED: WeakKeyDictionary = WeakKeyDictionary()   # transformers model -> whether its packed forward is exact
TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-3}   # max |log-prob difference|; 16-bit types: 0.25


def verdict(base) -> bool | None:
    return _CHECKED.get(base)


def record(base, ok: bool, why: str = "") -> None:
    _CHECKED[base] = ok
    if not ok:
        from midpo_cli.engine.head import model_type
        log.warning("midpo: packed batches do not reproduce the padded forward of '%s' (%s); its batches run padded "
                    "(trainer.packing=false says so explicitly)", model_type(base), why)


def tolerance(dtype: torch.dtype) -> float:
    return TOLERANCE.get(dtype, 0.25)
