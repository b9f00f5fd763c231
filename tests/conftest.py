"""Shared test set-up: offline hub, and small fast overrides for end-to-end runs."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

# A small built-in task: SFT and pairs take a few seconds, and are cached for the whole session.
FAST = ["dataset.task.sft_steps=120", "dataset.task.sft_examples=1000", "dataset.task.train_prompts=96",
        "dataset.task.eval_prompts=16", "trainer.batch_size=8", "trainer.eval_every=0", "trainer.log_every=1"]


@pytest.fixture(scope="session", autouse=True)
def outside_the_repository(tmp_path_factory):
    """Tests run in a scratch directory: runs and caches that use the default relative paths (outputs/,
    outputs/cache) land there, never in the checkout."""
    here = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("cwd"))
    yield
    os.chdir(here)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("midpo-cache"))


@pytest.fixture
def fast(cache_dir):
    """Overrides for a quick run sharing the session cache."""
    return [*FAST, f"cache_dir={cache_dir}"]


def kill_after_first_checkpoint(args, run, where: str = "checkpoints") -> None:
    """Start `midpo train *args` in `run`, SIGKILL it once its first checkpoint is published (in `run / where`: a
    pipeline's stage keeps its own), and check that it had not finished by then."""
    import signal
    import subprocess
    import sys
    import time

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "midpo_cli", "train", *args, f"hydra.run.dir={run}"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not list(run.glob(f"{where}/step-*/manifest.json")) and time.time() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run / "results.json").exists(), "the run finished before it could be killed"


def fails(capsys, args) -> str:
    """Run `midpo *args` in-process; it must exit 1 with one line on stderr and no traceback. Returns the line."""
    from midpo_cli.__main__ import main
    with pytest.raises(SystemExit) as e:
        main(args)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 1, err
    assert "Traceback" not in err and "\n" not in err, err
    return err
