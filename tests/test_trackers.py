"""Trackers against the real libraries: TensorBoard's event files, an MLflow file store and a real `mlflow server`
(sqlite backend, started and stopped here), W&B offline run files and trackio's local database, each read back:
the flat config, the per-step metrics, the sample and final tables, the result files and the run directory's path.
Then a sweep grouped under one MLflow parent run, a stopped and resumed run that stays one tracker run, and the
failures: not installed, no server, a backend that breaks mid-run."""
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import FAST, fails
from midpo_cli.__main__ import main
from midpo_cli.engine import trackers
from midpo_cli.recipe import Recipe

SMALL = ["trainer.max_steps=3", "trainer.eval_every=2", "trainer.save_model=false", "trainer.sample_table=2"]
COLUMNS = ["prompt", "policy", "reward_policy", "reference", "reward_reference"]


class Broken(trackers.Backend):
    """A backend that starts and then fails at its first log call: the run warns once and goes on."""
    module = "json"

    def start(self, config):
        return {}

    def scalars(self, values, step):
        raise RuntimeError("connection lost")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server_process(tmp_path_factory):
    """A real MLflow tracking server on 127.0.0.1 with a sqlite backend store, started (it takes a while to answer:
    the first run of this module trains meanwhile) and stopped at the end of the module."""
    if importlib.util.find_spec("mlflow") is None:
        pytest.skip("mlflow is not installed: pip install 'midpo[mlflow-server]'")
    root, port = tmp_path_factory.mktemp("mlflow-server"), free_port()
    log = (root / "server.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                             "--workers", "1", "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
                             "--artifacts-destination", str(root / "artifacts")], stdout=log, stderr=log,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    yield proc, f"http://127.0.0.1:{port}", root / "server.log"
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


@pytest.fixture(scope="module")
def server(server_process):
    """The server's URI once it answers (at most 120 s)."""
    import urllib.request
    proc, uri, log = server_process
    deadline = time.time() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2):
                return uri
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail(f"mlflow server did not start: {log.read_text()[-2000:]}")
            time.sleep(0.3)


@pytest.fixture(scope="module")
def tracked(tmp_path_factory, cache_dir, server_process):
    """One run with every tracker (and a broken one), MLflow on a plain file store, W&B offline (the MLflow
    server of the later tests starts meanwhile)."""
    for module in ("tensorboard", "mlflow", "wandb", "trackio"):             # not imported: trackio reads its
        if importlib.util.find_spec(module) is None:                         # TRACKIO_DIR when imported
            pytest.skip(f"{module} is not installed: pip install 'midpo[{module}]'")
    root = tmp_path_factory.mktemp("tracked")
    with pytest.MonkeyPatch.context() as mp:
        for key, value in {"WANDB_MODE": "offline", "WANDB_DIR": str(root), "WANDB_SILENT": "true",
                           "TRACKIO_DIR": str(root / "trackio"), "MLFLOW_ALLOW_FILE_STORE": "true"}.items():
            mp.setenv(key, value)
        mp.setitem(trackers.BACKENDS, "broken", Broken)
        main(["train", *FAST, f"cache_dir={cache_dir}", *SMALL, "prior=learned_tilt",
              "trainer.trackers=[tensorboard,mlflow,wandb,trackio,broken]",
              f"trainer.tracking_uri=file:{root}/mlruns", f"hydra.run.dir={root}/run"])
    return root, root / "run"


def test_tensorboard_events(tracked):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    _, run = tracked
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"tensors": 0, "scalars": 0}).Reload()
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3]
    assert [e.step for e in events.Scalars("prior/phi_len")] == [1, 2, 3]       # the learnable prior's parameters
    text = {tag: [(e.step, e.tensor_proto.string_val[0].decode()) for e in events.Tensors(tag)]
            for tag in events.Tags()["tensors"]}
    assert "| prior.name | learned_tilt |" in text["config/text_summary"][0][1]
    assert text["run_dir/text_summary"][0][1] == str(run.resolve())
    assert [s for s, _ in text["samples/text_summary"]] == [2, 3]
    assert "| " + " | ".join(COLUMNS) + " |" in text["samples/text_summary"][0][1]
    assert "| eval/rewards/accuracies |" in text["final/text_summary"][0][1]
    assert '"prior": "learned_tilt"' in text["results.json/text_summary"][0][1]


def test_mlflow_file_store(tracked):
    from mlflow.tracking import MlflowClient
    root, run = tracked
    client = MlflowClient(tracking_uri=f"file:{root}/mlruns")
    (found,) = client.search_runs([client.get_experiment_by_name("midpo").experiment_id])
    assert found.info.run_id == json.loads((run / "trackers.json").read_text())["mlflow"]["run_id"]
    assert found.info.status == "FINISHED"
    assert found.data.params["prior.name"] == "learned_tilt" and found.data.params["trainer.max_steps"] == "3"
    assert found.data.tags["midpo.run_dir"] == str(run.resolve())
    assert [m.step for m in client.get_metric_history(found.info.run_id, "loss")] == [1, 2, 3]
    assert "prior/phi_len" in found.data.metrics and "eval/loss" in found.data.metrics
    names = {a.path for a in client.list_artifacts(found.info.run_id)}
    assert {"results.json", "prior.safetensors", "prior.json", "samples", "final"} <= names
    samples = json.loads(Path(client.download_artifacts(found.info.run_id, "samples/step-000002.json",
                                                        str(root))).read_text())
    assert samples["columns"] == COLUMNS and len(samples["data"]) == 2


def wandb_records(path: Path) -> list:
    """The records of a W&B run file (.wandb): a 7-byte header, then 32 KiB blocks of chunks, each a 4-byte
    checksum, a 2-byte length, a 1-byte kind (1 whole, 2 first, 3 middle, 4 last) and its bytes."""
    from wandb.proto import wandb_internal_pb2 as pb
    data, pos, buf, out = path.read_bytes(), 7, b"", []
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:
            pos += left
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        if kind == 0:
            break
        buf += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            out.append(record)
            buf = b""
    return out


def wandb_runs(root: Path, run_id: str) -> list[Path]:
    """The offline session folders of W&B run `run_id`: offline-run-<time>-<id>, with -<n> when the name was taken."""
    return sorted(p for p in root.glob("wandb/offline-run-*") if p.name.split("-")[3] == run_id)


def test_wandb_offline_run_files(tracked):
    root, run = tracked
    run_id = json.loads((run / "trackers.json").read_text())["wandb"]["id"]
    (folder,) = wandb_runs(root, run_id)
    records = wandb_records(folder / f"run-{run_id}.wandb")
    (meta,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    config = {i.key: json.loads(i.value_json) for i in meta.config.update}
    assert config["prior.name"] == "learned_tilt" and config["run_dir"] == str(run.resolve())
    steps = [{i.key or "/".join(i.nested_key): i.value_json for i in r.history.item} for r in records
             if r.WhichOneof("record_type") == "history"]
    assert [int(h["_step"]) for h in steps if "loss" in h] == [1, 2, 3]
    files = {f.path for r in records if r.WhichOneof("record_type") == "files" for f in r.files.files}
    assert "results.json" in files and "prior.json" in files
    samples = [f for f in files if f.startswith("media/table/samples_")]
    assert len(samples) == 2 and any(f.startswith("media/table/final_") for f in files)
    table = json.loads((folder / "files" / samples[0]).read_text())
    assert table["columns"] == COLUMNS and len(table["data"]) == 2


def test_trackio_database(tracked):
    import sqlite3
    root, run = tracked
    name = json.loads((run / "trackers.json").read_text())["trackio"]["name"]
    db = sqlite3.connect(root / "trackio" / "midpo.db")
    (config,) = [json.loads(c) for (c,) in db.execute("select config from configs where run_name = ?", (name,))]
    assert config["prior.name"] == "learned_tilt" and config["run_dir"] == str(run.resolve())
    rows = [(s, json.loads(m)) for s, m in db.execute("select step, metrics from metrics where run_name = ?", (name,))]
    assert sorted(s for s, m in rows if "loss" in m) == [1, 2, 3]
    assert sorted(s for s, m in rows if "samples" in m) == [2, 3]


def test_a_tracker_failing_mid_run_warns_once_and_training_goes_on(tracked):
    _, run = tracked
    log = (run / "train.log").read_text()
    assert log.count("tracker broken failed (RuntimeError: connection lost)") == 1
    assert (run / "results.json").exists()


@pytest.mark.slow
def test_sweep_jobs_are_grouped(tmp_path, fast, server, monkeypatch):
    """One MLflow parent with a child per job, one W&B group named after the sweep, a TensorBoard folder per job."""
    import wandb
    from mlflow.tracking import MlflowClient
    sweep = tmp_path / "sweep-a"
    for key, value in {"MLFLOW_EXPERIMENT_NAME": "sweeps", "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path),
                       "WANDB_SILENT": "true"}.items():
        monkeypatch.setenv(key, value)
    wandb.teardown()                                                       # W&B reads WANDB_DIR once per process
    main(["train", "--multirun", *fast, *SMALL, "trainer.max_steps=2", "prior=dpo,simpo",
          "trainer.trackers=[mlflow,wandb,tensorboard]", f"trainer.tracking_uri={server}", f"hydra.sweep.dir={sweep}"])
    for job in (0, 1):
        assert list((sweep / str(job) / "tensorboard").glob("events.out.tfevents.*"))
        run_id = json.loads((sweep / str(job) / "trackers.json").read_text())["wandb"]["id"]
        (folder,) = wandb_runs(tmp_path, run_id)
        (meta,) = [r.run for r in wandb_records(folder / f"run-{run_id}.wandb") if r.WhichOneof("record_type") == "run"]
        assert meta.run_group == "sweep-a"
    client = MlflowClient(tracking_uri=server)
    runs = client.search_runs([client.get_experiment_by_name("sweeps").experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = sorted((r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id),
                      key=lambda r: r.data.params["prior.name"])
    assert parent.info.run_name == "sweep-a" and parent.info.status == "FINISHED" and len(runs) == 3
    assert [c.data.params["prior.name"] for c in children] == ["dpo", "simpo"]
    for job, child in enumerate(children):
        assert child.data.tags["midpo.run_dir"] == str((sweep / str(job)).resolve())
        assert child.info.run_name == f"sweep-a/{job}: {['dpo', 'simpo'][job]} seed=0"
        assert [m.step for m in client.get_metric_history(child.info.run_id, "loss")] == [1, 2]
        assert {"results.json", "samples", "final"} <= {a.path for a in client.list_artifacts(child.info.run_id)}


@pytest.mark.slow
def test_a_stopped_and_resumed_run_is_one_tracker_run(tmp_path, fast, server, monkeypatch):
    """SIGTERM's stop after step 2's checkpoint, then the same command: one MLflow run, one W&B run id."""
    import wandb
    from mlflow.tracking import MlflowClient
    for key, value in {"MLFLOW_EXPERIMENT_NAME": "resume", "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path),
                       "WANDB_SILENT": "true"}.items():
        monkeypatch.setenv(key, value)
    wandb.teardown()
    real = Recipe.step

    def stopped_at_2(self, step, signals):
        m, stopping = real(self, step, signals)
        if step == 2:
            signals.got = signal.SIGTERM                                   # as the handler records a SIGTERM
            return m, True
        return m, stopping

    args = ["train", *fast, *SMALL, "trainer.trackers=[mlflow,wandb]", f"trainer.tracking_uri={server}",
            f"hydra.run.dir={tmp_path}/run"]
    with monkeypatch.context() as mp:
        mp.setattr(Recipe, "step", stopped_at_2)
        with pytest.raises(SystemExit) as e:
            main(args)
    assert e.value.code == 128 + signal.SIGTERM and not (tmp_path / "run" / "results.json").exists()
    kept = json.loads((tmp_path / "run" / "trackers.json").read_text())
    client = MlflowClient(tracking_uri=server)
    assert client.get_run(kept["mlflow"]["run_id"]).info.status == "KILLED"
    main(args)
    assert json.loads((tmp_path / "run" / "results.json").read_text())["resumed_from"]
    assert json.loads((tmp_path / "run" / "trackers.json").read_text()) == kept
    (one,) = client.search_runs([client.get_experiment_by_name("resume").experiment_id])
    assert one.info.run_id == kept["mlflow"]["run_id"] and one.info.status == "FINISHED"
    assert sorted({m.step for m in client.get_metric_history(one.info.run_id, "loss")}) == [1, 2, 3]
    folders = list(tmp_path.glob("wandb/offline-run-*"))          # offline-run-<time>-<id>[-n]: one per session
    assert folders and {p.name.split("-")[3] for p in folders} == {kept["wandb"]["id"]}


def test_a_tracker_that_is_not_installed_is_one_line_before_anything_loads(capsys, fast, monkeypatch, tmp_path):
    monkeypatch.setattr(trackers.WandB, "module", "wandb_is_not_installed")
    err = fails(capsys, ["train", *fast, "trainer.trackers=[wandb]", f"hydra.run.dir={tmp_path}/a"])
    assert "trainer.trackers: wandb is not installed: pip install 'midpo[wandb]'" in err
    err = fails(capsys, ["train", *fast, "trainer.trackers=[mlfow]", f"hydra.run.dir={tmp_path}/b"])
    assert "'mlfow' is not a tracker. Did you mean 'mlflow'?" in err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_an_mlflow_server_that_does_not_answer_is_one_line_naming_its_uri(capsys, fast, tmp_path):
    pytest.importorskip("mlflow", reason="pip install 'midpo[mlflow]'")
    uri = f"http://127.0.0.1:{free_port()}"
    err = fails(capsys, ["train", *fast, "trainer.trackers=[mlflow]", f"trainer.tracking_uri={uri}",
                         f"hydra.run.dir={tmp_path}/run"])
    assert f"the MLflow server at {uri} does not answer" in err
    assert not (tmp_path / "run").exists()


def test_wandb_without_an_account_is_one_line_naming_offline_mode(fast, tmp_path):
    """No API key and WANDB_MODE unset (a machine that never ran `wandb login`): W&B refuses to start; the run
    stops in one line before its first step, naming WANDB_MODE=offline. A process of its own: W&B keeps its
    settings per process, and this file's other runs set it offline."""
    pytest.importorskip("wandb", reason="pip install 'midpo[wandb]'")
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(tmp_path / "home"), WANDB_CONFIG_DIR=str(tmp_path / "wandb-config"), OMP_NUM_THREADS="1",
               PYTHONPATH=str(Path(__file__).resolve().parents[1]))   # no ~/.netrc with a key
    run = tmp_path / "run"
    res = subprocess.run([sys.executable, "-m", "midpo_cli", "train", *fast, "trainer.trackers=[wandb]",
                          "trainer.max_steps=2", f"hydra.run.dir={run}"], env=env, capture_output=True, text=True,
                         stdin=subprocess.DEVNULL, timeout=300)
    assert res.returncode == 1, res.stderr[-2000:]
    assert "trainer.trackers: wandb could not start" in res.stderr and "set WANDB_MODE=offline" in res.stderr
    assert "Traceback" not in res.stderr and not (run / "metrics.jsonl").read_text().strip()   # no step ran


def test_processes_opening_a_new_mlflow_store_at_once_all_start(tmp_path):
    """The ranks of one run (and a sweep's parallel jobs) check the same new sqlite store as they start: MLflow
    makes its tables on first open, and two at once collide ("table experiments already exists") unless the
    check takes turns."""
    pytest.importorskip("mlflow", reason="pip install 'midpo[mlflow]'")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    code = "import sys; from midpo_cli.engine import trackers; trackers.check(['mlflow'], sys.argv[1])"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", code, uri], env=env, stderr=subprocess.PIPE, text=True)
             for _ in range(3)]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), [e[-500:] for e in errors]


def test_mlflow_gives_up_on_a_dead_server_in_seconds_unless_told_otherwise(monkeypatch):
    """MLflow retries an HTTP call 7 times with backoff factor 2 by default: a server that died mid-run stalled
    training ~250 s per call before the tracker was dropped (measured). midpo sets 3 retries, factor 1, 30 s
    timeout where the user has not set them, and leaves the user's own settings alone."""
    for name in trackers.MLflow.HTTP:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "300")
    assert trackers.MLflow.resolved("http://127.0.0.1:1") == "http://127.0.0.1:1"
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "3"
    assert os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] == "1"
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "300"
