"""Reference log-prob cache (hit, reuse, equal to live values, never stale) and LoRA (one model copy)."""
import json
from pathlib import Path

import torch

from midpo_cli.__main__ import main
from midpo_cli.data.tokenize import collate, encode_pair
from midpo_cli.engine import refcache
from midpo_cli.engine.forward import pair_view
from midpo_cli.engine.inputs import weights_digest
from midpo_cli.engine.models import byte_tokenizer, tiny_model
from midpo_cli.config import ModelConfig
from midpo_cli.priors.dpo import DPO

TOK = byte_tokenizer()


def pairs():
    rows = [{"prompt": f"q{i}", "chosen": "a" * (i + 1), "rejected": "b" * (3 - i % 3)} for i in range(6)]
    return [encode_pair(TOK, r, 64, 32) for r in rows]


def test_cached_values_equal_live_reference(tmp_path):
    torch.manual_seed(0)
    ref, pol = tiny_model(ModelConfig(), TOK).eval(), tiny_model(ModelConfig(), TOK)
    ps = pairs()
    info = refcache.attach([ps], ref, weights_digest(ref), TOK, tmp_path, "fp32", "cpu", TOK.pad_token_id)
    assert not info["hit"]
    b = collate(ps, TOK.pad_token_id)
    live = pair_view({**b, "values": {}}, pol, DPO(), reference=ref)
    cached = pair_view(b, pol, DPO(), reference=None)
    assert torch.allclose(live.ref_logps, cached.ref_logps, atol=1e-5)
    again = pairs()
    assert refcache.attach([again], ref, weights_digest(ref), TOK, tmp_path, "fp32", "cpu",
                           TOK.pad_token_id)["hit"]
    other = tiny_model(ModelConfig(), TOK)                                  # other weights: other key
    assert not refcache.attach([pairs()], other, weights_digest(other), TOK, tmp_path, "fp32", "cpu",
                               TOK.pad_token_id)["hit"]
    shorter = [encode_pair(TOK, {"prompt": "q0", "chosen": "aaaa", "rejected": "b"}, 3, 2)]
    assert not refcache.attach([shorter], ref, weights_digest(ref), TOK, tmp_path, "fp32", "cpu",
                               TOK.pad_token_id)["hit"]


def test_runs_share_the_cache_and_report_hits(tmp_path, fast):
    res = []
    for i, prior in enumerate(["dpo", "rdpo"]):
        run = tmp_path / f"r{i}"
        main(["train", *fast, f"prior={prior}", "trainer.max_steps=2", "trainer.save_model=false", f"hydra.run.dir={run}"])
        res.append(json.loads((run / "results.json").read_text())["ref_cache"])
    assert res[0]["key"] == res[1]["key"] and res[1]["hit"]


def test_a_reference_free_prior_gets_the_logratio_yardstick_from_the_same_cache(tmp_path):
    """SimPO keeps no reference; with trainer.ref_cache its untrained policy scores the pairs once, so its runs log
    the prior-independent logratio/* like every other prior's (sweeps and +experiment=tune compare on it), from the
    same cache entry a DPO run uses, and its training is unchanged."""
    data = Path(__file__).parent / "data" / "standard.jsonl"
    base = ["train", "dataset=local", f"dataset.path={data}", "trainer.max_steps=2", "trainer.save_model=false",
            f"cache_dir={tmp_path / 'cache'}"]
    res = {}
    for prior, cache in (("simpo", "true"), ("dpo", "true"), ("simpo", "false")):
        run = tmp_path / f"{prior}-{cache}"
        main([*base, f"prior={prior}", f"trainer.ref_cache={cache}", f"hydra.run.dir={run}"])
        res[prior, cache] = json.loads((run / "results.json").read_text())
    simpo = res["simpo", "true"]
    assert "eval/logratio/margins" in simpo["final"] and "logratio/margins" in simpo["final"]
    assert res["dpo", "true"]["ref_cache"] == {**simpo["ref_cache"], "hit": True}
    assert simpo["final"]["loss"] == res["simpo", "false"]["final"]["loss"]
    assert "eval/logratio/margins" not in res["simpo", "false"]["final"]


def test_lora_trains_with_adapters_off_reference(tmp_path, fast):
    run = tmp_path / "lora"
    main(["train", *fast, "model.lora.r=4", "trainer.max_steps=3", "trainer.ref_cache=false", f"hydra.run.dir={run}"])
    res = json.loads((run / "results.json").read_text())
    assert res["final"]["loss"] > 0
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(run / "model")                # merged: plain transformers
    assert not any("lora" in n for n, _ in model.named_parameters())
