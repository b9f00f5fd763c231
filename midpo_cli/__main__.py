"""`midpo <command> [hydra overrides]`: one Hydra app per command, all of Hydra's flags kept."""
from __future__ import annotations

import importlib.util
import os
import signal
import sys
import threading
from pathlib import Path

COMMANDS = {
    "train": "preference-train a policy with any prior (Hydra app: overrides, --multirun, --cfg job)",
    "verify": "prove each prior reproduces its variant's original loss, in value and gradient",
    "report": "one table + plots from run/sweep directories, seeds aggregated (not Hydra: DIR... --out DIR)",
}
USAGE = "usage: midpo <command> [overrides...] [--multirun] [--cfg job] [--help]\n\ncommands:\n" + "".join(
    f"  {name:<8} {text}\n" for name, text in COMMANDS.items()) + "\nmidpo <command> --help shows its config groups and options.\n"


def config_path() -> str:
    """The installed package's configs, or the repository's conf/ when run from a source tree (PYTHONPATH).
    `midpo_cli.conf` counts only where it belongs to this copy of midpo_cli: a source tree run with another
    checkout's editable install in the environment would otherwise read that checkout's YAMLs (a new
    conf/prior/<name>.yaml then "does not exist")."""
    here = Path(__file__).resolve().parent
    try:
        spec = importlib.util.find_spec("midpo_cli.conf")
    except ModuleNotFoundError:
        spec = None
    found = [Path(p).resolve() for p in (spec.submodule_search_locations or [])] if spec is not None else []
    if any(p in (here / "conf", here.parent / "conf") for p in found) or (found and not (here.parent / "conf").is_dir()):
        return "pkg://midpo_cli.conf"
    return str(here.parent / "conf")


def _plugins() -> None:
    """Import every prior and task, MIDPO_PLUGINS' folders included (imports deferred so `midpo --help` stays
    instant); a plug-in that fails is one line."""
    from midpo_cli.plugins import PluginError, import_outside

    try:
        import midpo_cli.priors  # noqa: F401  (registers every prior's schema)
        import midpo_cli.tasks  # noqa: F401  (and every task)
        for kind in ("priors", "tasks"):      # folders named after the first import (in-process callers)
            import_outside(kind)
    except PluginError as e:
        from midpo_cli import console
        console.error(f"a plug-in failed to load: {e}")
        raise SystemExit(1) from None


def _register() -> None:
    """Put every typed schema in Hydra's ConfigStore."""
    from midpo_cli.config import register_schemas

    _plugins()
    register_schemas()


def _check(command: str, args: list[str]) -> None:
    """Unknown keys (even with + / ++) and group options fail here in one line, with a did-you-mean."""
    from midpo_cli.overrides import BadOverride, check_overrides

    try:
        check_overrides(command, args, config_path())
    except BadOverride as e:
        from midpo_cli import console
        console.error(f"midpo {command}: {e}")
        raise SystemExit(1) from None


def _app(command: str):
    """Build the Hydra app of a command."""
    import hydra

    if command == "train":
        from midpo_cli.train import run as task
    else:
        from midpo_cli.verify.checks import run as task
    return hydra.main(version_base="1.3", config_path=config_path(), config_name=command)(task)


def main(argv: list[str] | None = None) -> None:
    process = argv is None                                                # the program itself, not a caller's call
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return
    if argv[0] not in COMMANDS:
        print(f"midpo: unknown command '{argv[0]}'.\n\n{USAGE}", end="", file=sys.stderr)
        raise SystemExit(2)
    if argv[0] == "report":                                               # plain argparse: paths, not overrides
        _plugins()                                                        # the runs' tasks declare their metrics
        from midpo_cli.report.command import main as report
        report(argv[1:])
        return
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    old, sys.argv = sys.argv, [f"midpo {argv[0]}", *argv[1:]]
    interrupt = signal.getsignal(signal.SIGINT) if threading.current_thread() is threading.main_thread() else None
    _register()
    _check(argv[0], argv[1:])
    try:
        _app(argv[0])()
    except (SystemExit, KeyboardInterrupt) as e:                     # a Ctrl-C that no run caught: composing
        code = e.code if isinstance(e, SystemExit) else 130            # the config, between sweep jobs, verify
        if isinstance(e, KeyboardInterrupt):
            from midpo_cli import console
            console.stopped(f"Ctrl-C: midpo {argv[0]} stopped")
        if argv[0] == "train" and code not in (0, None):             # a sweep cut short: its table all the same
            from midpo_cli.report.sweep_callback import after_launcher_failure
            after_launcher_failure()
        if code == 130:          # CPython remembers a Ctrl-C that passed through exec'd source (dataclasses, sympy)
            exec("pass")         # and, under `python -m`, dies by SIGINT at exit instead; a new exec forgets it
            if process:          # the run has stopped and said so: a Ctrl-C repeated while the interpreter shuts
                signal.signal(signal.SIGINT, signal.SIG_IGN)   # down would print a traceback from its exit hooks
        raise SystemExit(code) from None
    finally:
        sys.argv = old
        if not process and interrupt is not None:                        # a caller's process keeps its Ctrl-C
            signal.signal(signal.SIGINT, interrupt)
        if argv[0] == "train":
            from midpo_cli.report.sweep_callback import release_sweep_dir
            release_sweep_dir()


if __name__ == "__main__":
    main()
