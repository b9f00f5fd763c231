"""Padding-free batches (engine/pack.py): the packed forward gives every prior the inputs, loss and gradients of the
padded one; the tree mask keeps the completions apart; models and batches it cannot reproduce run padded."""
import copy
import json
import logging
import random

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig

from midpo_cli.__main__ import main
from midpo_cli.data.tokenize import EncodedPair, collate
from midpo_cli.engine import pack
from midpo_cli.engine.forward import pair_view
from midpo_cli.engine.models import frozen
from midpo_cli.loss import preference_loss
from midpo_cli.priors import PRIORS, build_prior

VOCAB, PAD = 300, 299
FIELDS = ("logps", "ref_logps", "kl_ref_pi", "kl_pi_ref", "ref_activations", "ref_hidden", "snapshot_logps", "tokens",
          "cross_logps")


def model(attention: str = "sdpa", config=None):
    torch.manual_seed(0)
    config = config or LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attention, dtype=torch.float64)


def pairs(n: int = 5, seed: int = 0, prompt=(1, 9), completion=(1, 20)) -> list[EncodedPair]:
    """Pairs of varied lengths, with a per-token column (TIS-DPO's weights)."""
    rng = random.Random(seed)
    ids = lambda k: [rng.randrange(VOCAB - 1) for _ in range(k)]
    out = []
    for _ in range(n):
        c, r = ids(rng.randint(*completion)), ids(rng.randint(*completion))
        weights = ([rng.uniform(0.5, 1.5) for _ in c], [rng.uniform(0.5, 1.5) for _ in r])
        out.append(EncodedPair(ids(rng.randint(*prompt)), c, r, values={"weights": weights}))
    return out


def run(name: str, kind: str | None, attention: str = "sdpa"):
    """(loss, gradients of the policy and the prior, view) of one batch, packed (`kind`) or padded (None)."""
    policy = model(attention)
    reference = frozen(copy.deepcopy(policy))
    with torch.no_grad():                                                  # a reference the policy differs from
        for p in reference.parameters():
            p.add_(0.05 * torch.randn_like(p))
    prior = build_prior({"name": name})
    prior.attach(policy, reference)
    prior.to(torch.float64)
    torch.manual_seed(1)
    with torch.no_grad():                                                  # a learnable prior away from its start
        for p in prior.trainable():
            p.add_(0.1 * torch.randn_like(p))
    batch = collate(pairs(), PAD, kind)
    view = pair_view(batch, policy, prior, reference=reference, snapshot=reference)
    loss = preference_loss(prior, view).total
    loss.backward()
    grads = [p.grad for p in [*policy.parameters(), *prior.trainable()] if p.grad is not None]
    return loss.detach(), torch.cat([g.flatten() for g in grads]), view


@pytest.mark.parametrize("name", sorted(PRIORS))
def test_every_prior_sees_the_padded_inputs_loss_and_gradients(name):
    loss, grads, view = run(name, None)
    for kind in pack.KINDS:
        loss_p, grads_p, view_p = run(name, kind)
        assert view_p.packed and not view.packed
        # float64 model; Llama's RMSNorm runs in float32, so a prompt state shared by both completions sums their
        # gradients in float32 (~1e-7 relative) where the padded batch sums them in float64
        assert abs(loss_p - loss) <= 1e-9 * max(1.0, abs(loss))
        assert grads_p.shape == grads.shape
        assert (grads_p - grads).abs().max() <= 1e-6 * grads.abs().max()
        for field in FIELDS:
            a, b = getattr(view, field), getattr(view_p, field)
            assert (a is None) == (b is None), field
            if a is not None:
                assert a.shape == b.shape and (a.double() - b.double()).abs().max() <= 1e-7, field


def test_tree_mask_keeps_the_completions_apart():
    """Changing the chosen tokens changes no rejected log-prob (and the reverse): the rejected completion sees the
    prompt only, at the positions it has in its own sequence."""
    policy, prior = model(), build_prior({"name": "simpo"})
    base = pairs(3)
    view = lambda ps: pair_view(collate(ps, PAD, "tree"), policy, prior).logps.detach()
    before = view(base)
    for side, other in ((0, 1), (1, 0)):
        changed = copy.deepcopy(base)
        for p in changed:
            seq = p.chosen if side == 0 else p.rejected
            seq[:] = [(t + 7) % (VOCAB - 1) for t in seq]
        after = view(changed)
        assert torch.equal(after[other], before[other])
        assert (after[side] - before[side]).abs().max() > 1e-3


def test_layout_indices_by_hand():
    """One pair, prompt [a b], chosen [c], rejected [d e]: tree row a b c d e, positions 0 1 2 2 3; the label grid
    has width 3 (padded rows a b c _ / a b d e)."""
    p = EncodedPair([10, 11], [12], [13, 14])
    b = collate([p], PAD, "tree")
    k = b["packed"]
    assert k["input_ids"].tolist() == [[10, 11, 12, 13, 14]] and k["position_ids"].tolist() == [[0, 1, 2, 2, 3]]
    assert k["branch"].tolist() == [[0, 0, 1, 2, 2]]
    # labels: chosen t=1 (predicts c); rejected t=1 (predicts d), t=2 (predicts e)
    assert k["label_index"].tolist() == [1, 4, 5]
    assert k["state_index"].tolist() == [1, 1, 3]                         # the prompt's last state serves both
    assert k["token_index"].tolist() == [2, 3, 4]
    flat = collate([p], PAD, "flat")["packed"]
    # rows as long as the longest segment: a b d e | a b c + one padding slot (a segment of its own)
    assert flat["input_ids"][:, :3].tolist() == [[10, 11, 13], [10, 11, 12]]
    assert flat["position_ids"].tolist() == [[0, 1, 2, 3], [0, 1, 2, 0]] and flat["segment"].tolist()[1] == [1, 1, 1, 2]
    mask = pack.model_inputs(k, "sdpa", torch.float32)["attention_mask"][0, 0]
    assert not mask[3, 2] and mask[3, 1] and mask[4, 3] and not mask[2, 3]   # d sees b, not c; e sees d


def test_position_ids_alone_pack_flat_layouts():
    """What flash-attention is given (flat layout, no mask: segments start where the positions restart) reproduces
    the padded forward; checked here through SDPA, which transformers masks from the same position ids."""
    policy, prior = model(), build_prior({"name": "simpo"})
    batch = collate(pairs(), PAD, "flat")
    inputs = pack.model_inputs(batch["packed"], "flash_attention_2", torch.float64)
    assert inputs["attention_mask"] is None
    states = policy(**inputs, use_cache=False).logits                      # a cache turns the detection off
    packed = pack.selected(states, batch["packed"], tuple(batch["labels"].shape))
    from midpo_cli.engine.logps import token_logps
    mine = token_logps(packed, batch["labels"])
    padded = pair_view(collate(pairs(), PAD), policy, prior).logps.view(-1, batch["labels"].shape[1])
    assert (mine * batch["mask"] - padded).abs().max() <= 1e-9


def test_eager_attention_gets_an_additive_mask():
    loss, grads, _ = run("dpo", None, "eager")
    loss_p, grads_p, view_p = run("dpo", "tree", "eager")
    assert view_p.packed and abs(loss_p - loss) <= 1e-7                   # eager's softmax runs in float32
    assert (grads_p - grads).abs().max() <= 1e-5 * grads.abs().max()


def test_a_model_the_packed_forward_misses_runs_padded(monkeypatch, caplog):
    """A model whose packed forward differs from its padded one (here: a mask that lets every token see its whole
    row) is found on its first batch, warned about once, and runs padded: same values as trainer.packing=false."""
    wrong = lambda packed, attention, dtype: {**pack.model_inputs(packed, attention, dtype),
                                              "attention_mask": None, "position_ids": None}
    monkeypatch.setattr("midpo_cli.engine.pack.model_inputs", wrong)
    policy, prior = model(), build_prior({"name": "simpo"})
    with caplog.at_level(logging.WARNING, logger="midpo"):
        views = [pair_view(collate(pairs(seed=s), PAD, "tree"), policy, prior) for s in (0, 1)]
    assert not any(v.packed for v in views)
    assert sum("do not reproduce the padded forward" in r.message for r in caplog.records) == 1
    assert pack.pack_kind(policy) is None
    padded = pair_view(collate(pairs(seed=1), PAD), policy, prior)
    assert torch.equal(views[1].logps, padded.logps)


def test_batches_longer_than_a_sliding_window_run_padded():
    config = MistralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=VOCAB, sliding_window=12)
    policy, prior = model("sdpa", config), build_prior({"name": "simpo"})
    short = pair_view(collate(pairs(prompt=(1, 3), completion=(1, 4)), PAD, "tree"), policy, prior)
    long = collate(pairs(prompt=(8, 9), completion=(10, 20)), PAD, "tree")
    assert short.packed and not pair_view(long, policy, prior).packed
    assert torch.equal(pair_view(long, policy, prior).logps, pair_view(collate(pairs(prompt=(8, 9),
                       completion=(10, 20)), PAD), policy, prior).logps)


def test_training_packed_matches_padded_step_by_step(tmp_path, fast):
    """`midpo train` packs by default and names it in results.json; trainer.packing=false runs padded; the per-step
    loss of the two runs agrees within 1e-4 (float32)."""
    losses, batches = {}, {}
    for packing in ("true", "false"):
        run_dir = tmp_path / packing
        main(["train", *fast, "trainer.max_steps=6", "trainer.save_model=false", f"trainer.packing={packing}",
              "dataset.task.eval_samples_per_prompt=1", f"hydra.run.dir={run_dir}"])
        rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
        losses[packing] = [r["loss"] for r in rows if "loss" in r]
        batches[packing] = json.loads((run_dir / "results.json").read_text())["batches"]
    assert len(losses["true"]) == 6 and len(losses["false"]) == 6
    assert max(abs(a - b) for a, b in zip(losses["true"], losses["false"])) <= 1e-4
    assert batches["true"]["packing"] == "tree" and batches["true"]["packed_share"] == 1.0
    assert batches["false"] == {**batches["false"], "packing": "off", "packed_share": 0.0}
    assert 0 < batches["true"]["padding_share"] == batches["false"]["padding_share"] < 1


def test_fused_adamw_where_the_device_has_it():
    """optimizer.fused=null (the default) asks for the fused kernel on CUDA and leaves torch's default elsewhere; a
    value set in the config is kept."""
    from functools import partial

    from midpo_cli.engine.optim import build
    made = lambda params, **kw: kw
    assert build(partial(made, fused=None), [], "cuda") == {"fused": True}
    assert build(partial(made, fused=None), [], "cpu") == {"fused": None}
    assert build(partial(made, fused=False), [], "cuda") == {"fused": False}
    assert build(partial(made, lr=1.0), [], "cuda") == {"lr": 1.0}            # an optimiser without the option
