"""One concatenated forward for chosen and rejected of every model a prior reads, then the view builder."""
from __future__ import annotations

import torch

from midpo_cli.engine.cross import Layout, other_prompt_logps
from midpo_cli.engine import pack
from midpo_cli.engine.head import logits_source, unwrap
from midpo_cli.engine.logps import Selected, token_logps
from midpo_cli.engine.views import build_view, layer_means, layer_states, live_reference
from midpo_cli.priors import PairView


def model_logits(model, batch, hidden: bool = False):
    """Forward; returns (logits source aligned with labels, output). For an architecture engine/head.py knows,
    the model forms only the last position's logits and the rest are formed chunk-wise from what its LM head
    reads (a Head [N, S-1, H]); otherwise the model's own logits [N, S-1, V]. A batch with a packed layout the
    model reproduces runs packed (engine/pack.py) and gives a Selected source: the completion positions only.
    `hidden`: output.hidden_states holds every layer's hidden states (`aligned` puts them on the label grid)."""
    packed = batch.get("packed")
    if packed is None or not _packs(model, batch, packed):
        return logits_source(model, batch, hidden)
    source, out = logits_source(model, packed_inputs(model, packed), hidden, shift=False)
    return pack.selected(source, packed, tuple(batch["labels"].shape)), out


def packed_inputs(model, packed: dict) -> dict:
    """The forward's inputs of a packed layout for this model's attention (its 4-D mask built once per batch)."""
    base = unwrap(model)
    attention, dtype = pack.attention_of(base), next(base.parameters()).dtype
    key = ("_inputs", attention, dtype)
    if key not in packed:
        packed[key] = pack.model_inputs(packed, attention, dtype)
    return packed[key]


def _packs(model, batch: dict, packed: dict) -> bool:
    """Whether this batch runs packed on this model: within its sliding window, and the packed forward of the
    model reproduced the padded one (checked on the first packed batch, in eval mode, without gradient)."""
    base = unwrap(model)
    window = pack.sliding_window(base)
    if window is not None and packed["longest"] > window:
        return False
    ok = pack.verdict(base)
    if ok is None:
        ok, why = _reproduces(model, batch, packed)
        pack.record(base, ok, why)
    return ok


@torch.no_grad()
def _reproduces(model, batch: dict, packed: dict) -> tuple[bool, str]:
    was = model.training
    model.eval()
    try:
        padded = token_logps(logits_source(model, batch)[0], batch["labels"])
        source, _ = logits_source(model, packed_inputs(model, packed), shift=False)
        mine = token_logps(pack.selected(source, packed, tuple(batch["labels"].shape)), batch["labels"])
    except (TypeError, ValueError, RuntimeError, IndexError) as e:
        return False, f"its forward fails on them: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
    finally:
        model.train(was)
    mask = batch["mask"] > 0
    err = (padded - mine).abs()[mask].max().item() if mask.any() else 0.0
    tol = pack.tolerance(next(unwrap(model).parameters()).dtype)
    if not err <= tol:
        return False, f"max log-prob difference {err:.3g} > {tol:.3g}"
    return True, ""


def aligned(hidden_states, batch: dict, source) -> tuple:
    """Every layer's hidden states on the label grid as views.layer_means reads them: the padded forward's as they
    are, a packed forward's scattered into [N, S, H] (position t+1 holding the state of token t+1)."""
    if not isinstance(source, Selected):
        return hidden_states
    shape = tuple(batch["labels"].shape)
    grid = lambda h: torch.cat([h.new_zeros(shape[0], 1, *h.shape[2:]),
                                pack.scatter_positions(h, batch["packed"], shape)], 1)
    return tuple(grid(h) for h in hidden_states)


def pair_view(batch: dict, policy, prior, reference=None, snapshot=None, chunk: int = 0,
              layout: Layout | None = None) -> PairView:
    """The PairView of a collated batch (on the right device): forwards of the policy (with gradient), of the
    reference and snapshot when the prior needs them live (no gradient), and of the prior's own models
    (with gradient into the prior's parameters). Reference log-probs come from the batch's cached
    `ref_logps` column when present (engine/refcache.py). Responses scored after other prompts of the batch
    (Needs.cross_prompts) are laid out by the run's `layout` (engine/cross.py; None: no length limit)."""
    needs = prior.needs()
    cached = batch["values"].get("ref_logps")
    logits, _ = model_logits(policy, batch)                                # [2B, T, V] or Head([2B, T, H])
    ref_logits = acts = states = snap_logits = None
    if live_reference(needs, cached is not None):
        if reference is None:
            raise RuntimeError("the prior needs the reference model, but none was loaded")
        with torch.no_grad():
            ref_logits, out = model_logits(reference, batch, hidden=needs.ref_activations or needs.ref_hidden)
            if needs.ref_activations or needs.ref_hidden:
                hidden = aligned(out.hidden_states, batch, ref_logits)
                acts = layer_means(hidden) if needs.ref_activations else None
                states = layer_states(hidden) if needs.ref_hidden else None
    if needs.snapshot and needs.snapshot != "reference":
        with torch.no_grad():
            snap_logits, _ = model_logits(snapshot, batch)
    models = prior.owned_models() if needs.owned or needs.cross_prompts else {}
    wanted = (*needs.owned, needs.cross_model) if needs.cross_prompts else needs.owned
    missing = [name for name in wanted if name not in models]
    if missing:
        raise RuntimeError(f"prior '{prior.name}' reads its own model(s) {missing}, which owned_models() does not "
                           "return (attach(policy, reference) builds them before training)")
    owned = {name: model_logits(models[name], batch)[0] for name in needs.owned}
    cross = other_prompt_logps(models[needs.cross_model], batch, needs.cross_prompts, layout, chunk) \
        if needs.cross_prompts else (None, None)
    view = build_view(needs, batch["labels"], batch["mask"], logits, reference=ref_logits, snapshot=snap_logits,
                      owned=owned, cached_ref=cached, ref_activations=acts, ref_hidden=states, columns=batch["values"],
                      chunk=chunk, cross_logps=cross[0], cross_mask=cross[1])
    view.packed = isinstance(logits, Selected)
    return view
