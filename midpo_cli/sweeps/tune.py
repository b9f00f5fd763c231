"""`+experiment=tune`: Hydra's Optuna sweeper run as one study per prior, each around that prior's own beta.

beta's scale differs by orders of magnitude between priors (SimPO 2.0, DPO 0.1), so one shared interval
would search one prior around its optimum and another far from it, and a comparison at one shared beta is
not fair either. For each prior p (the `prior` sweep, e.g. `prior=dpo,simpo`), the Optuna sweeper searches
    prior.beta   log-uniform in [beta_p / beta_range, beta_p * beta_range]   (beta_p: conf/prior/<p>.yaml)
    optimizer.lr log-uniform in [lr / lr_range, lr * lr_range]               (only when lr_range is set)
for n_trials trials, maximising or minimising `trainer.objective` (direction=auto: report/objective.py).
An explicit `prior.beta=...` or `optimizer.lr=...` (a value or a sweep) replaces that range. Then each
prior's best setting is trained again with `confirm_seeds` (not the search seed: a best trial is an
optimistic estimate) into <sweep dir>/confirm/, and report/best.py writes tune_best.json / tune_best.md.
Hydra's sweeper does the search itself (sampler, storage, batches of n_jobs trials, any launcher).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn
from hydra.plugins.launcher import Launcher
from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper
from omegaconf import DictConfig, OmegaConf

from midpo_cli.report import objective
from midpo_cli.tasks import metrics_of

log = logging.getLogger("midpo")
logging.getLogger("alembic").setLevel(logging.WARNING)                 # optuna's import: "setup plugin ..." lines


def fail(e: Exception) -> None:
    """A bad tune set-up: one line, exit 1 (Hydra would print a traceback for an exception here)."""
    from midpo_cli import console
    console.error(f"tune: {e}")
    raise SystemExit(1) from e


class Recorder(Launcher):
    """The configured launcher, keeping every job it ran (the Optuna sweeper does not return them)."""

    def __init__(self, launcher: Launcher) -> None:
        self.launcher, self.returns = launcher, []

    def setup(self, **kwargs: Any) -> None:
        self.launcher.setup(**kwargs)

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        returns = self.launcher.launch(job_overrides, initial_job_idx)
        self.returns.extend(returns)
        return returns


def pick(returns: list[JobReturn], direction: str) -> JobReturn | None:
    """The best finished job of a study (the first of equals), or None when none finished."""
    done = [r for r in returns if objective.of_job(r) is not None]
    if not done:
        return None
    return max(done, key=lambda r: objective.of_job(r) if direction == "maximize" else -objective.of_job(r))


def search_space(cfg: DictConfig, given: set[str], swept: set[str], beta_range: float, lr_range: float | None) -> dict:
    """One prior's plan: `space`, Optuna override strings (log intervals around its defaults, for the keys
    not `given` on the command line), the `keys` searched (with the `swept` ones) and their `defaults`."""
    space = []
    if "prior.beta" not in given:
        beta = OmegaConf.select(cfg, "prior.beta")
        if not isinstance(beta, (int, float)) or beta <= 0:
            raise ValueError(f"prior '{cfg.prior.name}' has no positive `beta` to search around "
                             f"(conf/prior/{cfg.prior.name}.yaml); give its search yourself, e.g. "
                             f"'prior.<key>=tag(log, interval(0.01, 1))'")
        space.append(f"prior.beta=tag(log, interval({beta / beta_range:.6g}, {beta * beta_range:.6g}))")
    if lr_range and "optimizer.lr" not in given:
        lr = float(cfg.optimizer.lr)
        space.append(f"optimizer.lr=tag(log, interval({lr / lr_range:.6g}, {lr * lr_range:.6g}))")
    keys = [*[s.split("=", 1)[0] for s in space], *sorted(swept)]
    return {"space": space, "keys": keys, "defaults": {k: OmegaConf.select(cfg, k) for k in keys}}


class TuneSweeper(OptunaSweeper):
    """Hydra's OptunaSweeper, once per prior; keys of conf/hydra/sweeper/tune.yaml (see there)."""

    def __init__(self, sampler: Any, beta_range: float = 10.0, lr_range: float | None = None,
                 confirm_seeds: Sequence[int] = (1, 2), direction: str = "auto", storage: Any = None,
                 study_name: str = "midpo-tune", n_trials: int = 12, n_jobs: int = 1, max_failure_rate: float = 1.0,
                 params: DictConfig | None = None, custom_search_space: str | None = None) -> None:
        if beta_range <= 1 or (lr_range is not None and lr_range <= 1):
            fail(ValueError(f"hydra.sweeper.beta_range={beta_range} and lr_range={lr_range} must be > 1 "
                            "(the search spans default/range .. default*range)"))
        super().__init__(sampler, direction, storage, study_name, n_trials, n_jobs, max_failure_rate, None,
                         custom_search_space, params)
        import optuna
        optuna.logging.set_verbosity(optuna.logging.WARNING)           # Hydra's log already names each study
        self.beta_range, self.lr_range = float(beta_range), lr_range and float(lr_range)
        self.confirm_seeds, self.study_name = [int(s) for s in confirm_seeds], study_name

    def setup(self, *, hydra_context: Any, task_function: Any, config: DictConfig) -> None:
        super().setup(hydra_context=hydra_context, task_function=task_function, config=config)
        self.recorder = Recorder(self.sweeper.launcher)
        self.sweeper.launcher = self.recorder
        self.objective = str(config.trainer.objective)
        if self.sweeper.direction == "auto":
            try:
                self.sweeper.direction = objective.direction(self.objective, config.dataset.source)
            except ValueError as e:
                fail(e)
        self.direction = str(self.sweeper.direction)

    def sweep(self, arguments: list[str]) -> None:
        impl = self.sweeper
        loader = impl.hydra_context.config_loader
        parsed = OverridesParser.create(config_loader=loader).parse_overrides(
            [*impl._parse_sweeper_params_config(), *arguments])
        impl.params = None                                              # all of them are passed below, per prior
        prior = [o for o in parsed if o.get_key_element() == "prior"]
        rest = [o for o in parsed if o.get_key_element() != "prior"]
        priors = ([str(v) for v in prior[-1].sweep_string_iterator()] if prior and prior[-1].is_sweep_override()
                  else [prior[-1].value() if prior else impl.config.prior.name])
        fixed = [o.input_line for o in rest if not o.is_sweep_override()]
        swept = {o.get_key_element() for o in rest if o.is_sweep_override()}
        given = swept | {o.get_key_element() for o in rest if o.get_key_element() in ("prior.beta", "optimizer.lr")}
        try:
            plan = {p: self._plan(p, fixed, given, swept) for p in priors}   # every prior checked before any job
        except ValueError as e:
            fail(e)
        studies = {}
        for p in priors:
            start = len(self.recorder.returns)
            impl.study_name = f"{self.study_name}-{p}"
            log.info("tune: prior=%s, %d trials, %s", p, impl.n_trials, " ".join(plan[p]["space"]))
            try:
                impl.sweep([f"prior={p}", *[o.input_line for o in rest], *plan[p]["space"]])
            except ValueError as e:                                     # optuna: no trial of this study finished
                log.error("tune: prior=%s: %s", p, e)
            results = Path(impl.sweep_dir) / "optimization_results.yaml"
            if results.exists():
                results.rename(results.with_name(f"optimization_results_{p}.yaml"))
            studies[p] = self.recorder.returns[start:]
        winners = {p: pick(rets, self.direction) for p, rets in studies.items()}
        confirm = self._confirm(winners, fixed)
        from midpo_cli.report import best                              # pandas: only at the end

        best.write(Path(impl.sweep_dir), self.objective, self.direction, studies, winners, confirm,
                   [f for f in fixed if not f.startswith(("seed=", "+experiment="))], plan)

    def _plan(self, prior: str, fixed: list[str], given: set[str], swept: set[str]) -> dict:
        cfg = self.sweeper.hydra_context.config_loader.load_sweep_config(self.sweeper.config, [f"prior={prior}", *fixed])
        offered = objective.task_columns(metrics_of(cfg.dataset.source))
        if self.objective.startswith("task/") and self.objective not in offered:
            raise ValueError(f"trainer.objective={self.objective} is not a metric of dataset.source="
                             f"{cfg.dataset.source} ({', '.join(offered) or 'it declares none'}); use one of those "
                             "or e.g. trainer.objective=eval/rewards/accuracies")
        return search_space(cfg, given, swept, self.beta_range, self.lr_range)

    def _confirm(self, winners: dict[str, JobReturn | None], fixed: list[str]) -> dict[str, list[JobReturn]]:
        """Each prior's best setting trained again with every confirm seed, in <sweep dir>/confirm/."""
        jobs, owners = [], []
        keep = [f for f in fixed if not f.startswith("seed=")]
        for p, ret in winners.items():
            if ret is None:
                continue
            searched = [o for o in ret.overrides if o.startswith(("prior.", "optimizer.")) and o not in keep]
            for seed in self.confirm_seeds:
                jobs.append([f"prior={p}", *keep, *searched, f"seed={seed}",
                             f"hydra.sweep.subdir=confirm/{p}-seed{seed}"])
                owners.append(p)
        if not jobs:
            return {}
        log.info("tune: training each prior's best setting with seeds %s", self.confirm_seeds)
        returns = self.recorder.launch(jobs, initial_job_idx=self.sweeper.job_idx)
        self.sweeper.job_idx += len(returns)
        out: dict[str, list[JobReturn]] = {}
        for p, ret in zip(owners, returns):
            out.setdefault(p, []).append(ret)
        return out
