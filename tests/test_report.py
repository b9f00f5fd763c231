"""Sweep tables, `midpo report` and the experiment presets (issue 5's done-when items)."""
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_module
from hydra.types import RunMode

import midpo_cli.priors  # noqa: F401
from midpo_cli.report import tables
from midpo_cli.__main__ import main
from midpo_cli.config import register_schemas
from midpo_cli.priors import PRIORS

CONF = Path(__file__).resolve().parents[1] / "conf"
register_schemas()


def sweep(args, sweep_dir):
    return subprocess.run([sys.executable, "-m", "midpo_cli", "train", "--multirun", *args,
                           "trainer.save_model=false", f"hydra.sweep.dir={sweep_dir}"],
                          capture_output=True, text=True, timeout=600)


def test_sweep_table_then_report_writes_plots(tmp_path, fast, capsys):
    d = tmp_path / "sweep"
    r = sweep([*fast, "prior=dpo,simpo", "seed=0,1", "trainer.max_steps=10"], d)
    assert r.returncode == 0, r.stderr[-3000:]
    csv = pd.read_csv(d / "sweep_table.csv")
    assert len(csv) == 4 and len(pd.read_parquet(d / "sweep_table.parquet")) == 4
    assert (d / "sweep_table.md").read_text().count("\n| ") == 4          # header excluded: 4 job rows
    assert set(csv["status"]) == {"ok"} and sorted(zip(csv["prior"], csv["seed"])) == [
        ("dpo", 0), ("dpo", 1), ("simpo", 0), ("simpo", 1)]
    for col in ("overrides", "final/loss", "best/eval/rewards/accuracies", "final/eval/logps/margin",
                "task/true_reward", "task/kl", "task/win_rate", "tokens_per_s", "peak_memory_mb",
                "wall_time_s", "ref_cache_hit", "git_commit"):
        assert col in csv, col
    assert csv["task/true_reward"].between(0, 1).all() and "sweep table" in r.stdout

    main(["report", str(d)])
    out = capsys.readouterr().out
    pngs = sorted(p.name for p in (d / "report").glob("*.png"))
    assert pngs == ["bars.png", "curves.png", "frontier.png"]
    summary = pd.read_csv(d / "report" / "summary.csv")
    assert list(summary["group"]) == ["dpo", "simpo"] and list(summary["n_ok"]) == [2, 2]
    lo, hi = summary["task/true_reward/ci_lo"], summary["task/true_reward/ci_hi"]
    assert (lo <= summary["task/true_reward/mean"]).all() and (summary["task/true_reward/mean"] <= hi).all()
    md = (d / "report" / "report.md").read_text()
    assert "logp margin" in md and "own margin" in md and "![frontier](frontier.png)" in md
    assert "simpo" in out and "true reward" in out


def test_failing_job_is_a_row_and_the_sweep_exits_1(tmp_path, fast):
    d = tmp_path / "sweep"
    r = sweep([*fast, "dataset.max_length=64,2", "trainer.max_steps=3"], d)   # 2 leaves no room for a completion
    assert r.returncode == 1
    assert "1 of 2 jobs did not finish" in r.stderr and "Traceback" not in r.stderr
    csv = pd.read_csv(d / "sweep_table.csv", keep_default_na=False)
    assert list(csv["status"]) == ["ok", "failed"]
    assert "max_length=2" in csv["error"][1] and csv["error"][0] == ""
    assert (d / "0" / "results.json").exists() and json.loads((d / "1" / "error.json").read_text())["status"] == "failed"
    assert "failed" in (d / "sweep_table.md").read_text()


def test_report_lists_crashed_runs_as_incomplete(tmp_path, fast, capsys):
    d = tmp_path / "crashed"
    main(["train", *fast, "trainer.max_steps=3", "trainer.save_model=false", f"hydra.run.dir={d / '0'}"])
    (d / "1").mkdir()                                                     # a job killed mid-run:
    (d / "1" / "config.yaml").write_text((d / "0" / "config.yaml").read_text())
    first = (d / "0" / "metrics.jsonl").read_text().splitlines()[0]
    (d / "1" / "metrics.jsonl").write_text(first + '\n{"step": 2, "lo')   # a torn last line
    (d / "2").mkdir()                                                     # an empty folder is not a run
    capsys.readouterr()
    main(["report", str(d), "--out", str(tmp_path / "rep")])
    out = capsys.readouterr().out
    runs = pd.read_csv(tmp_path / "rep" / "runs.csv")
    assert list(runs["status"]) == ["ok", "incomplete"] and runs["steps"][1] == 1
    assert runs["prior"][1] == "dpo" and "did not finish" in out
    assert list(pd.read_csv(tmp_path / "rep" / "summary.csv")["n_ok"]) == [1]
    assert (tmp_path / "rep" / "curves.png").exists()


def test_report_errors_are_actionable(tmp_path, capsys):
    for args, code, words in [([str(tmp_path / "nope")], 2, "not a directory"), ([str(tmp_path)], 1, "no runs")]:
        with pytest.raises(SystemExit) as e:
            main(["report", *args])
        assert e.value.code == code and words in capsys.readouterr().err


def test_bootstrap_ci_brackets_the_mean_and_is_reproducible():
    x = np.array([0.1, 0.4, 0.35, 0.2])
    lo, hi = tables.bootstrap_ci(x)
    assert lo <= x.mean() <= hi and (lo, hi) == tables.bootstrap_ci(x)
    assert x.min() <= lo and hi <= x.max()
    assert all(math.isnan(v) for v in tables.bootstrap_ci(np.array([0.3])))


def test_groups_drop_seed_and_shared_overrides():
    df = pd.DataFrame({"prior": ["dpo", "dpo", "simpo", "simpo"], "overrides": [
        "prior=dpo seed=0 trainer.max_steps=9 prior.beta=0.1", "prior=dpo seed=1 trainer.max_steps=9 prior.beta=0.3",
        "prior=simpo seed=0 trainer.max_steps=9", "prior=simpo seed=1 trainer.max_steps=9"]})
    assert tables._groups(df) == ["dpo prior.beta=0.1", "dpo prior.beta=0.3", "simpo", "simpo"]


SINGLE_RUNS = {"dice", "tisdpo", "sparsepo"}          # presets that are one run of their variant, not a sweep


def test_experiment_presets_compose_into_sweeps_of_known_priors():
    presets = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
    assert "all_priors" in presets
    options = {p.stem for p in (CONF / "prior").glob("*.yaml")}
    for name in presets:
        with initialize_config_module(version_base="1.3", config_module="midpo_cli.conf"):
            cfg = compose("train", overrides=[f"+experiment={name}"], return_hydra_config=True)
        params = cfg.hydra.sweeper.params
        if name in SINGLE_RUNS:                                    # one run of a pipeline prior, named as it
            assert cfg.hydra.mode != RunMode.MULTIRUN and not params and cfg.prior.name == name, name
            continue
        assert cfg.hydra.mode == RunMode.MULTIRUN and "seed" in params, name
        priors = sweep_values(f"prior={params.get('prior', cfg.prior.name)}", options)
        assert set(priors) <= options, (name, set(priors) - options)
        if name == "all_priors":                                   # every fixed prior, by glob: none to list by hand
            assert set(priors) == {p for p in PRIORS if not p.startswith("learned_")}


def sweep_values(override: str, options: set) -> list[str]:
    """The values a sweep override expands to (a glob over the group's options included), as Hydra does."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import Glob
    ov = OverridesParser.create().parse_override(override)
    value = ov.value()
    if isinstance(value, Glob):
        return value.filter(sorted(options))
    return list(ov.sweep_string_iterator()) if ov.is_sweep_override() else [str(value)]


def test_a_sweeps_command_line_shows_what_ran(tmp_path):
    """A preset's sweeper params appear in the report's command line only where no override replaced them."""
    from omegaconf import OmegaConf
    from midpo_cli.report.command import sweep_command

    OmegaConf.save({"hydra": {"overrides": {"task": ["+experiment=all_priors", "prior=dpo,simpo"]},
                              "sweeper": {"params": {"prior": "glob(*)", "seed": "0,1"}}}}, tmp_path / "multirun.yaml")
    assert sweep_command(tmp_path) == "midpo train --multirun +experiment=all_priors prior=dpo,simpo seed=0,1"


def fake_run(d: Path, prior: str, seed: int, beta: float | None = None, *, reward: float, kl: float = 1.0,
             win: float = 0.5, final: dict | None = None, arm: str | None = None, warnings: list | None = None) -> Path:
    """A finished run directory of the built-in task, as `midpo train` leaves it (results.json, metrics.jsonl)."""
    d.mkdir(parents=True)
    overrides = [f"+arm={arm}" if arm else f"prior={prior}", f"seed={seed}", *([f"prior.beta={beta}"] if beta else [])]
    beta = PRIORS[prior].beta if beta is None else beta
    ev = {"true_reward/policy": reward, "true_reward/reference": 0.3, "kl/policy_ref": kl, "win_rate": win,
          "length/policy": 5.0, "length/reference": 5.0}
    (d / "results.json").write_text(json.dumps({
        "config": {"seed": seed, "prior": {"name": prior, "beta": beta}, "dataset": {"source": "builtin"}},
        "eval": ev, "overrides": overrides, "warnings": warnings or []}))
    (d / "metrics.jsonl").write_text(json.dumps({"step": 10, "loss": 0.6, **(final or {})}) + "\n")
    return d


def test_t_interval_is_the_hand_computed_one_and_the_summary_uses_it_below_ten_seeds():
    d = np.array([0.1, 0.3, 0.2, 0.4, 0.0])      # mean 0.2, s = sqrt(0.1/4) = 0.15811, t_{4,0.975} = 2.7764
    lo, hi = tables.t_interval(d, 0.95)
    assert math.isclose((lo + hi) / 2, 0.2) and math.isclose((hi - lo) / 2, 2.7764451 * 0.1581139 / math.sqrt(5),
                                                             rel_tol=1e-6)
    assert math.isclose((hi - lo) / 2, 0.19632, abs_tol=1e-5)
    assert math.isclose(tables._t_quantile(0.975, 4), 2.7764451, rel_tol=1e-7)    # without scipy: the same
    assert math.isclose(tables._t_quantile(0.995, 9), 3.2498355, rel_tol=1e-7)
    df = pd.DataFrame({"group": ["a"] * 3 + ["b"] * 10, "prior": "dpo", "status": "ok",
                       "x": [0.1, 0.2, 0.6, *np.linspace(0, 1, 10)]})
    agg = tables.aggregate(df, ["x"])
    assert list(agg["x/interval"]) == ["t", "bootstrap"]
    lo, hi = tables.t_interval(np.array([0.1, 0.2, 0.6]))
    assert (agg["x/ci_lo"][0], agg["x/ci_hi"][0]) == (lo, hi) and lo < 0.1 and hi > 0.6   # not the seeds' min-max


def paired_sweep(root: Path, diffs: list[float], base: str = "simpo", other: str = "dpo") -> Path:
    """`other` - `base` true reward = diffs[seed]; KL and the held-out J(π, π_ref) too."""
    for seed, d in enumerate(diffs):
        fake_run(root / f"{base}{seed}", base, seed, reward=0.4 + 0.05 * seed, final={"eval/logratio/loss": 0.6})
        fake_run(root / f"{other}{seed}", other, seed, reward=0.4 + 0.05 * seed + d,
                 final={"eval/logratio/loss": 0.5, "prior/phi_len": 0.1 * seed},      # a learnable prior's scalar
                 warnings=[{"step": 3, "warning": "x: collapse signature at step 3"}] if seed < 2 else [])
    return root


def test_paired_differences_against_the_baseline_have_the_hand_computed_t_interval(tmp_path, capsys):
    d = paired_sweep(tmp_path / "s", [0.1, 0.3, 0.2, 0.4, 0.0])
    main(["report", str(d), "report.baseline=simpo"])
    out, err = capsys.readouterr()
    rows = pd.read_csv(d / "report" / "paired.csv").set_index("metric")
    r = rows.loc["task/true_reward"]
    assert (r["group"], r["baseline"], r["n"], r["seeds"]) == ("dpo", "simpo", 5, "0 1 2 3 4")
    assert math.isclose(r["mean_diff"], 0.2) and math.isclose(r["std"], 0.158114, rel_tol=1e-5)
    assert math.isclose(r["t_hi"] - 0.2, 0.196324, rel_tol=1e-5)                   # 2.776445 * 0.158114 / sqrt(5)
    assert math.isclose(0.2 - r["t_lo"], 0.196324, rel_tol=1e-5)
    assert r["wins"] == 4 and np.isnan(r["bootstrap_lo"])                   # 0.0 is no win; n < 10: no bootstrap
    j = rows.loc["final/eval/logratio/loss"]
    assert math.isclose(j["mean_diff"], -0.1) and j["wins"] == 5 and "final/train/loss" not in rows.index
    assert "t [+0.0037, +0.3963]" in out and "held-out J(π, π_ref)" in out and "paired by seed" in out
    assert "n = 5 paired" not in err
    md = (d / "report" / "report.md").read_text()
    assert "## Paired comparison against `simpo`" in md and "t [+0.0037, +0.3963]" in md
    assert "| dpo | 5/5 | 2/5 | 0.200±0.158 |" in md                  # the prior's own scalar at the end, per group
    assert "true reward gain: seeds > 0" in md                          # how many seeds beat their reference (0.3)
    agg = pd.read_csv(d / "report" / "summary.csv").set_index("group")
    assert math.isclose(agg.loc["dpo", "final/prior/phi_len/mean"], 0.2) and "prior/phi_len" not in out  # not printed
    assert agg.loc["dpo", "task/true_reward_gain/above"] == 5 and agg.loc["dpo", "collapsed"] == 2
    assert "| group | seeds ok | collapse warned |" in md                 # 2 of 5 runs raised the collapse warning

    d3 = paired_sweep(tmp_path / "s3", [0.1, 0.3, 0.2])
    main(["report", str(d3), "report.baseline=simpo"])
    err = capsys.readouterr().err
    assert "n = 3 paired seeds" in err and "the t-interval is wide and assumes normal differences" in err


def test_a_bootstrap_interval_only_from_ten_paired_seeds():
    from midpo_cli.report import paired
    nine, ten = (pd.Series(np.linspace(-0.1, 0.3, n)) for n in (9, 10))
    assert np.isnan(paired.stats(nine, 0.95, "max")["bootstrap_lo"])
    s = paired.stats(ten, 0.95, "max")
    assert (s["bootstrap_lo"], s["bootstrap_hi"]) == tables.bootstrap_ci(ten.to_numpy()) and np.isfinite(s["t_lo"])


def frontier_sweep(root: Path) -> Path:
    """dpo at two betas (KL 2 -> reward 0.5, KL 4 -> 0.7 on both seeds) and simpo at one beta: its KL 3 on seed 0
    (inside dpo's range), 5 on seed 1 (outside)."""
    for seed in (0, 1):
        fake_run(root / f"dpo-a{seed}", "dpo", seed, 0.1, reward=0.5, kl=2.0)
        fake_run(root / f"dpo-b{seed}", "dpo", seed, 1.0, reward=0.7, kl=4.0)
    fake_run(root / "simpo0", "simpo", 0, reward=0.55, kl=3.0)
    fake_run(root / "simpo1", "simpo", 1, reward=0.6, kl=5.0)
    return root


def test_reward_at_matched_kl_is_interpolated_on_each_seed_and_never_extrapolated(tmp_path, capsys):
    from midpo_cli.report import paired
    d = frontier_sweep(tmp_path / "f")
    df = tables.collect([d])
    fam, seeds, rows, notes = paired.matched_kl(df, paired.baseline_groups(df, "simpo"), 0.95, None)
    dpo = seeds[seeds["group"] == "dpo"].set_index("seed")
    assert math.isclose(dpo.loc[0, "reward_at_target"], 0.6) and dpo.loc[0, "target_kl"] == 3.0   # 0.5 + 0.2 * 1/2
    assert dpo.loc[1, "status"] == "out of range" and np.isnan(dpo.loc[1, "reward_at_target"])   # KL 5 > 4: not 0.7
    r = rows.iloc[0]
    assert (r["group"], r["n"], r["seeds"]) == ("dpo", 1, "0") and math.isclose(r["mean_diff"], 0.05)
    assert fam.set_index("group").loc["dpo", "out_of_range"] == 1 and any("out of range" in n for n in notes)

    fam, seeds, rows, _ = paired.matched_kl(df, None, 0.95, 2.5)                 # report.match_kl, no baseline
    assert list(seeds[seeds["group"] == "dpo"]["reward_at_target"]) == pytest.approx([0.55, 0.55])
    assert fam.set_index("group").loc["simpo", "frontier"] == False and rows.empty   # noqa: E712
    _, _, _, notes = paired.matched_kl(df, paired.baseline_groups(df, "dpo"), 0.95, None)
    assert "spans several betas" in notes[0] and "report.match_kl" in notes[0]
    for seed in (0, 1):                                    # a second frontier, 0.05 above dpo's at every KL
        fake_run(d / f"tdpo-a{seed}", "tdpo", seed, 0.1, reward=0.55, kl=2.0)
        fake_run(d / f"tdpo-b{seed}", "tdpo", seed, 1.0, reward=0.75, kl=4.0)
    df = tables.collect([d])
    _, _, rows, _ = paired.matched_kl(df, paired.baseline_groups(df, "dpo"), 0.95, 3.0)   # both read at KL 3
    r = rows.set_index("group").loc["tdpo"]
    assert r["n"] == 2 and math.isclose(r["mean_diff"], 0.05) and r["note"] == ""

    main(["report", str(d), "report.baseline=simpo"])
    out = capsys.readouterr().out
    assert "out of range" in out and "1 of 2 seeds" in out and "single beta" not in out


def test_report_options_are_checked_in_one_line(tmp_path, capsys):
    d = paired_sweep(tmp_path / "s", [0.1, 0.2])
    for option, words in [("report.baseline=ipo", "report.baseline=ipo names no group of this report; one of: dpo, simpo"),
                          ("report.basline=dpo", "unknown option report.basline; midpo report takes report.baseline=..."),
                          ("report.confidence=95", "report.confidence=95: give a level in (0, 1)")]:
        with pytest.raises(SystemExit) as e:
            main(["report", str(d), option])
        err = capsys.readouterr().err
        assert e.value.code == 2 and words in err and len(err.strip().splitlines()) == 1, err
    assert not (d / "report").exists()                                         # nothing written
