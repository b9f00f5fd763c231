"""The run-level likelihood-displacement warning (engine/monitor.py): both log-probs falling while the margin
grows, read from the log-ratios against the reference (or the raw log-probs without one), once per run."""
import json
import math

from midpo_cli.__main__ import main
from midpo_cli.engine.monitor import Displacement
from midpo_cli.engine.trainer import metrics_rows


def row(step, chosen, rejected, margin=None, prefix="", signal="logratio"):
    margin = chosen - rejected if margin is None else margin
    r = {"step": step, f"{prefix}{signal}/chosen": chosen, f"{prefix}{signal}/rejected": rejected}
    if signal == "logratio":
        r[f"{prefix}logratio/margins"] = margin
    return r


def test_fires_once_after_patience_rows_and_names_what_to_try():
    d = Displacement(1.0, patience=2)
    assert d(row(1, 0.0, 0.0)) == []                                      # the start
    assert d(row(2, -1.5, -3.0)) == []                                    # one row is not a trend
    assert d(row(3, -0.5, -3.0)) == []                                    # chosen back within 1 nat: streak reset
    assert d(row(4, -1.2, -2.5)) == []
    (w,) = d(row(5, -2.0, -4.0))
    assert "likelihood displacement at step 5 (training pairs)" in w and "-2.00 nats" in w and "+2.00" in w
    assert "optimizer.lr" in w and "trainer.displacement_nats=1" in w
    assert d(row(6, -9.0, -20.0)) == []                                   # once per run


def test_a_falling_rejected_alone_or_a_shrinking_margin_is_no_displacement():
    d = Displacement(1.0, patience=1)
    assert d(row(1, 0.0, 0.0)) == []
    assert d(row(2, 0.5, -5.0)) == []                                     # the healthy case: chosen kept
    assert d(row(3, -3.0, -2.0)) == []                                    # both fell, the margin shrank
    assert d(row(4, -3.0, -3.5, margin=0.5)) == []                        # the margin grew, but not by 1 nat


def test_the_start_is_the_first_row_not_zero():
    """A stage that starts from another stage's policy has non-zero log-ratios at its first row."""
    d = Displacement(1.0, patience=1)
    assert d(row(1, -5.0, -6.0)) == []
    assert d(row(2, -5.5, -7.0)) == []                                    # 0.5 nats from the start
    assert d(row(3, -6.5, -9.0))


def test_held_out_rows_have_their_own_start_and_raw_logps_serve_without_a_reference():
    d = Displacement(1.0, patience=1)
    assert d(row(1, -10.0, -12.0, prefix="eval/", signal="logps")) == []
    (w,) = d(row(2, -11.5, -15.0, prefix="eval/", signal="logps"))
    assert "(held-out pairs)" in w and "their first logged values" in w and "eval/logps/*" in w


def test_off_and_non_finite_rows_say_nothing():
    assert Displacement(0.0, patience=1)(row(1, -9.0, -20.0)) == []
    d = Displacement(1.0, patience=1)
    d(row(1, 0.0, 0.0))
    assert d(row(2, math.nan, -5.0)) == [] and d(row(3, -3.0, math.inf)) == []   # a skipped step's row
    assert d(row(4, -3.0, -6.0))


def test_metrics_rows_leave_a_torn_last_line_out(tmp_path):
    f = tmp_path / "metrics.jsonl"
    f.write_text('{"step": 1, "loss": 0.7}\n\n{"step": 2, "loss": 0.6}\n{"step": 3, "lo')
    assert [r["step"] for r in metrics_rows(f)] == [1, 2]
    assert metrics_rows(tmp_path / "none.jsonl") == []


def test_a_run_that_pushes_both_down_warns_once_in_results(tmp_path, fast):
    """DPO at a learning rate far too high for the tiny model: both log-ratios fall by nats within 12 steps while
    the margin grows; the run warns once, lists it in results.json, and logs logratio/chosen and /rejected."""
    run = tmp_path / "run"
    main(["train", *fast, "optimizer.lr=1e-3", "trainer.max_steps=12", "trainer.displacement_nats=0.2",
          "trainer.save_model=false", f"hydra.run.dir={run}"])
    res = json.loads((run / "results.json").read_text())
    texts = [w["warning"] for w in res["warnings"] if "likelihood displacement" in w["warning"]]
    assert len(texts) == 1, res["warnings"]
    rows = metrics_rows(run / "metrics.jsonl")
    assert abs(rows[0]["logratio/chosen"]) < 1e-5 and abs(rows[0]["logratio/rejected"]) < 1e-5   # starts as ref
    assert min(r["logratio/chosen"] for r in rows) < -1.0
