"""Which training pairs a run draws, and a reference pass that scores only those: the same per-step losses as
scoring every pair, an own cache entry per set of pairs, and a loud stop if a drawn pair was ever not scored."""
import json
from pathlib import Path

import pytest
from safetensors import safe_open

from midpo_cli.__main__ import main
from midpo_cli.data.tokenize import EncodedPair, collate
from midpo_cli.engine.draws import data_loader, endless, pairs_drawn

DATA = Path(__file__).parent / "data" / "standard.jsonl"                 # 36 training pairs, 4 eval pairs
RUN = ["train", "dataset=local", f"dataset.path={DATA}", "trainer.batch_size=4", "trainer.eval_every=0",
       "trainer.log_every=1", "trainer.save_model=false"]


def drawn_by_the_loader(n, seed, batch_size, grad_accum, processes, max_steps, monkeypatch) -> set[int]:
    """The pairs collated while steps 1..max_steps take their micro-batches on every process, from the loader a
    run uses, sharded as accelerate shards it for each process (which collates one batch ahead)."""
    from accelerate import PartialState
    from accelerate.data_loader import prepare_data_loader

    from midpo_cli.engine import draws

    pairs = [EncodedPair([i], [1], [2]) for i in range(n)]                 # the prompt token names the pair
    seen = set()
    monkeypatch.setattr(draws, "collate",
                        lambda ps, pad_id, pack=None: seen.update(p.prompt[0] for p in ps) or collate(ps, 0))
    try:
        for rank in range(processes):
            loader = prepare_data_loader(data_loader(pairs, batch_size, seed, pad_id=0), num_processes=processes,
                                         process_index=rank, put_on_device=False)
            batches = endless(None, loader, 0)
            for _ in range(max_steps * grad_accum):
                next(batches)
    finally:
        PartialState._reset_state()
    return seen


@pytest.mark.parametrize("n, seed, batch_size, grad_accum, processes, max_steps", [
    (36, 0, 4, 1, 1, 3), (37, 5, 4, 2, 1, 2), (50, 1, 3, 1, 2, 4), (50, 1, 3, 2, 3, 1), (36, 0, 4, 1, 1, 8),
    (36, 0, 4, 1, 1, 9), (36, 0, 4, 1, 1, 40), (10, 0, 4, 1, 2, 1)])
def test_pairs_drawn_are_those_the_loader_deals_out(n, seed, batch_size, grad_accum, processes, max_steps,
                                                    monkeypatch):
    drawn = pairs_drawn(n, seed, batch_size, grad_accum, processes, max_steps)
    per_epoch = n // batch_size // processes
    if drawn is None:                                                      # a full epoch or more: every pair
        assert max_steps * grad_accum >= per_epoch
    else:
        loader = drawn_by_the_loader(n, seed, batch_size, grad_accum, processes, max_steps, monkeypatch)
        assert drawn == sorted(loader)
        assert len(drawn) == (max_steps * grad_accum + 1) * processes * batch_size <= n


def entry_pairs(results: dict) -> int:
    with safe_open(results["ref_cache"]["path"], "pt") as f:
        return len(f.get_tensor("lengths")) // 2


def run(tmp_path, name, *extra) -> tuple[dict, list[dict], str]:
    """(results, metrics rows, train.log) of a run on the standard file, sharing one cache."""
    out = tmp_path / name
    main([*RUN, f"cache_dir={tmp_path / 'cache'}", *extra, f"hydra.run.dir={out}"])
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return json.loads((out / "results.json").read_text()), rows, (out / "train.log").read_text()


def test_the_reference_scores_only_the_pairs_a_short_run_draws(tmp_path):
    """3 steps of 4 pairs draw 12 of the 36 training pairs, and the loader collates the next 4 ahead: only those 16
    (and every eval pair) are scored, and the run trains exactly as one whose reference pass scored every pair
    (trainer.eval_train=true needs them all)."""
    short, short_rows, short_log = run(tmp_path, "short", "trainer.max_steps=3")
    full, full_rows, full_log = run(tmp_path, "full", "trainer.max_steps=3", "trainer.eval_train=true")
    assert entry_pairs(short) == 16 + 4 and entry_pairs(full) == 36 + 4
    assert "reference log-probs: 16 of 36 training pairs (those that max_steps=3 x grad_accum=1 micro-batches of " \
           "batch_size=4 on 1 process draw, and the one micro-batch the loader collates ahead), and all 4 eval " \
           "pairs" in short_log
    assert "36 of 36 training pairs (trainer.eval_train=true scores every training pair at the end)" in full_log
    assert [r["step"] for r in short_rows] == [r["step"] for r in full_rows] == [1, 2, 3]
    assert [r["loss"] for r in short_rows] == pytest.approx([r["loss"] for r in full_rows], abs=1e-6)
    for short_row, full_row in zip(short_rows, full_rows):                  # rewards/*, logratio/* too
        assert short_row == pytest.approx({k: full_row[k] for k in short_row}, abs=1e-6)
    assert short_rows[0]["loss"] != short_rows[-1]["loss"]                  # it trained
    assert short["final"]["eval/loss"] == pytest.approx(full["final"]["eval/loss"], abs=1e-6)

    longer, _, longer_log = run(tmp_path, "longer", "trainer.max_steps=6")   # more pairs: its own entry
    assert longer["ref_cache"]["key"] not in (short["ref_cache"]["key"], full["ref_cache"]["key"])
    assert entry_pairs(longer) == 28 + 4 and not longer["ref_cache"]["hit"]
    again, _, _ = run(tmp_path, "again", "trainer.max_steps=3")
    assert again["ref_cache"] == {**short["ref_cache"], "hit": True}
    epochs, _, epochs_log = run(tmp_path, "epochs", "trainer.max_steps=9")   # 9 steps x 4 = a full epoch
    assert entry_pairs(epochs) == 40 and "36 of 36 training pairs (max_steps=9 x grad_accum=1 micro-batches of " \
                                          "batch_size=4 on 1 process cover a full epoch)" in epochs_log


def test_a_drawn_pair_without_reference_log_probs_stops_the_run_in_one_line(tmp_path, monkeypatch, capsys):
    """Were the scored pairs ever fewer than those drawn, the run stops at the first such batch, in one line,
    instead of falling back to the live reference or ending in a KeyError."""
    import midpo_cli.recipe

    monkeypatch.setattr(midpo_cli.recipe, "pairs_drawn", lambda n, *a: [0, 1])
    with pytest.raises(SystemExit) as e:
        main([*RUN, f"cache_dir={tmp_path / 'cache'}", "trainer.max_steps=2", f"hydra.run.dir={tmp_path / 'r'}"])
    err = capsys.readouterr().err
    assert e.value.code == 1 and "Traceback" not in err and "KeyError" not in err
    assert "has no 'ref_logps' column (cached reference log-probs): the reference pass did not score it" in err
    assert not (tmp_path / "r" / "results.json").exists()
