"""Per-job resources when a sweep runs several jobs at once on one machine (a Hydra callback).

Registered under `hydra.callbacks` in conf/train.yaml; Hydra calls `on_job_start` inside each job's own
process (the joblib launcher's workers, submitit's job processes), before the task. In a --multirun job:

- CPU threads: with the joblib launcher (`hydra/launcher=parallel`), n_jobs jobs share the machine, so each
  gets cores // n_jobs torch threads (and OMP/MKL/OpenBLAS_NUM_THREADS for libraries that start later)
  instead of every job using every core. With submitit (`slurm`, `local`) a job gets `cpus_per_task` threads.
- GPUs: when several jobs share a machine that has several GPUs (joblib, submitit_local), each job takes the
  first free GPU of a pool (an exclusive lock file per GPU in <sweep dir>/.gpus/, held while the job runs),
  starting at job number % GPUs; when all are taken it shares GPU job number % GPUs (and says so).
  On SLURM each job has its own allocation (CUDA_VISIBLE_DEVICES set by SLURM) and nothing is changed.
- job.json in the job's directory: job number, overrides, launcher, the launcher's job id (SLURM's, or
  submitit_local's process id), host, threads, device and the start count (a requeued job starts again). The
  sweep table reads it for jobs that never finished. It is written by `midpo train` once the job has claimed its
  directory (`record_job`), never before: a job that is refused, or that moves to a fresh slot because its
  slot holds another sweep's job, writes nothing into another job's files.

Single runs and the basic launcher (one job at a time) are left alone: the job has the whole machine.
"""
from __future__ import annotations

import datetime
import logging
import os
import socket
from pathlib import Path
from typing import IO, Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("midpo")
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def available_cores() -> int:
    """CPUs this process may run on (a SLURM or container allocation, not the whole node)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:                                             # not Linux
        return os.cpu_count() or 1


def launcher_kind(launcher: DictConfig | dict) -> str:
    """joblib | submitit_local | submitit_slurm | basic (or the target's class name for another launcher)."""
    target = str((launcher or {}).get("_target_", ""))
    names = {"JoblibLauncher": "joblib", "LocalLauncher": "submitit_local", "SlurmLauncher": "submitit_slurm",
             "BasicLauncher": "basic"}
    return names.get(target.rsplit(".", 1)[-1], target.rsplit(".", 1)[-1] or "basic")


def concurrent_jobs(launcher: DictConfig | dict, cores: int) -> int:
    """How many jobs of this sweep run at once on this job's machine; 0 = unknown but possibly all of them
    (submitit_local starts every job of a batch at once)."""
    kind = launcher_kind(launcher)
    if kind == "joblib":
        n = int(launcher.get("n_jobs") or 1)
        return max(1, cores + 1 + n if n < 0 else n)                  # joblib: -1 = all cores, -2 = all but one
    return 0 if kind == "submitit_local" else 1


def threads_per_job(launcher: DictConfig | dict, cores: int) -> int | None:
    """Torch threads for one job, or None to keep the default (the job has the machine to itself)."""
    cpus = (launcher or {}).get("cpus_per_task")
    if launcher_kind(launcher).startswith("submitit") and cpus:
        return int(cpus)
    n = concurrent_jobs(launcher, cores)
    return max(1, cores // n) if n > 1 else None


def claim_gpu(lock_dir: Path, n_gpus: int, job_num: int) -> tuple[int, IO | None]:
    """(GPU index, lock handle): the first GPU nobody holds, trying job_num % n_gpus first so that jobs
    started together spread out. The lock is held until the handle is closed or the process ends. When
    every GPU is held: (job_num % n_gpus, None), a shared GPU."""
    import fcntl

    lock_dir.mkdir(parents=True, exist_ok=True)
    for k in range(n_gpus):
        index = (job_num + k) % n_gpus
        handle = open(lock_dir / f"gpu{index}.lock", "a")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            continue
        handle.write(f"{os.getpid()} job {job_num}\n")
        handle.flush()
        return index, handle
    return job_num % n_gpus, None


def _set_threads(n: int) -> None:
    import torch

    for var in THREAD_ENV:
        os.environ[var] = str(n)
    torch.set_num_threads(n)


class JobResources(Callback):
    """Threads, GPU and job.json for each job of a --multirun (see the module docstring)."""

    def __init__(self) -> None:
        self._gpu_lock: IO | None = None

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        from hydra.types import RunMode

        if config.hydra.mode != RunMode.MULTIRUN:
            return
        launcher = OmegaConf.to_container(config.hydra.launcher, resolve=True)
        cores = available_cores()
        threads = threads_per_job(launcher, cores)
        if threads is not None:
            _set_threads(threads)
        device = self._device(config, launcher, cores)
        global _job
        _job = {"job_num": int(config.hydra.job.num), "overrides": list(config.hydra.overrides.task),
                "launcher": launcher_kind(launcher), "job_id": OmegaConf.select(config, "hydra.job.id"),
                "threads": threads, "device": device}

    def on_job_end(self, config: DictConfig, **kwargs: Any) -> None:
        global _job
        _job = None
        if self._gpu_lock is not None:
            self._gpu_lock.close()
            self._gpu_lock = None

    def _device(self, config: DictConfig, launcher: dict, cores: int) -> str | None:
        """Pick and set this job's GPU when jobs share a machine with several GPUs; the device, or None."""
        if concurrent_jobs(launcher, cores) == 1:
            return None
        import torch

        n = torch.cuda.device_count()
        if n < 2:
            return "cuda:0" if n == 1 else None
        index, self._gpu_lock = claim_gpu(Path(config.hydra.sweep.dir) / ".gpus", n, int(config.hydra.job.num))
        if self._gpu_lock is None:
            log.warning("every GPU is taken by another job of this sweep: job %s shares cuda:%d "
                        "(run fewer jobs at once: hydra.launcher.n_jobs=%d)", config.hydra.job.num, index, n)
        torch.cuda.set_device(index)                                   # accelerate's "cuda" = the current device
        return f"cuda:{index}"


_job: dict | None = None                 # this process's sweep job, from on_job_start until record_job


def record_job(run_dir: Path) -> Path | None:
    """<run dir>/job.json for the sweep job running in this process, once it has claimed `run_dir`; `starts`
    counts how often the job started in this directory (requeues). None outside a sweep job."""
    from midpo_cli.engine.files import read_json, write_json

    if _job is None:
        return None
    path = run_dir / "job.json"
    before = read_json(path)
    starts = before.get("starts", 0) + 1 if isinstance(before, dict) and isinstance(before.get("starts"), int) else 1
    write_json(path, {**_job, "host": socket.gethostname(), "pid": os.getpid(),
                      "slurm_job_id": os.environ.get("SLURM_JOB_ID"), "starts": starts,
                      "started_at": datetime.datetime.now().isoformat(timespec="seconds")})
    return path


class RegisterPlugins(Callback):
    """Registers midpo's sweeper (hydra_plugins/midpo_tune) with Hydra before a sweep starts: Hydra's own
    scan of the hydra_plugins namespace misses it in an editable install (`pip install -e .`)."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not str(config.hydra.sweeper.get("_target_", "")).startswith("hydra_plugins.midpo_tune."):
            return
        from hydra.core.plugins import Plugins

        from hydra_plugins.midpo_tune.tune_sweeper import TuneSweeper
        Plugins.instance().register(TuneSweeper)
