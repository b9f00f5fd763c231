"""Arms of +experiment=learnable_priors come from the priors' own declarations (midpo_cli/sweeps/arms.py): a prior from
a plug-in folder outside midpo_cli (MIDPO_PLUGINS: its two files only) joins with its arms, and a learnable prior that
declares none stops the experiment in one line. Composed in-process; nothing trains."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra

from midpo_cli.__main__ import main
from midpo_cli.config import register_schemas
from midpo_cli.plugins import import_outside
from midpo_cli.priors import PRIORS, register_prior, unregister_prior
from midpo_cli.priors.learnable import LearnablePrior
from midpo_cli.sweeps.arms import arms, register_arms
from midpo_cli.sweeps.expand import basic_jobs

CONF = Path(__file__).resolve().parents[1] / "conf"
FIXED = ["dice", "dpo", "dpo_norm", "hdpo", "lddpo", "rdpo", "simpo", "sparsepo", "tdpo", "tisdpo",
         "trdpo"]   # new priors join by themselves
LEARNABLE = [f"{p}-{rule}" for p in ("learned_adapter", "learned_mix", "learned_poe", "learned_tilt")
             for rule in ("joint", "joint0", "tracking")]
LEARNABLE += ["learned_marginal-ramp"]                  # its one arm: the marginal ramped in, no update rule
register_schemas()

PLUGIN = '''"""learned_plugin: a throwaway learnable prior from outside midpo_cli, with an arm of its own."""
import torch

from midpo_cli.priors import Arm, Needs, register_prior
from midpo_cli.priors.learnable import LearnablePrior


@register_prior("learned_plugin")
class LearnedPlugin(LearnablePrior):
    """log zeta = log pi_ref + c, c learned."""
    arms = {**LearnablePrior.arms, "fast": Arm({"lr": 0.5}, "the update rule joint at a larger learning rate")}

    def __post_init__(self):
        super().__post_init__()
        self.c = torch.nn.Parameter(torch.zeros(()))

    def needs(self):
        return Needs(reference=True)

    def log_zeta(self, v):
        return v.seq(v.require("ref_logps")) + self.c

    written_log_zeta = log_zeta
'''
PLUGIN_CONF = """# learned_plugin: a throwaway learnable prior from outside midpo_cli
defaults:
  - /schema/prior/learned_plugin@_here_
  - _self_
name: learned_plugin
lr: 0.01
"""


def experiment_arms(*overrides: str) -> list[str]:
    """The arm of each job of +experiment=learnable_priors seed=0, as Hydra's basic sweeper expands its glob."""
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        cfg = compose("train", overrides=["+experiment=learnable_priors", "seed=0", *overrides],
                      return_hydra_config=True)
        params = [f"{k}={v}" for k, v in cfg.hydra.sweeper.params.items()]
        jobs = basic_jobs([*params, "seed=0"], GlobalHydra.instance().config_loader())
    return [o.split("=", 1)[1] for job in jobs for o in job if o.startswith("+arm=")]


def compose_arm(arm: str):
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        return compose("train", overrides=[f"+arm={arm}"])


def test_the_arms_are_every_fixed_prior_and_each_learnable_prior_s_update_rules():
    assert experiment_arms() == sorted(FIXED + LEARNABLE)
    assert all(text and "\n" not in text for _, arm in arms().values() for text in [arm.text])
    prior = compose_arm("learned_tilt-joint0").prior
    assert (prior.name, prior["update"].name, prior.anchor) == ("learned_tilt", "joint", 0.0)
    assert compose_arm("learned_mix-tracking").prior["update"].name == "tracking"
    assert compose_arm("dpo").prior.name == "dpo"


@pytest.fixture
def plugin_folder(tmp_path):
    """A plug-in folder with a learnable prior's two files: priors/learned_plugin.py, conf/prior/learned_plugin.yaml."""
    (tmp_path / "priors").mkdir()
    (tmp_path / "priors" / "learned_plugin.py").write_text(PLUGIN)
    (tmp_path / "conf" / "prior").mkdir(parents=True)
    (tmp_path / "conf" / "prior" / "learned_plugin.yaml").write_text(PLUGIN_CONF)
    return tmp_path


def test_a_prior_from_a_plug_in_folder_joins_with_its_arms(plugin_folder):
    try:
        import_outside("priors", [plugin_folder])
        register_schemas()
        mine = ["learned_plugin-fast", "learned_plugin-joint", "learned_plugin-joint0", "learned_plugin-tracking"]
        assert experiment_arms() == sorted(FIXED + LEARNABLE + mine)
        prior = compose_arm("learned_plugin-fast").prior
        assert (prior.name, prior["update"].name, prior.lr) == ("learned_plugin", "joint", 0.5)
    finally:
        unregister_prior("learned_plugin")
        ConfigStore.instance().repo["prior"].pop("learned_plugin.yaml", None)
        sys.modules.pop("midpo_plugins.priors.learned_plugin", None)
        register_arms()
    env = {**os.environ, "MIDPO_PLUGINS": str(plugin_folder),
           "PYTHONPATH": os.pathsep.join([str(CONF.parent), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-m", "midpo_cli", "train", "--cfg", "job", "+arm=learned_plugin-fast"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0 and "name: learned_plugin\n" in r.stdout and "lr: 0.5\n" in r.stdout, r.stderr[-2000:]


def test_a_learnable_prior_without_arms_stops_the_experiment_in_one_line(tmp_path, capsys):
    @register_prior("learned_armless")
    class Armless(LearnablePrior):
        arms = {}

    try:
        with pytest.raises(SystemExit) as e:
            main(["train", "+experiment=learnable_priors", f"hydra.sweep.dir={tmp_path / 'sweep'}"])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 1 and "\n" not in err and "Traceback" not in err, err
        assert "learnable prior 'learned_armless' declares no arms" in err and "Armless" in err, err
        assert not (tmp_path / "sweep").exists() or not any((tmp_path / "sweep").iterdir())    # no job started
    finally:
        unregister_prior("learned_armless")
        register_arms()
    assert "learned_armless" not in PRIORS
