"""TIS-DPO's estimated token weights (prior.weights=estimated, midpo_cli/pipelines/tisdpo.py): the transforms and the
per-side sign by hand, the pipeline end to end (contrastive models shared through the cache, weights in range with
0 on prompt and EOS, loaded models), and its one-line errors."""
import json
import types
from pathlib import Path

import pytest
import torch

from conftest import fails
from midpo_cli.__main__ import main
from midpo_cli.pipelines import tisdpo
from midpo_cli.priors import build_prior


def settings(**kw):
    return types.SimpleNamespace(**{"transform": "rank_based", "min_scale": 0.7, "max_scale": 1.3, "clip_low": -1.5,
                                    "clip_high": 1.5, "top_percent": 100.0, **kw})


def t(*x):
    return torch.tensor(x, dtype=torch.float64)


# ----- the transforms and the sign, by hand ----------------------------------------------------------------

def test_rank_based_by_hand():
    """Scores [0.3, -1.0, 2.0, 0.3] in [0.7, 1.3]: ascending ranks (ties by position) -1.0 -> 0, the first 0.3 -> 1,
    the second 0.3 -> 2, 2.0 -> 3; weight 0.7 + rank/3 * 0.6 = [0.9, 0.7, 1.3, 1.1]. One token: the middle, 1.0."""
    assert torch.allclose(tisdpo.rank_based(t(0.3, -1.0, 2.0, 0.3), 0.7, 1.3), t(0.9, 0.7, 1.3, 1.1))
    assert tisdpo.rank_based(t(-5.0), 0.7, 1.3).tolist() == [1.0]


def test_threshold_and_scale_by_hand():
    """Scores [-3, -1.5, 0, 0.75, 2] clipped to [-1.5, 1.5]: [-1.5, -1.5, 0, 0.75, 1.5]; mapped by
    0.7 + (x + 1.5) * 0.6 / 3: [0.7, 0.7, 1.0, 1.15, 1.3]."""
    assert torch.allclose(tisdpo.threshold_and_scale(t(-3, -1.5, 0, 0.75, 2), -1.5, 1.5, 0.7, 1.3),
                          t(0.7, 0.7, 1.0, 1.15, 1.3))


def test_binary_by_hand():
    """Scores [0.5, 2.0, -1.0, 0.5]. top 50%: k = int(4 * 0.5) = 2 tokens get 1; 2.0 has 1 score >= it (itself): 1;
    each 0.5 has 3 (2.0 and both 0.5s) > 2: 0 (ties share the lower value); -1.0 has 4: 0 -> [0, 1, 0, 0].
    top 75%: k = 3, the 0.5s join -> [1, 1, 0, 1]. top 100%: all 1."""
    x = t(0.5, 2.0, -1.0, 0.5)
    assert tisdpo.binary(x, 50).tolist() == [0, 1, 0, 0]
    assert tisdpo.binary(x, 75).tolist() == [1, 1, 0, 1]
    assert tisdpo.binary(x, 100).tolist() == [1, 1, 1, 1]


def test_origin_is_the_raw_score():
    """origin: the scores themselves, e.g. [-0.4, 2.5] stay [-0.4, 2.5]."""
    assert tisdpo.transform(t(-0.4, 2.5), settings(transform="origin")).tolist() == [-0.4, 2.5]


def test_the_per_side_sign():
    """Token 0: log pi_+ = -1, log pi_- = -2 (pi_+ prefers it); token 1: -2 and -1 (pi_- prefers it); token 2 is the
    EOS. raw = log pi_- - log pi_+ = [-1, 1]. Chosen side: -raw = [1, -1], ranks [1, 0] -> [1.3, 0.7]; rejected side:
    raw, ranks [0, 1] -> [0.7, 1.3]; the EOS gets 0 on both sides."""
    plus, minus = [-1.0, -2.0, -0.5], [-2.0, -1.0, -0.1]
    assert tisdpo.side_scores(t(*plus[:2]), t(*minus[:2]), chosen=True).tolist() == [1.0, -1.0]
    chosen = tisdpo.sequence_weights(plus, minus, True, True, settings())
    rejected = tisdpo.sequence_weights(plus, minus, False, True, settings())
    assert chosen == pytest.approx([1.3, 0.7, 0.0]) and rejected == pytest.approx([0.7, 1.3, 0.0])
    assert tisdpo.sequence_weights(plus, minus, True, False, settings())[2] > 0     # no EOS (truncated): weighted


@pytest.mark.parametrize("bad, words", [
    ({"min_scale": 1.5}, "prior.min_scale=1.5 > prior.max_scale=1.3"),
    ({"top_percent": 0.0}, "prior.top_percent=0.0 must be in (0, 100]"),
    ({"top_percent": 150.0}, "prior.top_percent=150.0 must be in (0, 100]"),
    ({"clip_low": 2.0}, "prior.clip_low=2.0 must be below prior.clip_high=1.5"),
    ({"contrastive": ["a"]}, "must be two model directories"),
])
def test_bad_transform_settings(bad, words):
    with pytest.raises(ValueError) as e:
        build_prior({"name": "tisdpo", **bad})
    assert words in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("args, words", [
    (["prior.contrastive=[{tmp}/empty,{tmp}/none]"], "prior.contrastive[0]={tmp}/empty is not a model directory"),
    (["prior.min_scale=2"], "prior.min_scale=2.0 > prior.max_scale=1.3"),
    (["prior.transform=binary", "prior.top_percent=0"], "prior.top_percent=0.0 must be in (0, 100]"),
])
def test_bad_settings_fail_the_cli_in_one_line(tmp_path, capsys, args, words):
    (tmp_path / "empty").mkdir()
    err = fails(capsys, ["train", "prior=tisdpo", *(a.format(tmp=tmp_path) for a in args), f"hydra.run.dir={tmp_path}/r"])
    assert words.format(tmp=tmp_path) in err and not (tmp_path / "r").exists()


def test_no_pairs_left_to_estimate_on(fast, tmp_path, capsys):
    err = fails(capsys, ["train", *fast, "prior=tisdpo", "dataset.truncation=drop", "dataset.max_prompt_length=4",
                         "dataset.max_length=8", f"hydra.run.dir={tmp_path}/r"])
    assert "prior.weights=estimated: no training pairs left to estimate token weights on" in err


# ----- engine level: all weights 1 is DPO ------------------------------------------------------------------

def test_given_weights_of_one_train_exactly_as_dpo(tmp_path):
    """weights=given with every weight 1 (the columns longer than any completion, so its EOS is 1 too) trains
    exactly as DPO: the same losses, margins and gradient norms."""
    rows = [{"prompt": f"What is {i}+{i}?", "chosen": f" {2 * i}.", "rejected": f" {2 * i + 1}, I think.",
             "chosen_weights": [1.0] * 64, "rejected_weights": [1.0] * 64} for i in range(24)]
    path = tmp_path / "ones.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    finals = {}
    for prior in ("dpo", "tisdpo"):
        run = tmp_path / prior
        main(["train", "dataset=local", f"dataset.path={path}", "dataset.eval_fraction=0.25", "trainer.max_steps=3",
              "trainer.batch_size=4", "trainer.eval_every=0", "trainer.save_model=false", f"prior={prior}",
              *(["prior.weights=given"] if prior == "tisdpo" else []), f"cache_dir={tmp_path}/cache",
              f"hydra.run.dir={run}"])
        finals[prior] = json.loads((run / "results.json").read_text())["final"]
    for key in ("loss", "eval/loss", "rewards/margins", "grad_norm"):
        assert finals["tisdpo"][key] == pytest.approx(finals["dpo"][key], rel=1e-6, abs=1e-7), key


# ----- the pipeline end to end -------------------------------------------------------------------------------

def test_estimated_weights_end_to_end(fast, tmp_path, monkeypatch):
    """Trains pi_+ and pi_- (cached), weights them into the final stage's pairs: in [0.7, 1.3] on completion tokens,
    0 on the EOS and the prompt; a second run with another beta reuses models and weights; loaded models work; and
    the default TIS-DPO is not DPO."""
    from midpo_cli.data.tokenize import collate
    from midpo_cli.recipe import Recipe

    seen = []
    pairs = Recipe._pairs

    def record(self):
        pairs(self)
        seen.append((self.prior, self.train_pairs, self.tokenizer))
    monkeypatch.setattr(Recipe, "_pairs", record)
    small = [*fast, "trainer.max_steps=3"]

    def train(name, *extra):
        main(["train", *small, "prior=tisdpo", "prior.contrastive_steps=2", *extra, f"hydra.run.dir={tmp_path / name}"])
        return json.loads((tmp_path / name / "results.json").read_text())

    first = train("first")
    models = first["tisdpo"]["contrastive"]
    assert [m["status"] for m in models] == ["trained", "trained"] and first["tisdpo"]["weights"]["status"] == "computed"
    assert [r["stage"] for r in first["pipeline"]["rows"]] == ["pi_+", "pi_-", "w chosen", "w rejected", "this run"]
    assert [s[0].name for s in seen] == ["dpo", "dpo", "tisdpo"] and seen[2][0].weights == "given"
    _, final_pairs, tok = seen[2]
    for p in final_pairs:
        for side, ids in enumerate((p.chosen, p.rejected)):
            w = p.values["weights"][side]
            assert len(w) == len(ids) and ids[-1] == tok.eos_token_id and w[-1] == 0.0
            assert all(0.7 - 1e-6 <= x <= 1.3 + 1e-6 for x in w[:-1])
    batch = collate(final_pairs[:4], tok.pad_token_id)
    starts = [len(p.prompt) for p in final_pairs[:4]] * 2
    for row, start in zip(batch["values"]["weights"], starts):
        assert row[:start - 1].abs().sum() == 0                            # label t predicts token t+1: the prompt
    stats = first["tisdpo"]["weights"]["chosen"]
    assert stats["min"] == pytest.approx(0.7) and stats["max"] == pytest.approx(1.3) and 0 < stats["at bounds"] < 1

    stamps = {m["where"]: (Path(m["where"]) / "results.json").stat().st_mtime_ns for m in models}
    second = train("second", "prior.beta=0.2")
    assert [m["status"] for m in second["tisdpo"]["contrastive"]] == ["reused", "reused"]
    assert second["tisdpo"]["weights"]["status"] == "reused" and [s[0].name for s in seen[3:]] == ["tisdpo"]
    assert stamps == {m["where"]: (Path(m["where"]) / "results.json").stat().st_mtime_ns for m in models}

    plus, minus = (f"{m['where']}/model" for m in models)
    loaded = train("loaded", f"prior.contrastive=[{plus},{minus}]")
    assert [m["status"] for m in loaded["tisdpo"]["contrastive"]] == ["loaded", "loaded"]
    assert loaded["tisdpo"]["contrastive"][0]["steps"] == 2                  # read from that run's results.json
    assert loaded["tisdpo"]["weights"]["path"] == first["tisdpo"]["weights"]["path"]   # keyed by the models' content

    main(["train", *small, "prior=dpo", f"hydra.run.dir={tmp_path / 'dpo'}"])
    dpo = json.loads((tmp_path / "dpo" / "results.json").read_text())
    assert abs(first["final"]["loss"] - dpo["final"]["loss"]) > 1e-4
