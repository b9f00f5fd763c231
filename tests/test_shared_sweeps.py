"""Sweep directories that several sweeps share (issue 16): two sweeps started together into one directory never
corrupt each other (the second is refused before it writes, or both run all their jobs), jobs of different sweeps
never share a job directory, each sweep keeps its own record, and exit codes tell the truth."""
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
from omegaconf import OmegaConf

from midpo_cli.__main__ import main
from midpo_cli.engine import rundir
from midpo_cli.report import sweep_callback

DATA = Path(__file__).parent / "data" / "standard.jsonl"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
TINY = ["trainer.max_steps=2", "trainer.batch_size=4", "trainer.eval_every=0", "trainer.save_model=false"]


def local(tmp_path) -> list[str]:
    data = tmp_path / "prefs.jsonl"
    if not data.exists():
        data.write_text(DATA.read_text())
    return ["dataset=local", f"dataset.path={data}", *TINY, f"cache_dir={tmp_path / 'cache'}"]


def start(args, sweep_dir) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "midpo_cli", "train", "--multirun", *args,
                             f"hydra.sweep.dir={sweep_dir}"], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def jobs_by_prior(sweep_dir: Path) -> dict[str, list[dict]]:
    """{prior: [the job.json of each directory holding it]}"""
    out = {}
    for job in sorted(sweep_dir.glob("*/job.json")):
        j = json.loads(job.read_text())
        prior = next(o.split("=")[1] for o in j["overrides"] if o.startswith("prior="))
        out.setdefault(prior, []).append({**j, "dir": job.parent.name})
    return out


def test_two_sweeps_started_together_into_one_directory(tmp_path):
    """Each sweep either runs all its jobs (exit 0, every job `ok` with its own overrides) or is refused before
    writing anything (exit 1, one line); never half of each, never another sweep's job.json."""
    d = tmp_path / "sweep"
    args = local(tmp_path)
    procs = {"a": start([*args, "prior=dpo,simpo"], d), "b": start([*args, "prior=tdpo,hdpo"], d)}
    outs = {k: p.communicate(timeout=900) for k, p in procs.items()}
    codes = {k: p.returncode for k, p in procs.items()}
    assert sorted(codes.values()) in ([0, 0], [0, 1]), {k: o[1][-3000:] for k, o in outs.items()}
    priors = {"a": ("dpo", "simpo"), "b": ("tdpo", "hdpo")}
    found = jobs_by_prior(d)
    table = pd.read_csv(d / "sweep_table.csv")
    for k, (out, err) in outs.items():
        if codes[k] == 1:                                                  # refused: nothing of it anywhere
            assert "in use by another running sweep" in err and "nothing was written" in err
            assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
            assert not any(p in found for p in priors[k])
            assert not list((d / ".sweeps").glob(f"*-{procs[k].pid}.yaml"))
        else:
            assert all(len(found[p]) == 1 for p in priors[k]), found
            for p in priors[k]:
                (job,) = found[p]
                res = json.loads((d / job["dir"] / "results.json").read_text())
                assert res["prior"] == p and job["starts"] == 1
            rows = table[table["prior"].isin(priors[k])]
            assert list(rows["status"]) == ["ok", "ok"]
            assert f"{len(priors[k])} jobs" in out and "did not finish" not in err
    if 1 in codes.values():                                                # multirun.yaml: the winner's alone
        winner = next(k for k, c in codes.items() if c == 0)
        assert f"prior={','.join(priors[winner])}" in OmegaConf.load(d / "multirun.yaml").hydra.overrides.task


def test_a_later_sweep_with_other_jobs_takes_fresh_slots_and_touches_nothing(tmp_path, capsys):
    d = tmp_path / "sweep"
    args = ["train", "--multirun", *local(tmp_path), f"hydra.sweep.dir={d}"]
    main([*args, "prior=dpo,simpo"])
    first = {p: (d / j[0]["dir"] / "results.json").read_bytes() for p, j in jobs_by_prior(d).items()}
    capsys.readouterr()
    main([*args, "prior=tdpo,dpo"])                                        # dpo: the same job, reused where it is
    out = capsys.readouterr().out
    found = jobs_by_prior(d)
    assert {p: len(j) for p, j in found.items()} == {"dpo": 1, "simpo": 1, "tdpo": 1}
    assert {p: (d / found[p][0]["dir"] / "results.json").read_bytes() for p in first} == first
    assert found["tdpo"][0]["dir"] == "0-1" and found["dpo"][0]["dir"] == "0"
    table = pd.read_csv(d / "sweep_table.csv")
    assert sorted(table["prior"]) == ["dpo", "simpo", "tdpo"] and set(table["status"]) == {"ok"}
    assert "2 jobs" in out and "1 job(s) of earlier sweeps" in out and "reused" in out
    records = sorted((d / ".sweeps").glob("*.yaml"))                        # each sweep's own record
    assert len(records) == 2
    assert [OmegaConf.load(r).hydra.overrides.task[-1] for r in records] == ["prior=dpo,simpo", "prior=tdpo,dpo"]


def test_a_sweep_rerun_after_the_data_changed_refuses_each_job_and_says_so(tmp_path, capsys):
    d = tmp_path / "sweep"
    args = ["train", "--multirun", *local(tmp_path), "prior=dpo,simpo", f"hydra.sweep.dir={d}"]
    main(args)
    text = (tmp_path / "prefs.jsonl").read_text()
    (tmp_path / "prefs.jsonl").write_text(text.replace("a", "o", 1))
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(args)
    err = capsys.readouterr().err
    assert e.value.code == 1 and "2 of 2 jobs did not finish (2 failed" in err
    table = pd.read_csv(d / "sweep_table.csv", keep_default_na=False)
    assert list(table["status"]) == ["failed", "failed"] and not table["reused"].any()
    assert all("prefs.jsonl" in e and "other inputs" in e for e in table["error"])
    main([*args, "trainer.resume=restart"])                                 # start over; the old runs kept
    table = pd.read_csv(d / "sweep_table.csv", keep_default_na=False)
    assert list(table["status"]) == ["ok", "ok"] and len(list(d.glob("*/replaced/*/results.json"))) == 2


def test_a_sweep_slot_holding_someone_elses_folder_is_passed_over(tmp_path):
    d = tmp_path / "sweep"
    args = ["train", "--multirun", *local(tmp_path), f"hydra.sweep.dir={d}"]
    main([*args, "prior=simpo"])
    (d / "1").mkdir()
    (d / "1" / "notes.txt").write_text("mine")                              # a folder dropped into the sweep
    main([*args, "prior=dpo,tdpo"])
    assert sorted(p.name for p in (d / "1").iterdir()) == ["notes.txt"]
    assert [json.loads((d / s / "results.json").read_text())["prior"] for s in ("0", "0-1", "1-1")] == \
        ["simpo", "dpo", "tdpo"]


@pytest.mark.parametrize("contents", [["notes.txt"], ["0/notes.txt"]])
def test_a_sweep_directory_that_is_someone_elses_folder_is_refused_untouched(tmp_path, capsys, contents):
    d = tmp_path / "theirs"
    for name in contents:
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        (d / name).write_text("mine")
    before = sorted(str(p.relative_to(d)) for p in d.rglob("*"))
    with pytest.raises(SystemExit) as e:
        main(["train", "--multirun", *local(tmp_path), "prior=dpo", f"hydra.sweep.dir={d}"])
    err = capsys.readouterr().err
    assert e.value.code == 1 and "not a midpo sweep directory" in err and "Traceback" not in err
    assert sorted(str(p.relative_to(d)) for p in d.rglob("*")) == before


def test_default_sweep_directory_taken_in_the_same_second_moves_on(tmp_path):
    """Hydra's time-stamped sweep directory already used by another sweep: this one moves to `<name>-1`, and the
    jobs composed from the config follow (hydra.overrides.hydra)."""
    taken = tmp_path / "multirun" / "12-00-00"
    (taken / "0").mkdir(parents=True)
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(taken)}, "overrides": {"hydra": [], "task": []}}})
    try:
        got = sweep_callback.claim_sweep_dir(config)
    finally:
        sweep_callback.release_sweep_dir()
    assert got == taken.with_name("12-00-00-1") and config.hydra.sweep.dir == str(got)
    assert config.hydra.overrides.hydra == [f"hydra.sweep.dir={got}"]
    assert sorted(p.name for p in taken.iterdir()) == ["0"]                 # the other sweep's, untouched


def test_a_sweep_job_waits_for_a_running_job_of_its_config_then_reuses_it(tmp_path):
    """Jobs claim by config: a job whose config already runs in the directory (e.g. the same sweep started again
    after its launcher died) waits for it instead of training it twice, then finds it finished."""
    d = tmp_path / "sweep"
    held = rundir.claim(d / "0", "cfg-a", "auto", "sweep")
    (d / "0" / "results.json").write_text("{}")

    def finish():
        time.sleep(1.0)
        held.release()
    threading.Thread(target=finish).start()
    t0 = time.time()
    got = rundir.claim(d / "3", "cfg-a", "auto", "sweep")                  # another job number, same config
    got.release()
    assert got.path == d / "0" and got.state == "finished" and time.time() - t0 >= 0.9
    other = rundir.claim(d / "0", "cfg-b", "auto", "sweep")                 # another config: a fresh slot
    other.release()
    assert other.path == d / "0-1" and other.state == "new"


def test_two_sweeps_starting_in_one_second_keep_both_records(tmp_path):
    """Two sweeps of one process started within the same second each keep their own `.sweeps` record (the
    second used to overwrite the first: same time stamp, same pid)."""
    from midpo_cli.report.sweep_callback import _new_record

    first, second = _new_record(tmp_path, "2026-12-03_12-16-49-3548"), _new_record(tmp_path, "2026-12-03_12-16-49-3548")
    assert first != second and sorted(p.name for p in tmp_path.iterdir()) == [
        "2026-12-03_12-16-49-3548-1.yaml", "2026-12-03_12-16-49-3548.yaml"]
