"""Experiment trackers: where a run's config, metrics, sample tables and result files go besides its directory.

`trainer.trackers=[tensorboard, mlflow, wandb, trackio]`, any combination. Each backend is one class behind the
same five calls (start, scalars, table, artifact, finish); the recipe holds a `Trackers` and never looks at
which backends it holds. What each one writes:

    tensorboard   <run dir>/tensorboard/ (a sweep: one sub-folder per job under the sweep directory); the
                  config, tables and files as text
    mlflow        a run in experiment "midpo" (MLFLOW_EXPERIMENT_NAME) at trainer.tracking_uri, else
                  MLFLOW_TRACKING_URI, else mlflow's default; config as params, tables and files as artifacts;
                  a sweep's jobs are child runs of one parent run named after the sweep directory
    wandb         a run in project "midpo" (WANDB_PROJECT; WANDB_MODE=offline works without a network);
                  a sweep's jobs share the group named after the sweep directory
    trackio       a run in project "midpo" (TRACKIO_PROJECT), local unless trackio is told otherwise; a sweep's
                  jobs share a group as in wandb

Every backend records the run directory's path (a tag, a config key or a text). The ids of a run's tracker runs
are kept in <run dir>/trackers.json: a resumed or requeued run continues the same tracker runs. A sweep's
parent run is made once, by the first job that needs it, under a lock on <sweep dir>/trackers.json (jobs may
run in separate processes). A backend that cannot start is a ValueError before training (missing package:
the extra to install; an MLflow server that does not answer: its URI); one that fails later warns once and
is dropped, and training goes on.
"""
from __future__ import annotations

import contextlib
import difflib
import fcntl
import hashlib
import importlib.util
import logging
import os
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from midpo_cli.engine.files import clean, read_json, write_json

log = logging.getLogger("midpo")
BACKENDS: dict[str, type[Backend]] = {}
KEPT = "trackers.json"                  # in the run directory: the ids of its tracker runs; in a sweep's: the parent's
PROJECT = "midpo"                       # experiment / project name unless the library's own variable says otherwise


def register(name: str):
    """Class decorator: the backend `trainer.trackers` names `name`."""
    def wrap(cls):
        cls.name = name
        BACKENDS[name] = cls
        return cls
    return wrap


@dataclass(frozen=True)
class Where:
    """What a tracker run belongs to: the run directory, its display name, and its sweep (None: a single run)."""
    run_dir: Path
    name: str
    sweep_dir: Path | None = None
    uri: str | None = None              # trainer.tracking_uri (MLflow)

    @property
    def group(self) -> str | None:
        return self.sweep_dir.name if self.sweep_dir else None


def first_line(e: BaseException) -> str:
    return (str(e).splitlines() or [""])[0]


def file_text(path: Path) -> str:
    """A file for a tracker that shows text: its contents in a code block, or a line naming a binary file."""
    try:
        return f"```\n{path.read_text()}\n```"
    except UnicodeDecodeError:
        return f"{path} ({path.stat().st_size:,} bytes, binary)"


def table_text(rows: list[dict]) -> str:
    """Rows as a Markdown table (TensorBoard's text plugin renders it)."""
    if not rows:
        return ""

    def cell(value) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    cols = list(rows[0])
    return "\n".join(["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
                     + ["| " + " | ".join(cell(r.get(c, "")) for c in cols) + " |" for r in rows])


class Backend:
    """One tracker library. `kept`: what `start` returned when this run started before (trackers.json)."""
    name: ClassVar[str] = ""
    module: ClassVar[str] = ""          # the package that must be importable
    extra: ClassVar[str] = ""           # pip install 'midpo[<extra>]'
    advice: ClassVar[str] = ""          # what to try when it cannot start

    def __init__(self, where: Where, kept: dict | None):
        self.where, self.kept = where, kept or {}

    @classmethod
    def check(cls, uri: str | None) -> None:
        """Raise ValueError when this backend cannot start (checked before anything loads)."""

    def start(self, config: dict) -> dict:
        """Open (or reopen) the tracker run and record the flat config; returns what identifies the run."""
        raise NotImplementedError

    def scalars(self, values: dict[str, float], step: int) -> None:
        raise NotImplementedError

    def table(self, name: str, rows: list[dict], step: int) -> None:
        raise NotImplementedError

    def artifact(self, path: Path) -> None:
        raise NotImplementedError

    def finish(self, ok: bool) -> None:
        raise NotImplementedError


@register("tensorboard")
class TensorBoard(Backend):
    module, extra = "tensorboard", "tensorboard"

    def start(self, config: dict) -> dict:
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(log_dir=str(self.where.run_dir / "tensorboard"))   # appends when resumed
        if not self.kept:
            self.writer.add_text("config", table_text([{"key": k, "value": v} for k, v in config.items()]))
            self.writer.add_text("run_dir", str(self.where.run_dir.resolve()))
        return {"log_dir": str(self.where.run_dir / "tensorboard")}

    def scalars(self, values, step):
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def table(self, name, rows, step):
        self.writer.add_text(name, table_text(rows), step)
        self.writer.flush()

    def artifact(self, path):
        self.writer.add_text(path.name, file_text(path))

    def finish(self, ok):
        self.writer.close()


@register("mlflow")
class MLflow(Backend):
    module, extra = "mlflow", "mlflow"

    # MLflow's own HTTP retries (7, backoff factor 2: ~4 minutes) would stall training that long on every call to a
    # server that died; with these a dead server costs seconds, then the tracker is dropped with one warning. Set
    # the variables yourself to wait longer (a hosted server that rate-limits).
    HTTP = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
            "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}

    @classmethod
    def resolved(cls, configured: str | None) -> str | None:
        """The tracking URI (the HTTP settings above applied where unset: every MLflow call goes through here)."""
        for name, value in cls.HTTP.items():
            os.environ.setdefault(name, value)
        return configured or os.environ.get("MLFLOW_TRACKING_URI") or None

    @classmethod
    def check(cls, uri):
        uri = cls.resolved(uri)
        if not uri or not uri.startswith(("http://", "https://")):              # a store on disk: open it once
            from mlflow.tracking import MlflowClient
            key = hashlib.sha1(os.path.abspath(uri or "mlflow.db").encode()).hexdigest()[:16]
            try:                      # a new store's tables are made on first open: one process at a time (the
                with _locked(Path(tempfile.gettempdir()) / f"midpo-mlflow-{key}"):   # ranks, a sweep's jobs)
                    MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
            except Exception as e:
                raise ValueError(f"trainer.trackers: the MLflow tracking store {uri or '(mlflow default)'} cannot "
                                 f"be opened: {type(e).__name__}: {first_line(e)}") from None
            return
        import urllib.request
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5):
                pass
        except OSError as e:
            raise ValueError(f"trainer.trackers: the MLflow server at {uri} does not answer ({e}); start it "
                             "(mlflow server ...) or set trainer.tracking_uri / MLFLOW_TRACKING_URI to one that "
                             "does") from None

    def start(self, config):
        from mlflow.tracking import MlflowClient
        uri = self.resolved(self.where.uri)
        self.client = client = MlflowClient(tracking_uri=uri)
        run_id = self.kept.get("run_id")
        if run_id and self._exists(run_id):
            client.update_run(run_id, status="RUNNING")
            self.run_id = run_id
            return self.kept
        experiment = self._experiment()
        tags = {"midpo.run_dir": str(self.where.run_dir.resolve())}
        if self.where.sweep_dir is not None:
            tags["mlflow.parentRunId"] = shared_parent(self.where.sweep_dir, "mlflow", lambda: {
                "run_id": client.create_run(experiment, run_name=self.where.group, tags={
                    "midpo.sweep_dir": str(self.where.sweep_dir.resolve())}).info.run_id, "uri": uri})["run_id"]
        self.run_id = client.create_run(experiment, run_name=self.where.name, tags=tags).info.run_id
        from mlflow.entities import Param
        params = [Param(k, str(v)[:6000]) for k, v in config.items()]
        for i in range(0, len(params), 100):                             # log_batch takes 100 params at a time
            client.log_batch(self.run_id, params=params[i:i + 100])
        return {"run_id": self.run_id, "uri": uri}

    def _exists(self, run_id: str) -> bool:
        try:
            self.client.get_run(run_id)
        except Exception:                                                 # deleted, or another store
            log.warning("mlflow: run %s kept in %s is not in this tracking store; starting a new one", run_id,
                        self.where.run_dir / KEPT)
            return False
        return True

    def _experiment(self) -> str:
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", PROJECT)
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        try:
            return self.client.create_experiment(name)
        except Exception:                                                 # another job made it first
            return self.client.get_experiment_by_name(name).experiment_id

    def scalars(self, values, step):
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in values.items()])

    def table(self, name, rows, step):
        data = {c: [r.get(c) for r in rows] for c in rows[0]} if rows else {}
        self.client.log_table(self.run_id, data, f"{name}/step-{step:06d}.json")

    def artifact(self, path):
        self.client.log_artifact(self.run_id, str(path))

    def finish(self, ok):
        self.client.set_terminated(self.run_id, "FINISHED" if ok else "KILLED")


@register("wandb")
class WandB(Backend):
    module, extra = "wandb", "wandb"
    advice = "without a W&B account or network, set WANDB_MODE=offline (wandb sync uploads the run later)"

    def start(self, config):
        import wandb
        run_id = self.kept.get("id") or uuid.uuid4().hex[:12]
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", PROJECT), name=self.where.name, id=run_id,
                              resume="allow", group=self.where.group, reinit="create_new",
                              config={**config, "run_dir": str(self.where.run_dir.resolve())},
                              settings=wandb.Settings(console="off", silent=True))
        return {"id": run_id}

    def scalars(self, values, step):
        self.run.log(values, step=step)

    def table(self, name, rows, step):
        import wandb
        cols = list(rows[0]) if rows else []
        self.run.log({name: wandb.Table(columns=cols, data=[[r.get(c) for c in cols] for r in rows])}, step=step)

    def artifact(self, path):
        self.run.save(str(path), base_path=str(path.parent), policy="now")

    def finish(self, ok):
        self.run.finish(exit_code=0 if ok else 1)


@register("trackio")
class Trackio(Backend):
    module, extra = "trackio", "trackio"

    def start(self, config):
        import trackio
        self.lib = trackio
        name = self.kept.get("name") or f"{self.where.name} ({uuid.uuid4().hex[:6]})"   # trackio resumes by name
        self.run = trackio.init(project=os.environ.get("TRACKIO_PROJECT", PROJECT), name=name,
                                group=self.where.group, resume="allow",
                                config={**config, "run_dir": str(self.where.run_dir.resolve())})
        return {"name": name}

    def scalars(self, values, step):
        self.run.log(values, step=step)

    def table(self, name, rows, step):
        import pandas as pd
        self.run.log({name: self.lib.Table(dataframe=pd.DataFrame(rows))}, step=step)

    def artifact(self, path):
        self.run.log({path.name: self.lib.Markdown(file_text(path))})

    def finish(self, ok):
        self.run.finish()


def check(names: list[str], uri: str | None = None) -> None:
    """Each name a known backend, its package installed, its server answering: else one ValueError."""
    for name in names:
        if name not in BACKENDS:
            close = difflib.get_close_matches(str(name), BACKENDS, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ValueError(f"trainer.trackers: '{name}' is not a tracker.{hint} Trackers: {', '.join(BACKENDS)}")
        cls = BACKENDS[name]
        if importlib.util.find_spec(cls.module) is None:
            raise ValueError(f"trainer.trackers: {name} is not installed: pip install 'midpo[{cls.extra}]'")
        cls.check(uri)
    if len(set(names)) < len(names):
        raise ValueError(f"trainer.trackers={list(names)} names a tracker twice")


@contextlib.contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.with_name(f".{path.name}.lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def shared_parent(sweep_dir: Path, backend: str, make) -> dict:
    """The sweep's parent run for `backend`, made once by `make()` (the first job to ask) and kept in
    <sweep dir>/trackers.json; every job of the sweep, in any process, reads the same one."""
    path = sweep_dir / KEPT
    with _locked(path):
        kept = read_json(path) or {}
        if backend not in kept:
            kept[backend] = make()
            write_json(path, kept)
    return kept[backend]


class Trackers:
    """The backends of one run (main process only; an empty set elsewhere and without trainer.trackers)."""

    def __init__(self, names: list[str], where: Where | None):
        self.where, self.names, self.live = where, list(names), {}

    def start(self, config: dict) -> None:
        """Open every backend (the same tracker runs as before when the run directory kept their ids) and keep
        their ids; a backend that cannot start is one ValueError, before training."""
        if not self.names:
            return
        path = self.where.run_dir / KEPT
        kept = read_json(path) or {}
        for name in self.names:
            backend = BACKENDS[name](self.where, kept.get(name))
            try:
                kept[name] = backend.start(clean(config))
            except Exception as e:
                self.finish(ok=False)
                advice = f"; {backend.advice}" if backend.advice else ""
                raise ValueError(f"trainer.trackers: {name} could not start: {type(e).__name__}: "
                                 f"{first_line(e).rstrip('.')}{advice}") from None
            self.live[name] = backend
            write_json(path, kept)

    def _each(self, what: str, *args) -> None:
        for name, backend in list(self.live.items()):
            try:
                getattr(backend, what)(*args)
            except Exception as e:
                del self.live[name]
                log.warning("tracker %s failed (%s: %s); training goes on without it (metrics.jsonl and results.json "
                            "have everything)", name, type(e).__name__, first_line(e))

    def scalars(self, values: dict, step: int) -> None:
        values = {k: float(v) for k, v in clean(values).items() if isinstance(v, (int, float)) and v is not None}
        if values:
            self._each("scalars", values, step)

    def table(self, name: str, rows: list[dict], step: int) -> None:
        if rows:
            self._each("table", name, rows, step)

    def artifact(self, path: Path) -> None:
        if path.is_file():
            self._each("artifact", path)

    def finish(self, ok: bool) -> None:
        self._each("finish", ok)
        self.live = {}


def final_rows(results: dict) -> list[dict]:
    """The run's final table: every scalar of its last metrics row and of the task's evaluation."""
    rows = [{"metric": k, "value": v} for k, v in (results.get("final") or {}).items()
            if isinstance(v, (int, float)) and k != "step"]
    rows += [{"metric": f"task/{k}", "value": v} for k, v in (results.get("eval") or {}).items()
             if isinstance(v, (int, float))]
    return rows


def end_sweep(sweep_dir: Path) -> None:
    """The sweep has ended: its MLflow parent run (if one was made) is marked finished."""
    kept = (read_json(sweep_dir / KEPT) or {}).get("mlflow")
    if not kept:
        return
    try:
        from mlflow.tracking import MlflowClient
        MlflowClient(tracking_uri=kept.get("uri")).set_terminated(kept["run_id"], "FINISHED")
    except Exception as e:
        log.warning("mlflow: the sweep's parent run %s was not marked finished (%s)", kept.get("run_id"), e)


def sweep_of(run_dir: Path) -> Path | None:
    """The sweep directory of a sweep job's run directory (it holds job.json), else None."""
    return run_dir.parent if (run_dir / "job.json").is_file() else None
