"""Sweeps at scale (issue 12): launchers, per-job resources, sweep tables from any launcher, the tune preset."""
import json
import math
import os
import subprocess
import sys

import pandas as pd
import pytest
from hydra import compose, initialize_config_module

import midpo_cli.priors  # noqa: F401
from midpo_cli.sweeps import resources
from midpo_cli.__main__ import main
from midpo_cli.config import register_schemas
from midpo_cli.report import objective, tables

register_schemas()
SMALL = ["prior=dpo,simpo", "trainer.max_steps=2", "trainer.save_model=false"]


def sweep(args, sweep_dir, cwd=None):
    return subprocess.run([sys.executable, "-m", "midpo_cli", "train", "--multirun", *args,
                           f"hydra.sweep.dir={sweep_dir}"], capture_output=True, text=True, timeout=600, cwd=cwd)


def finals(sweep_dir) -> dict:
    """{(prior, seed): results.json `final`} of the finished jobs of a sweep."""
    out = {}
    for path in sweep_dir.glob("*/results.json"):
        r = json.loads(path.read_text())
        out[(r["prior"], r["seed"])] = r["final"]
    return out


def same_finals(a: dict, b: dict) -> bool:
    """The same jobs with the same final metrics, to float32 rounding: a job with 1 thread and one with several
    may sum in another order on some CPUs (exact equality would hold on one machine and fail on another)."""
    def close(x, y):
        return x is None and y is None or (x is not None and y is not None and
                                           math.isclose(x, y, rel_tol=1e-5, abs_tol=1e-7))
    return a.keys() == b.keys() and all(a[k].keys() == b[k].keys() and all(close(a[k][m], b[k][m]) for m in a[k])
                                        for k in a)


@pytest.fixture(scope="module")
def basic(tmp_path_factory, cache_dir):
    """The same 2-job sweep through Hydra's basic launcher (in this process): the reference results."""
    from conftest import FAST
    d = tmp_path_factory.mktemp("basic") / "sweep"
    main(["train", "--multirun", *FAST, f"cache_dir={cache_dir}", *SMALL, f"hydra.sweep.dir={d}"])
    return finals(d)


# --- per-job resources (midpo_cli/sweeps/resources.py) -------------------------------------------------------------

def test_threads_are_split_between_jobs_that_share_a_machine():
    joblib = "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"
    local = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher"
    slurm = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    basic = "hydra._internal.core_plugins.basic_launcher.BasicLauncher"
    assert resources.threads_per_job({"_target_": joblib, "n_jobs": 4}, 16) == 4
    assert resources.threads_per_job({"_target_": joblib, "n_jobs": 3}, 2) == 1       # never 0
    assert resources.threads_per_job({"_target_": joblib, "n_jobs": -1}, 16) == 1     # one job per core
    assert resources.threads_per_job({"_target_": joblib, "n_jobs": -4}, 16) == 1     # 13 jobs on 16 cores
    assert resources.threads_per_job({"_target_": joblib, "n_jobs": 1}, 16) is None   # one at a time: the machine
    assert resources.threads_per_job({"_target_": slurm, "cpus_per_task": 8}, 64) == 8
    assert resources.threads_per_job({"_target_": local, "cpus_per_task": 2}, 16) == 2
    assert resources.threads_per_job({"_target_": basic}, 16) is None
    assert [resources.concurrent_jobs({"_target_": t, "n_jobs": 2}, 8) for t in (joblib, local, slurm, basic)] == [2, 0, 1, 1]


def test_gpu_pool_gives_each_running_job_its_own_device(tmp_path):
    """Jobs 0 and 1 hold GPUs 0 and 1; job 2 finds both taken and shares GPU 2 % 2 = 0; once job 0 ends,
    job 3 (which tries 3 % 2 = 1 first, still held) gets GPU 0."""
    a, lock_a = resources.claim_gpu(tmp_path, 2, job_num=0)
    b, lock_b = resources.claim_gpu(tmp_path, 2, job_num=1)
    c, lock_c = resources.claim_gpu(tmp_path, 2, job_num=2)
    assert (a, b, c) == (0, 1, 0) and lock_a and lock_b and lock_c is None
    lock_a.close()
    d, lock_d = resources.claim_gpu(tmp_path, 2, job_num=3)
    assert d == 0 and lock_d is not None
    assert resources.claim_gpu(tmp_path, 4, job_num=6)[0] == 2                        # free: start at 6 % 4
    lock_b.close(), lock_d.close()


# --- objective (report/objective.py) ---------------------------------------------------------------------

def test_objective_reads_held_out_metrics_and_the_true_reward():
    r = {"final": {"eval/rewards/accuracies": 0.75, "eval/logps/chosen": -3.0, "eval/logps/rejected": -5.5,
                   "eval/loss": float("nan")},
         "eval": {"true_reward/policy": 0.6, "true_reward/reference": 0.45, "win_rate": 0.7}}
    assert objective.value(r, "eval/rewards/accuracies") == 0.75
    assert objective.value(r, "eval/logps/margin") == 2.5
    assert objective.value(r, "task/true_reward") == 0.6
    assert math.isclose(objective.value(r, "task/true_reward_gain"), 0.15)
    assert objective.value(r, "eval/loss") is None and objective.value(r, "eval/logratio/margins") is None
    assert objective.direction("eval/loss") == "minimize" and objective.direction("task/win_rate") == "maximize"
    with pytest.raises(ValueError, match="hydra.sweeper.direction"):
        objective.direction("grad_norm")


# --- tables from any launcher (report/tables.py) -------------------------------------------------------

def test_table_lists_unfinished_and_never_started_jobs_and_skips_hidden_folders(tmp_path):
    """multirun.yaml lists 3 jobs: 0 finished (and was reused), 1 started (job.json only), 2 never started."""
    d = tmp_path / "sweep"
    (d / "0").mkdir(parents=True)
    (d / "0" / "results.json").write_text(json.dumps({"config": {"prior": {"name": "dpo"}, "seed": 0},
                                                      "overrides": ["prior=dpo", "seed=0"], "final": {}}))
    (d / "0" / "reused.json").write_text('{"reused_at": "2026-11-30T10:00:00"}')
    (d / "1").mkdir()
    (d / "1" / "job.json").write_text(json.dumps({"job_num": 1, "overrides": ["prior=dpo", "seed=1"], "starts": 2}))
    (d / ".submitit" / "123").mkdir(parents=True)
    (d / ".submitit" / "123" / "config.yaml").write_text("x: 1")                     # not a run
    (d / "multirun.yaml").write_text(
        "hydra:\n  sweeper:\n    _target_: hydra._internal.core_plugins.basic_sweeper.BasicSweeper\n"
        "    max_batch_size: null\n    params: null\n  sweep:\n    dir: x\n    subdir: ${hydra.job.num}\n"
        "  overrides:\n    task: [prior=dpo, 'seed=0,1,2']\n")
    df = tables.collect([d])
    assert list(df["job"]) == ["0", "1", "2"]
    assert list(df["status"]) == ["ok", "incomplete", "not started"]
    assert list(df["reused"]) == [True, False, False] and df["starts"][1] == 2
    assert list(df["seed"]) == [0, 1, 2] and set(df["prior"]) == {"dpo"}
    assert "reused" in tables.sweep_summary(df)


# --- launchers end to end ------------------------------------------------------------------------------

def test_joblib_sweep_runs_jobs_in_parallel_with_the_basic_launchers_results(tmp_path, fast, basic):
    """2 jobs at once (hydra/launcher=parallel), 1 CPU thread each on 2 cores; a failing job in a worker
    writes error.json and is a `failed` row; the others equal the basic launcher's results."""
    d = tmp_path / "sweep"
    r = sweep([*fast, *SMALL, "dataset.max_length=64,2", "hydra/launcher=parallel", "hydra.launcher.n_jobs=2"], d)
    assert r.returncode == 1 and "2 of 4 jobs did not finish" in r.stderr, r.stderr[-3000:]
    csv = pd.read_csv(d / "sweep_table.csv", keep_default_na=False)
    assert sorted(csv["status"]) == ["failed", "failed", "ok", "ok"]
    for job in csv[csv["status"] == "failed"]["job"]:
        assert json.loads((d / str(job) / "error.json").read_text())["status"] == "failed"
    assert same_finals(finals(d), basic)
    jobs = [json.loads((d / str(i) / "job.json").read_text()) for i in range(4)]
    cores = resources.available_cores()
    assert {j["launcher"] for j in jobs} == {"joblib"} and {j["threads"] for j in jobs} == {max(1, cores // 2)}
    assert len({j["pid"] for j in jobs}) >= 2                                        # really other processes


def test_submitit_local_sweep_and_report_rebuilt_from_the_sweep_dir(tmp_path, fast, basic, capsys):
    d = tmp_path / "sweep"
    r = sweep([*fast, *SMALL, "hydra/launcher=local"], d)
    assert r.returncode == 0, r.stderr[-3000:]
    assert list(pd.read_csv(d / "sweep_table.csv")["status"]) == ["ok", "ok"]
    assert (d / ".submitit").is_dir() and same_finals(finals(d), basic)
    assert json.loads((d / "0" / "job.json").read_text())["launcher"] == "submitit_local"
    for f in ("results.json", "metrics.jsonl", "config.yaml", "job.json", "train.log", "data_report.json",
              "run.json"):
        os.remove(d / "1" / f)                                                      # as if job 1 never ran
    main(["report", str(d)])
    runs = pd.read_csv(d / "report" / "runs.csv")
    assert list(runs["status"]) == ["ok", "not started"] and "did not finish" in capsys.readouterr().out


# --- the tune preset -----------------------------------------------------------------------------------

def test_tune_searches_each_prior_around_its_own_default():
    from midpo_cli.sweeps.tune import search_space
    cfgs = {}
    for p in ("dpo", "simpo"):
        with initialize_config_module(version_base="1.3", config_module="midpo_cli.conf"):
            cfgs[p] = compose("train", overrides=[f"prior={p}", "+experiment=tune"])
    assert search_space(cfgs["dpo"], set(), set(), 10, None)["space"] == ["prior.beta=tag(log, interval(0.01, 1))"]
    plan = search_space(cfgs["simpo"], set(), {"prior.gamma"}, 4, 10)
    assert plan["space"] == ["prior.beta=tag(log, interval(0.5, 8))", "optimizer.lr=tag(log, interval(5e-06, 0.0005))"]
    assert plan["keys"] == ["prior.beta", "optimizer.lr", "prior.gamma"] and plan["defaults"]["prior.beta"] == 2.0
    assert search_space(cfgs["dpo"], {"prior.beta"}, set(), 10, None)["space"] == []   # given: not searched
    with initialize_config_module(version_base="1.3", config_module="midpo_cli.conf"):
        cfg = compose("train", overrides=["+experiment=tune"], return_hydra_config=True)
    assert cfg.hydra.sweeper._target_.startswith("hydra_plugins.") and cfg.trainer.objective == "task/true_reward"


def test_tune_summary_picks_the_best_trial_per_prior_and_compares_confirm_runs(tmp_path, capsys):
    """Fake trials (Hydra JobReturns): dpo 0.3 / 0.5 (and one failed), simpo 0.4; confirm seeds 1, 2."""
    from hydra.core.utils import JobReturn, JobStatus
    from omegaconf import OmegaConf

    from midpo_cli.report import best
    from midpo_cli.sweeps.tune import pick

    def job(name, prior, beta, value, seed=0, status=JobStatus.COMPLETED):
        (tmp_path / name).mkdir(parents=True)
        over = [f"prior={prior}", f"prior.beta={beta}", f"seed={seed}"]
        if value is not None:
            (tmp_path / name / "results.json").write_text(json.dumps({
                "config": {"prior": {"name": prior, "beta": beta}, "seed": seed}, "overrides": over,
                "final": {"eval/rewards/accuracies": 0.5},
                "eval": {"true_reward/policy": value, "true_reward/reference": 0.4}}))
        ret = JobReturn(overrides=over, status=status,
                        hydra_cfg=OmegaConf.create({"hydra": {"runtime": {"output_dir": str(tmp_path / name)}}}))
        ret.return_value = value
        return ret

    studies = {"dpo": [job("0", "dpo", 0.05, 0.3), job("1", "dpo", 0.2, 0.5), job("2", "dpo", 0.9, None)],
               "simpo": [job("3", "simpo", 3.0, 0.4)]}
    winners = {p: pick(rets, "maximize") for p, rets in studies.items()}
    assert winners["dpo"] is studies["dpo"][1] and pick(studies["dpo"], "minimize") is studies["dpo"][0]
    confirm = {p: [job(f"confirm/{p}-seed{k}", p, b, v, seed=k) for k, v in ((1, v1), (2, v2))]
               for p, b, v1, v2 in (("dpo", 0.2, 0.45, 0.55), ("simpo", 3.0, 0.3, 0.5))}
    plan = {p: {"space": [], "keys": ["prior.beta"], "defaults": {"prior.beta": d}} for p, d in (("dpo", 0.1), ("simpo", 2.0))}
    best.write(tmp_path, "task/true_reward", "maximize", studies, winners, confirm, ["trainer.max_steps=5"], plan)
    out = json.loads((tmp_path / "tune_best.json").read_text())["priors"]
    assert out["dpo"]["best"] == {"prior.beta": 0.2} and out["dpo"]["value"] == 0.5 and out["dpo"]["job"] == "1"
    assert (out["dpo"]["trials"], out["dpo"]["finished"]) == (3, 2) and out["dpo"]["confirm"]["mean"] == 0.5
    assert out["simpo"]["best"] == {"prior.beta": 3.0} and out["simpo"]["confirm"]["values"] == [0.3, 0.5]
    md = (tmp_path / "tune_best.md").read_text()
    assert "| dpo prior.beta=0.2 | 2/2 | 0.500±0.071 |" in md and "confirm seeds 1, 2" in md
    assert f"prior=simpo prior.beta=3.0 seed=0,1,2,3,4 trainer.max_steps=5 hydra.sweep.dir={tmp_path}/rerun/simpo" in md
    assert "rerun with more seeds" in capsys.readouterr().out


@pytest.mark.slow
def test_tune_writes_best_beta_per_prior_and_the_comparison(tmp_path, fast):
    """A relative sweep directory, as the preset's default multirun/tune/<date>/<time> is (the jobs' directories
    are absolute: the summary once failed on the mix)."""
    d = tmp_path / "tune"
    r = sweep(["+experiment=tune", *fast, "prior=dpo,simpo", "trainer.max_steps=2", "hydra.sweeper.n_trials=2",
               "hydra.sweeper.confirm_seeds=[1]"], "tune", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    best = json.loads((d / "tune_best.json").read_text())
    assert best["objective"] == "task/true_reward" and best["direction"] == "maximize"
    for p, lo, hi in (("dpo", 0.01, 1.0), ("simpo", 0.2, 20.0)):                    # each around its own beta
        e = best["priors"][p]
        assert e["trials"] == 2 and e["finished"] == 2 and lo <= e["best"]["prior.beta"] <= hi
        trial = json.loads((d / e["job"] / "results.json").read_text())
        assert trial["prior"] == p and trial["eval"]["true_reward/policy"] == e["value"]
    md = (d / "tune_best.md").read_text()
    assert "Best setting per prior" in md and "Priors each at its best setting" in md and "seed=0,1,2,3,4" in md
    for p in ("dpo", "simpo"):                                            # each at its best beta, seed 1
        (job,) = best["priors"][p]["confirm"]["jobs"]
        assert json.loads((d / job / "results.json").read_text())["seed"] == 1
    assert len(pd.read_csv(d / "sweep_table.csv")) == 6 and "tune_best.md" in r.stdout


def test_joblib_two_job_sweep_ends_ok(tmp_path, fast, basic):
    """The issue's check: a 2-job sweep through the joblib launcher ends rc 0, one ok row per job, and the same
    per-run results as the basic launcher."""
    d = tmp_path / "sweep"
    r = sweep([*fast, *SMALL, "hydra/launcher=parallel", "hydra.launcher.n_jobs=2"], d)
    assert r.returncode == 0, r.stderr[-3000:]
    assert list(pd.read_csv(d / "sweep_table.csv")["status"]) == ["ok", "ok"] and same_finals(finals(d), basic)


def test_rerun_of_a_sweep_reruns_only_the_deleted_job(tmp_path, fast, capsys):
    """trainer.resume=auto (the default): the same sweep again reuses finished jobs and reruns a deleted one."""
    import shutil
    d = tmp_path / "sweep"
    args = ["train", "--multirun", *fast, *SMALL, f"hydra.sweep.dir={d}"]
    main(args)
    kept = (d / "0" / "results.json").read_text()
    shutil.rmtree(d / "1")
    capsys.readouterr()
    main(args)
    out = capsys.readouterr().out
    assert (d / "0" / "results.json").read_text() == kept and (d / "0" / "reused.json").exists()
    assert (d / "1" / "results.json").exists() and not (d / "1" / "reused.json").exists()
    table = pd.read_csv(d / "sweep_table.csv")
    assert list(table["status"]) == ["ok", "ok"] and list(table["reused"]) == [True, False]
    assert "reused" in out


def test_launcher_that_raises_still_leaves_the_sweep_table(tmp_path, fast, monkeypatch, capsys):
    """A launcher that raises before every job returned (a killed joblib worker, a submitit job that died) skips
    Hydra's on_multirun_end: midpo writes the table anyway, the jobs that never returned as rows, and exits 1."""
    from hydra.core.plugins import Plugins
    BasicLauncher = Plugins.instance().class_name_to_class[            # the class Hydra's plugin scan loaded
        "hydra._internal.core_plugins.basic_launcher.BasicLauncher"]
    original = BasicLauncher.launch

    def dies_after_the_first_job(self, job_overrides, initial_job_idx):
        original(self, job_overrides[:1], initial_job_idx)
        raise RuntimeError("a worker process was terminated")

    monkeypatch.setattr(BasicLauncher, "launch", dies_after_the_first_job)
    d = tmp_path / "sweep"
    with pytest.raises(SystemExit) as e:
        main(["train", "--multirun", *fast, *SMALL, f"hydra.sweep.dir={d}"])
    assert e.value.code == 1
    table = pd.read_csv(d / "sweep_table.csv")
    assert list(table["status"]) == ["ok", "not started"]
    assert "the sweep stopped before its end" in capsys.readouterr().err


def test_slurm_without_slurm_is_one_line(capsys, monkeypatch):
    """hydra/launcher=slurm on a machine without sbatch: one line saying where to run it and what works here
    (it was submitit's traceback, 'Could not detect srun'); --cfg still shows the config."""
    import shutil

    from midpo_cli.__main__ import main
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(SystemExit) as e:
        main(["train", "--multirun", "hydra/launcher=slurm", "seed=0,1"])
    err = capsys.readouterr().err
    assert e.value.code == 1 and "sbatch" in err and "hydra/launcher=local" in err and "Traceback" not in err
    main(["train", "--cfg", "hydra", "hydra/launcher=slurm"])
    assert "SlurmLauncher" in capsys.readouterr().out
