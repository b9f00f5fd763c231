"""DICE's rounds (midpo_cli/pipelines/dice.py): the length-regularised selection, the replay mix, the previous
round's policy as the prior, and a run killed in its first or last round that resumes where it stopped."""
import json

import pytest
import torch

from conftest import fails, kill_after_first_checkpoint
from midpo_cli.__main__ import main
from midpo_cli.pipelines.dice import mix, select
from midpo_cli.priors import build_prior


def test_selection_is_best_and_worst_after_the_length_penalty():
    """One prompt, three samples: scores [1.0, 0.9, 0.0], lengths [5, 3, 3].
    alpha = 0: chosen = sample 0 (length 5), rejected = sample 2 (length 3): length gap 2.
    alpha > 0.05: 1 - 5a < 0.9 - 3a, so chosen = sample 1 (length 3) and the gap is 0; the authors' search takes
    the first alpha of the grid (steps of 0.001) with the smallest gap: 0.051 (at 0.05 the two tie and the first
    wins). A given alpha is used as it is."""
    scores, lengths = torch.tensor([[1.0, 0.9, 0.0]], dtype=torch.float64), torch.tensor([[5.0, 3.0, 3.0]],
                                                                                          dtype=torch.float64)
    best, worst, alpha = select(scores, lengths, None)
    assert (best.tolist(), worst.tolist(), alpha) == ([1], [2], pytest.approx(0.051))
    best, worst, alpha = select(scores, lengths, 0.0)
    assert (best.tolist(), worst.tolist(), alpha) == ([0], [2], 0.0)


def test_replay_makes_the_offline_fraction():
    gen, off = [{"g": i} for i in range(10)], [{"o": i} for i in range(100)]
    for replay, n in ((0.5, 10), (0.25, 3), (0.0, 0), (1.0, 100)):
        rows, replayed = mix(gen, off, replay, seed=0)
        assert replayed == n and len(rows) == 10 * (replay < 1) + n
        assert sum("o" in r for r in rows) == n and len({json.dumps(r) for r in rows}) == len(rows)


def test_one_round_is_dpo_and_bad_settings_are_one_line(capsys):
    assert build_prior({"name": "dice", "rounds": 1}).pipeline() is None
    assert build_prior({"name": "dice"}).pipeline() is not None                # the default is DICE, not DPO
    for opt, words in (("prior.rounds=0", "prior.rounds=0 must be >= 1"),
                       ("prior.replay=1.5", "prior.replay=1.5 must be in [0, 1]"),
                       ("prior.samples=1", "prior.samples=1 must be >= 2")):
        assert words in fails(capsys, ["train", "prior=dice", opt])


ARGS = ["prior=dice", "prior.samples=4", "trainer.max_steps=6", "trainer.save_every=2", "trainer.save_model=false",
        "optimizer.lr=3e-4"]


@pytest.mark.slow
def test_two_rounds_the_second_against_the_first_and_a_kill_in_either_round_resumes(tmp_path, fast, monkeypatch):
    from midpo_cli.data.tokenize import collate
    from midpo_cli.engine.forward import pair_view
    from midpo_cli.engine.models import load_model
    from midpo_cli.recipe import Recipe

    recipes, setup = [], Recipe.setup
    monkeypatch.setattr(Recipe, "setup", lambda self, *a, **k: recipes.append(self) or setup(self, *a, **k))
    full = tmp_path / "outputs" / "full"
    args = [*fast, *ARGS]
    main(["train", *args, f"hydra.run.dir={full}"])
    res = json.loads((full / "results.json").read_text())
    rows = res["pipeline"]["rows"]
    assert [r["round"] for r in rows] == [1, 2] and rows[1]["generated"] > 0
    assert rows[1]["replayed"] == min(rows[1]["generated"], rows[0]["pairs"])   # replay 0.5: as many offline
    assert (full / "rounds/1/model").is_dir() and (full / "rounds/2/pairs.json").is_file()
    assert [r.run_dir for r in recipes] == [full / "rounds/1", full]

    # round 2's prior is the saved round-1 policy: its log-probs on round 2's pairs are that model's
    last = recipes[-1]
    assert last.prior.snapshot == str(full / "rounds/1/model")
    saved = load_model(last.cfg.model, last.tokenizer, path=str(full / "rounds/1/model")).eval()
    batch = collate(last.train_pairs[:4], last.tokenizer.pad_token_id)
    with torch.no_grad():
        v = pair_view(batch, saved, last.prior, snapshot=last.snapshot)
    assert torch.equal(v.snapshot_logps, v.logps) and v.mask.sum() > 0

    # killed in round 2 (the run's own checkpoints), then the same command: round 1 reused, round 2 resumed
    killed = tmp_path / "outputs" / "killed"
    kill_after_first_checkpoint(args, killed)
    round1 = (killed / "rounds/1/results.json").stat().st_mtime_ns
    main(["train", *args, f"hydra.run.dir={killed}"])
    again = json.loads((killed / "results.json").read_text())
    assert again["resumed_from"] and (killed / "rounds/1/results.json").stat().st_mtime_ns == round1
    assert abs(again["final"]["loss"] - res["final"]["loss"]) < 1e-3

    # killed in round 1 (a sub-run's checkpoints): the same command resumes round 1 there, then trains round 2
    early = tmp_path / "outputs" / "early"
    kill_after_first_checkpoint(args, early, where="rounds/1/checkpoints")
    assert not (early / "rounds/1/results.json").exists() and not (early / "rounds/2").exists()
    main(["train", *args, f"hydra.run.dir={early}"])
    first = json.loads((early / "rounds/1/results.json").read_text())
    assert first["resumed_from"] and "rounds/1/checkpoints/step-" in first["resumed_from"]
    assert abs(json.loads((early / "results.json").read_text())["final"]["loss"] - res["final"]["loss"]) < 1e-3
