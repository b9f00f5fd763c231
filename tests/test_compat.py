"""Private parts of dependencies: only midpo_cli/compat.py uses them, and the behaviour each of its functions relies on
is pinned here, so a release that changes it fails with the function's name (midpo_cli/compat.py says why each is
private). Also pinned: midpo's public re-implementation of Hydra's basic-sweeper job list."""
import re
from pathlib import Path

import pytest

from midpo_cli import compat
from midpo_cli.sweeps.expand import basic_jobs

PRIVATE = re.compile(r"_internal|\._get_node|\._metadata|\._set_value|\._reset_state")
PACKAGE = Path(__file__).resolve().parents[1] / "midpo_cli"


def test_only_the_compat_module_uses_private_apis():
    found = sorted({str(p.relative_to(PACKAGE.parent)) for p in PACKAGE.rglob("*.py") if PRIVATE.search(p.read_text())})
    assert found == ["midpo_cli/compat.py"], f"private APIs outside midpo_cli/compat.py: {found}; move them there"


def test_hydra_args_parser_reads_the_command_line_as_hydra_main():
    parser = compat.hydra_args_parser()
    assert parser is not None, "compat.hydra_args_parser: hydra._internal.utils.get_args_parser is gone"
    args = parser.parse_args(["--multirun", "--cfg", "job", "seed=1", "prior=dpo"])
    used = ("run", "multirun", "cfg", "info", "shell_completion", "help", "hydra_help", "config_path", "config_name",
            "config_dir", "experimental_rerun", "overrides")
    missing = [a for a in used if not hasattr(args, a)]
    assert not missing, f"compat.hydra_args_parser: Hydra's parser no longer gives {missing} (midpo_cli/overrides.py)"
    assert (args.multirun, args.cfg, args.overrides) == (True, "job", ["seed=1", "prior=dpo"]), \
        f"compat.hydra_args_parser: Hydra's parser reads the command line differently now: {args}"


def test_reset_accelerate_state_lets_the_next_job_change_precision():
    from accelerate import Accelerator
    from accelerate.state import GradientState

    try:
        Accelerator(cpu=True, mixed_precision="no", gradient_accumulation_steps=3)
        compat.reset_accelerate_state()
        try:
            again = Accelerator(cpu=True, mixed_precision="bf16")
        except ValueError as e:
            pytest.fail(f"compat.reset_accelerate_state no longer lets a sweep's next job change precision: {e}")
        assert again.mixed_precision == "bf16" and GradientState().num_steps == 1, \
            "compat.reset_accelerate_state no longer forgets the accelerator's and gradient accumulation's settings"
    finally:
        compat.reset_accelerate_state()


@pytest.mark.parametrize("overrides", [
    ["seed=0,1,2", "prior=dpo,simpo", "trainer.max_steps=3"],
    ["prior=dpo,simpo", "seed=0", "prior=tdpo,rdpo", "+x=1", "~y", "z=choice(a,b)", "w=range(0,3)"],
    ["prior.beta=0.1", "a=[1,2]", "b={c: 1}", "d='e,f'"],
])
def test_basic_jobs_are_hydras_basic_sweeper_jobs(overrides):
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    hydra = [job for batch in BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(overrides), None)
             for job in batch]
    assert basic_jobs(overrides) == hydra, "midpo_cli.sweeps.expand.basic_jobs no longer lists the jobs Hydra's " \
                                           "basic sweeper runs (the sweep table replays sweeps with it)"
