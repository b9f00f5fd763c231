"""A basic-sweeper sweep's jobs from its overrides, with Hydra's public override parser (the sweep table replays a
sweep's jobs with it; the tests list +experiment presets with it)."""
from __future__ import annotations

import itertools


def basic_jobs(overrides: list[str], config_loader=None) -> list[list[str]]:
    """The jobs (each its overrides) Hydra's basic sweeper runs for `overrides` (its params, then the command line's),
    in its order: the Cartesian product of each key's values, a key given twice taking its last values at its first
    place. A glob needs `config_loader` (for its group's options; Hydra's HydraException without one). ValueError for
    a sweep the basic sweeper refuses (a range or interval that is not a list of choices)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    choices: dict[str, list[str]] = {}
    for o in OverridesParser.create(config_loader=config_loader).parse_overrides(overrides):
        key = o.get_key_element()
        if o.is_sweep_override() and not o.is_discrete_sweep():
            raise ValueError(f"the basic sweeper cannot sweep `{o.input_line}` (not a list of choices)")
        choices[key] = [f"{key}={v}" for v in o.sweep_string_iterator()] if o.is_sweep_override() \
            else [f"{key}={o.get_value_element_as_str()}"]
    return [list(job) for job in itertools.product(*choices.values())]
