"""`midpo verify` end to end (in-process): it passes on the shipped priors, writes its table, and fails
(exit 1) on a deliberately broken prior or a silently ignored option."""
import json

import pandas as pd
import pytest
import torch.nn.functional as F

from midpo_cli.__main__ import main
from midpo_cli.priors import PRIORS, Needs, Prior, register_prior
from midpo_cli.priors.dpo import DPO
from midpo_cli.priors.simpo import SimPO

QUICK = ["real_model=false", "trl=false"]


def test_verify_passes_and_writes_results(tmp_path, capsys):
    main(["verify", f"hydra.run.dir={tmp_path}"])
    out = capsys.readouterr().out
    rows = pd.read_csv(tmp_path / "verify.csv")
    res = json.loads((tmp_path / "verify.json").read_text())
    assert set(rows.prior) >= {"dpo", "dice", "simpo", "rdpo", "hdpo", "tdpo", "tisdpo", "sparsepo", "dpo_norm",
                               "lddpo", "trdpo"}
    assert {"variant=1", "variant=2"} <= set(rows[rows.prior == "tdpo"].option)
    assert res["summary"]["failed"] == 0 and res["summary"]["checks"] == len(rows) == len(res["rows"])
    assert res["summary"]["max_equality_error"] <= 1e-10 and res["summary"]["max_packed_error"] <= 1e-6
    assert rows[rows.check.str.startswith("packed batch")].prior.nunique() == len(PRIORS)
    assert not (rows.passed == False).any()                                         # noqa: E712 (NaN = skipped)
    checks = set(rows.check)
    for needle in ("tiny model forward", "no stop-gradient on D_w: gradient differs", "zeta detached: gradient differs",
                   "reduction: == tdpo (variant=1)", "x-only shift", "knob alpha", "trl DPOTrainer",
                   "trl CPOTrainer simpo", "ref_model = the moving reference", "trl SyncRefModelCallback"):
        assert any(needle in c for c in checks), needle
    smol = rows[rows.check.str.startswith("SmolLM2")]
    assert len(smol) and smol.note.str.startswith("skipped").all()                  # off by default (smollm2=false)
    assert "checks, all passed" in out


def test_broken_log_prior_exits_1(tmp_path, monkeypatch, capsys):
    """SimPO's prior with a stop-gradient: the value still matches, the gradient does not."""
    original = SimPO.log_prior
    monkeypatch.setattr(SimPO, "log_prior", lambda self, v: original(self, v).detach())
    with pytest.raises(SystemExit) as e:
        main(["verify", "priors=[simpo]", *QUICK, f"hydra.run.dir={tmp_path}"])
    assert e.value.code == 1
    rows = pd.read_csv(tmp_path / "verify.csv")
    bad = rows[rows.passed == False]                                                # noqa: E712
    assert bad.check.str.startswith("MI-DPO == original").any()
    assert "FAILED" in capsys.readouterr().out


def test_broken_original_loss_exits_1(tmp_path, monkeypatch):
    monkeypatch.setattr(DPO, "original_loss",
                        lambda self, v: -F.logsigmoid(2 * self.beta * (v.seq(v.logps - v.ref_logps)[0]
                                                                       - v.seq(v.logps - v.ref_logps)[1])))
    with pytest.raises(SystemExit) as e:
        main(["verify", "priors=[dpo]", *QUICK, f"hydra.run.dir={tmp_path}"])
    assert e.value.code == 1


def test_missing_need_is_a_failed_row_not_a_crash(tmp_path, monkeypatch):
    monkeypatch.setattr(DPO, "needs", lambda self: Needs())                          # forgets the reference
    with pytest.raises(SystemExit) as e:
        main(["verify", "priors=[dpo]", *QUICK, f"hydra.run.dir={tmp_path}"])
    assert e.value.code == 1
    rows = pd.read_csv(tmp_path / "verify.csv")
    assert rows[rows.passed == False].note.str.contains("ref_logps").any()          # noqa: E712


def test_ignored_option_fails_knob_check(tmp_path):
    @register_prior("ignores_gamma_test")
    class IgnoresGamma(Prior):
        beta: float = 0.1
        gamma: float = 0.5        # declared, read by neither form: the knob check must catch it

        def needs(self):
            return Needs(reference=True)

        def log_prior(self, v):
            return v.seq(v.require("ref_logps"))

        def original_loss(self, v):
            d = v.seq(v.logps - v.ref_logps)
            return -F.logsigmoid(self.beta * (d[0] - d[1]))

    try:
        with pytest.raises(SystemExit):
            main(["verify", "priors=[ignores_gamma_test]", *QUICK, f"hydra.run.dir={tmp_path}"])
    finally:
        PRIORS.pop("ignores_gamma_test", None)
        from hydra.core.config_store import ConfigStore
        ConfigStore.instance().repo["schema"]["prior"].pop("ignores_gamma_test.yaml", None)
    rows = pd.read_csv(tmp_path / "verify.csv").set_index("check")
    assert rows.loc["knob gamma changes loss or grad", "passed"] == False            # noqa: E712
    assert rows.loc["knob beta changes loss or grad", "passed"] == True              # noqa: E712


def test_unknown_prior_name_is_explained(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["verify", "priors=[simpoo]", *QUICK, f"hydra.run.dir={tmp_path}"])
    assert e.value.code == 1
    assert "Did you mean 'simpo'" in capsys.readouterr().err
