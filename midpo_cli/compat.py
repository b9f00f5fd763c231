"""The one place midpo uses private parts of its dependencies: each function names the private thing it uses and why
no public API does the job. tests/test_compat.py pins the behaviour each relies on, so a release that changes it
fails there, naming the function, instead of somewhere downstream."""
from __future__ import annotations

import argparse


def hydra_args_parser() -> argparse.ArgumentParser | None:
    """hydra._internal.utils.get_args_parser: the argument parser `hydra.main` reads the command line with (flags,
    overrides), so midpo's override check reads it exactly as Hydra will. Hydra has no public accessor for it. None
    when this Hydra version has no such parser (the check is then skipped, Hydra still reports)."""
    try:
        from hydra._internal.utils import get_args_parser
    except ImportError:
        return None
    return get_args_parser()


def reset_accelerate_state() -> None:
    """accelerate.state.AcceleratorState._reset_state and GradientState._reset_state: forget the process-wide
    accelerator and gradient-accumulation settings (PartialState, the process group, stays), so the next sweep job
    run in this process can build an Accelerator with other settings (precision, accumulation); accelerate refuses
    a second, different Accelerator otherwise. accelerate offers no public reset (its own tests call these)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state()
    GradientState._reset_state()
