"""Responses scored after other prompts of their batch (Needs.cross_prompts): what a prompt-free marginal is
estimated from (docs/learnable_priors.md, learned_marginal).

For shift k = 1..K (K <= B-1), both responses of pair i are re-paired with the prompt of pair (i+k) mod B, and each
recombined prompt + completion is laid out exactly as the data pipeline lays out a pair: the same length rule
(data/tokenize.py `fit`) and the same collation (`collate`: right padding, labels, completion mask). The token ids
are reused as they are: the pipeline tokenises prompt and completion separately and concatenates them, so x' followed
by y is the pair it builds from the texts (x', y) (for chat-templated rows: when the template renders a reply the
same after any prompt).

An entry is usable (cross_mask = 1) when x' is not y's own prompt (equal token ids: several pairs may share a prompt)
and y fits whole after x'. Otherwise the length rule would score a cut y, whose log-probability is not comparable
with the others; its value is still computed (on what the rule keeps) but masked out.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from midpo_cli.data.tokenize import EncodedPair, Rules, collate, fit
from midpo_cli.engine.head import logits_source
from midpo_cli.engine.logps import to_pairs, token_logps


@dataclass(frozen=True)
class Layout:
    """How the run's pairs were built: the length rule (None: no limit, for hand-made batches such as verify's)
    and the padding id of its collated batches."""
    rules: Rules | None = None
    pad_id: int = 0


def rows_of(batch: dict) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, completion ids) of each row of a collated batch: right padded, the completion where `mask` is 1
    (label position t holds token t+1)."""
    att, mask = batch["attention_mask"].cpu(), batch["mask"].cpu() > 0
    lengths = att.sum(-1)
    if not torch.equal(att.bool(), torch.arange(att.shape[1])[None] < lengths[:, None]):
        raise ValueError("cross-prompt scoring reads right-padded batches (as data/tokenize.py collate builds them); "
                         "this batch's attention mask is not a prefix of ones")
    starts = mask.float().argmax(-1) + 1
    ids = batch["input_ids"].cpu().tolist()
    return [(row[:s], row[s:n]) for row, s, n in zip(ids, starts.tolist(), lengths.tolist())]


def recombined(rows: list, shift: int, layout: Layout) -> tuple[dict, Tensor]:
    """The collated batch whose row (side, i) is the prompt of pair (i + shift) mod B followed by response `side` of
    pair i (rows as `rows_of` gives them: chosen rows, then rejected), and which of them are usable [2, B]."""
    B = len(rows) // 2
    pairs, usable = [], torch.zeros(2, B)
    for i in range(B):
        other = rows[(i + shift) % B][0]
        sides = []
        for side in (0, 1):
            y = rows[side * B + i][1]
            prompt, (kept,), cut = fit(other, [y], layout.rules) if layout.rules else (other, [y], [])
            sides.append(kept)
            usable[side, i] = float(not cut and other != rows[i][0])
        pairs.append(EncodedPair(prompt, sides[0], sides[1]))
    return collate(pairs, layout.pad_id), usable


@torch.no_grad()
def other_prompt_logps(model, batch: dict, prompts: int, layout: Layout | None, chunk: int = 0) -> tuple[Tensor, Tensor]:
    """log model(y | x'_k) summed over y's tokens for the K = min(prompts, B-1) shifts, and their usability:
    ([2, B, K], [2, B, K]). One forward of 2B rows per shift; no gradient."""
    layout = layout or Layout()
    B = batch["input_ids"].shape[0] // 2
    rows = rows_of(batch)
    device = batch["input_ids"].device
    values, usable = [], []
    for shift in range(1, min(prompts, B - 1) + 1):
        b, ok = recombined(rows, shift, layout)
        b = {k: b[k].to(device) for k in ("input_ids", "attention_mask", "labels", "mask")}
        source, _ = logits_source(model, b, False)
        values.append(to_pairs((token_logps(source, b["labels"], chunk) * b["mask"]).sum(-1)))   # [2, B]
        usable.append(ok.to(device))
    if not values:                                                         # a batch of one pair: no other prompt
        empty = torch.zeros(2, B, 0, device=device)
        return empty, empty.clone()
    return torch.stack(values, -1), torch.stack(usable, -1).to(values[0].dtype)
