"""Priors: hand-derived numbers (written out in each docstring), MI-DPO form == original form in value and
gradient for every prior and option, every conf/prior/*.yaml against the registry, and a throwaway prior
that the registry, Hydra's ConfigStore and `midpo verify`'s checks pick up by themselves.

Shared hand example (one pair, per-token values; rejected is one token longer, chosen is right-padded):
    chosen   log pi  = [-4, -6]      (sum -10)   log pi_ref = [-5, -7]      (sum -12)   |y_w| = 2
    rejected log pi  = [-5, -4, -2]  (sum -11)   log pi_ref = [-4, -3, -3]  (sum -10)   |y_l| = 3
    per-token log-ratios: chosen [1, 1] (sum 2), rejected [-1, -1, 1] (sum -1); DPO's u = 2 - (-1) = 3.
Every loss below is -log sigmoid(h) = log(1 + e^-h).
"""
from pathlib import Path

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir, initialize_config_module
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

import midpo_cli.priors  # noqa: F401
import midpo_cli.verify.checks as verify
from midpo_cli.config import register_schemas
from midpo_cli.loss import mi_dpo_logits
from midpo_cli.priors import PRIORS, PairView, build_prior, register_prior
from midpo_cli.verify.batches import random_probe, view

CONF = Path(__file__).resolve().parents[1] / "conf"
register_schemas()


def side(values, T=3):
    """[T] right-padded with zeros."""
    return torch.tensor(list(values) + [0.0] * (T - len(values)), dtype=torch.float64)


def pair(chosen, rejected):
    """[2, 1, T] from per-token lists of the chosen and rejected responses."""
    return torch.stack([side(chosen), side(rejected)])[:, None]


MASK = pair([1, 1], [1, 1, 1])
LOGPS, REF = pair([-4, -6], [-5, -4, -2]), pair([-5, -7], [-4, -3, -3])


def hand_view(**fields) -> PairView:
    fields.setdefault("logps", LOGPS.clone().requires_grad_())
    return PairView(mask=fields.pop("mask", MASK), **fields)


def check(prior_cfg: dict, v: PairView, h: float, loss: float) -> None:
    """Both forms give the hand-derived loss, and the MI-DPO logit is the hand-derived h."""
    prior = build_prior(prior_cfg)
    assert prior.original_loss(v).item() == pytest.approx(loss, rel=1e-12, abs=1e-12)
    assert verify.unified(prior, v).item() == pytest.approx(loss, rel=1e-12, abs=1e-12)
    assert mi_dpo_logits(v.seq(v.logps), prior.log_prior(v), prior.a).item() == pytest.approx(h, abs=1e-12)


def test_dpo_by_hand():
    """beta = 0.1: h = 0.1 * [(-10 - -12) - (-11 - -10)] = 0.1 * (2 + 1) = 0.3;
    loss = log(1 + e^-0.3) = 0.5543552444685271."""
    check({"name": "dpo", "beta": 0.1}, hand_view(ref_logps=REF), 0.3, 0.5543552444685271)


def test_dice_by_hand():
    """snapshot pi_{t-1}: chosen [-5, -6] (sum -11), rejected [-4, -3, -3.5] (sum -10.5); beta = 0.1:
    h = 0.1 * [(-10 + 11) - (-11 + 10.5)] = 0.1 * 1.5 = 0.15; loss = log(1 + e^-0.15) = 0.6209570477895321."""
    v = hand_view(snapshot_logps=pair([-5, -6], [-4, -3, -3.5]))
    check({"name": "dice", "beta": 0.1}, v, 0.15, 0.6209570477895321)


@pytest.mark.parametrize("convention, gamma, h, loss", [("ratio", 0.25, 0.5, 0.4740769841801067),
                                                        ("absolute", 0.25, 0.75, 0.38687100611489994)])
def test_simpo_by_hand(convention, gamma, h, loss):
    """chosen log pi [-2, -2, -2] (|y_w| = 3, mean -2), rejected [-2, -3, -2, -3] (|y_l| = 4, mean -2.5), beta = 2:
    ratio:    gamma_abs = beta * 0.25 = 0.5, h = 2 * (-2 + 2.5) - 0.5 = 0.5,  loss = 0.4740769841801067;
    absolute: gamma_abs = 0.25,            h = 1.0 - 0.25        = 0.75, loss = 0.38687100611489994."""
    T = 4
    logps = torch.stack([side([-2, -2, -2], T), side([-2, -3, -2, -3], T)])[:, None]
    mask = torch.stack([side([1, 1, 1], T), side([1, 1, 1, 1], T)])[:, None]
    v = hand_view(logps=logps.requires_grad_(), mask=mask)
    check({"name": "simpo", "beta": 2.0, "gamma": gamma, "gamma_convention": convention}, v, h, loss)


@pytest.mark.parametrize("sign, h, loss", [("+", 0.29, 0.5586230482344253), ("-", 0.31, 0.5501118864387144)])
def test_rdpo_by_hand(sign, h, loss):
    """beta = 0.1, alpha = 0.01, |y_w| - |y_l| = 2 - 3 = -1:
    sign "+": h = 0.3 + 0.01 * (-1) = 0.29, loss = 0.5586230482344253;
    sign "-": h = 0.3 - 0.01 * (-1) = 0.31, loss = 0.5501118864387144."""
    check({"name": "rdpo", "beta": 0.1, "alpha": 0.01, "sign": sign}, hand_view(ref_logps=REF), h, loss)


@pytest.mark.parametrize("form", ["fixed", "policy"])
def test_hdpo_by_hand(form):
    """beta = 0.1, alpha_H = 0.5: h = 0.5*0.1*(-10 - -11) - 0.1*(-12 - -10) = 0.05 + 0.2 = 0.25,
    loss = log(1 + e^-0.25) = 0.5759394198788436, for both exact forms (a = 0.05 / a = 0.1)."""
    check({"name": "hdpo", "beta": 0.1, "alpha": 0.5, "form": form}, hand_view(ref_logps=REF), 0.25,
          0.5759394198788436)


@pytest.mark.parametrize("variant, h, loss", [(1, 0.24, 0.5803299666264259), (2, 0.27, 0.5672321351223193)])
def test_tdpo_by_hand(variant, h, loss):
    """KL_t(pi_ref || pi): chosen [0.1, 0.3] (D_w = 0.4), rejected [0.2, 0.3, 0.5] (D_l = 1.0); beta = 0.1, u = 3:
    TDPO1: h = 0.1 * (3 - (1.0 - 0.4)) = 0.24,       loss = 0.5803299666264259;
    TDPO2: h = 0.1 * (3 - 0.5 * (1.0 - 0.4)) = 0.27, loss = 0.5672321351223193 (alpha = 0.5)."""
    v = hand_view(ref_logps=REF, kl_ref_pi=pair([0.1, 0.3], [0.2, 0.3, 0.5]))
    check({"name": "tdpo", "beta": 0.1, "alpha": 0.5, "variant": variant}, v, h, loss)


@pytest.mark.parametrize("token_level, h, loss", [(False, 0.34, 0.5375281114548287),
                                                  (True, 0.3765, 0.5225125356040949)])
def test_tisdpo_by_hand(token_level, h, loss):
    """weights: chosen [1.2, 0.8], rejected [0.5, 1.5, 0.6]; log-ratios chosen [1, 1], rejected [-1, -1, 1]:
    U_w = 1.2 + 0.8 = 2.0, U_l = -0.5 - 1.5 + 0.6 = -1.4, h = 0.1 * 3.4 = 0.34, loss = 0.5375281114548287.
    token_level, KL_t(pi || pi_ref): chosen [0.2, 0.1], rejected [0.3, 0.4, 0.5], alpha = 0.5:
    K_w = 1.2*0.2 + 0.8*0.1 = 0.32, K_l = 0.5*0.3 + 1.5*0.4 + 0.6*0.5 = 1.05,
    h = 0.1 * (3.4 - 0.5 * (0.32 - 1.05)) = 0.3765, loss = 0.5225125356040949.
    (With all weights 1 both would give DPO's 0.3: the weights matter.)"""
    v = hand_view(ref_logps=REF, kl_pi_ref=pair([0.2, 0.1], [0.3, 0.4, 0.5]),
                  token_values={"weights": pair([1.2, 0.8], [0.5, 1.5, 0.6])})
    check({"name": "tisdpo", "beta": 0.1, "alpha": 0.5, "token_level": token_level, "weights": "given"}, v, h, loss)


@pytest.mark.parametrize("common, h, loss, penalty", [(True, 0.285, 0.5607661285081473, 0.003),
                                                      (False, 0.26, 0.5715734864417374, 0.009)])
def test_sparsepo_by_hand(common, h, loss, penalty):
    """KL_t(pi_ref || pi) as in TDPO: chosen [0.1, 0.3], rejected [0.2, 0.3, 0.5]; beta = 0.1.
    m^u: chosen [1, 0.5], rejected [0.5, 1, 0]: u_w = 1 + 0.5 = 1.5, u_l = -0.5 - 1 + 0 = -1.5, u = 3.0.
    common (m^d = m^u): c_w = -(0.1 + 0.15) = -0.25, c_l = -(0.1 + 0.3) = -0.4, d = 0.15,
      h = 0.1 * (3.0 - 0.15) = 0.285, loss = 0.5607661285081473;
      L1 (halved, common): 0.5 * (0.001 * 3.0 + 0.001 * 3.0) = 0.003.
    independent, m^d: chosen [0, 1], rejected [1, 0, 1]: c_w = -0.3, c_l = -0.7, d = 0.4,
      h = 0.1 * (3.0 - 0.4) = 0.26, loss = 0.5715734864417374; L1: 0.001 * 3.0 + 0.002 * 3.0 = 0.009."""
    m_u, m_d = pair([1, 0.5], [0.5, 1, 0]), pair([0, 1], [1, 0, 1])
    cols = {"mask": m_u} if common else {"mask_u": m_u, "mask_d": m_d}
    v = hand_view(ref_logps=REF, kl_ref_pi=pair([0.1, 0.3], [0.2, 0.3, 0.5]), token_values=cols)
    cfg = {"name": "sparsepo", "beta": 0.1, "masks": "given", "common": common,
           "l1_u": 0.001, "l1_d": 0.001 if common else 0.002}
    check(cfg, v, h, loss)
    assert build_prior(cfg).penalty(v).item() == pytest.approx(penalty, rel=1e-12)


def test_mi_dpo_prior_gradient_sign():
    """dJ/dlog zeta_w = +a*sigmoid(-h), dJ/dlog zeta_l = -a*sigmoid(-h); DPO example: a = 0.1, h = 0.3,
    sigmoid(-0.3) = 0.42555748318834097."""
    logz = torch.tensor([[-12.0], [-10.0]], dtype=torch.float64, requires_grad=True)
    from midpo_cli.loss import mi_dpo_loss
    mi_dpo_loss(torch.tensor([[-10.0], [-11.0]], dtype=torch.float64), logz, 0.1).sum().backward()
    s = 0.1 * 0.42555748318834097
    assert logz.grad[:, 0].tolist() == pytest.approx([s, -s], rel=1e-12)


# ----- MI-DPO == original on random ragged batches, every prior and option -----------------------

SETTINGS = [(n, opt) for n in sorted(PRIORS) for opt in PRIORS[n].options]


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name, opt", SETTINGS, ids=[f"{n}-{verify.option_text(o)}" for n, o in SETTINGS])
def test_unified_equals_original(name, opt, seed):
    p = random_probe(seed, B=3 + seed)
    prior = verify.checked_prior({"name": name, **opt})                           # eval: no mask dropout
    val, grad = verify.gaps(lambda: verify.unified(prior, view(p, prior.needs())),
                            lambda: verify.original(prior, view(p, prior.needs())), p.params)
    assert val <= 1e-10 and grad <= 1e-10
    grad = verify._grads(verify.unified(prior, view(p, prior.needs())), p.params)[0]
    assert grad.abs().max().item() > 1e-6                                          # a real gradient was compared


def test_undeclared_need_is_an_error():
    """A view built from needs() carries nothing else: TDPO without kl_ref_pi must fail loudly."""
    p = random_probe(0)
    tdpo = build_prior({"name": "tdpo"})
    with pytest.raises(ValueError, match="kl_ref_pi"):
        tdpo.log_prior(view(p, build_prior({"name": "dpo"}).needs()))


# ----- configs: every YAML against the registry -------------------------------------------------

YAMLS = sorted(p.stem for p in (CONF / "prior").glob("*.yaml"))


def test_yaml_files_equal_registry():
    assert set(YAMLS) == set(PRIORS)


@pytest.mark.parametrize("name", YAMLS)
def test_prior_yaml_composes_and_builds(name):
    with initialize_config_module(version_base="1.3", config_module="midpo_cli.conf"):
        cfg = compose("train", overrides=[f"prior={name}"])
    prior = build_prior(cfg.prior)
    assert type(prior) is PRIORS[name]
    values = OmegaConf.to_container(cfg.prior, resolve=True, enum_to_str=True)    # sparsepo's lr: ${optimizer.lr}
    assert values == {"name": name, **{k: str(v) if isinstance(v, int) and not isinstance(v, bool) and k == "variant"
                                       else v for k, v in prior.hyperparameters().items()}}
    assert prior.hyperparameters() == PRIORS[name]().hyperparameters()               # YAML keeps the defaults
    text = (CONF / "prior" / f"{name}.yaml").read_text().splitlines()
    keys = [ln for ln in text if ln and not ln.startswith((" ", "#", "-", "defaults"))]
    assert all("#" in ln for ln in keys), f"every key of {name}.yaml carries a comment"


# ----- a prior added from outside: registry, ConfigStore, YAML and verify pick it up -------------

def test_throwaway_prior_is_picked_up(tmp_path):
    """Two files' worth of prior (a class and a YAML), with a new per-token data column, a Literal option and a
    declared reduction: the registry, Hydra's ConfigStore (typed enum), compose and every verify check find it
    by themselves, with no other file touched."""
    import typing

    import torch.nn.functional as F

    @register_prior("throwaway_test")
    class Throwaway(midpo_cli.priors.Prior):
        """DPO with per-token salience weights s_t on the log-ratio (a made-up variant):
        log zeta = sum_t [(1 - s_t) log pi + s_t log pi_ref]; s = 1 is DPO."""
        beta: float = 0.2
        mode: typing.Literal["plain", "scaled"] = "plain"

        reductions = (midpo_cli.priors.Reduction({"beta": 0.1}, {"name": "dpo", "beta": 0.1},
                                                 columns={"salience": 1.0}),)

        @property
        def a(self):
            return self.beta * (2.0 if self.mode == "scaled" else 1.0)

        def needs(self):
            return midpo_cli.priors.Needs(reference=True, token_columns=("salience",))

        def log_prior(self, v):
            s = v.column("salience")
            return v.seq((1 - s) * v.logps + s * v.require("ref_logps"))

        def original_loss(self, v):
            d = v.seq(v.column("salience") * (v.logps - v.ref_logps))
            return -F.logsigmoid(self.a * (d[0] - d[1]))

    try:
        assert PRIORS["throwaway_test"] is Throwaway
        assert ConfigStore.instance().load("schema/prior/throwaway_test.yaml").node.beta == 0.2
        (tmp_path / "prior").mkdir()
        (tmp_path / "prior" / "throwaway_test.yaml").write_text(yaml.safe_dump(
            {"defaults": ["/schema/prior/throwaway_test@_here_", "_self_"], "name": "throwaway_test", "beta": 0.3}))
        (tmp_path / "root.yaml").write_text(yaml.safe_dump({"defaults": [{"prior": "throwaway_test"}, "_self_"]}))
        with initialize_config_dir(version_base="1.3", config_dir=str(tmp_path)):
            cfg = compose("root", overrides=["prior.mode=scaled"])
            built = build_prior(cfg.prior)
            assert type(built) is Throwaway and built.beta == 0.3 and built.mode == "scaled"
            with pytest.raises(Exception) as e:
                compose("root", overrides=["prior.mode=bogus"])                # typed enum, at compose time
            assert "expected one of [plain, scaled]" in chain(e.value)
        with pytest.raises(ValueError, match="not one of"):
            build_prior({"name": "throwaway_test", "mode": "bogus"})          # and in the Python API
        # verify's checks take the registry as it is: no list to edit, the new column is generated
        rows = verify.collect(OmegaConf.create({"seed": 0, "priors": [], "real_model": False, "smollm2": False,
                                                "trl": False, "atol": 1e-10}))
        mine = [r for r in rows if r["prior"] == "throwaway_test"]
        checks = {r["check"] for r in mine}
        assert any(c.startswith("MI-DPO == original") for c in checks) and "knob beta changes loss or grad" in checks
        assert "reduction: == dpo (beta=0.1)" in checks
        assert all(r["passed"] for r in mine), [r for r in mine if not r["passed"]]
    finally:
        midpo_cli.priors.unregister_prior("throwaway_test")
    assert "throwaway_test" not in PRIORS


def test_a_wrong_declared_reduction_fails_verify():
    """The reduction check can fail: TIS-DPO's weights at 0.5 are not DPO."""
    from midpo_cli.priors.tisdpo import TISDPO
    from midpo_cli.verify.checks import Rows, reductions
    old = TISDPO.reductions
    TISDPO.reductions = (midpo_cli.priors.Reduction({"weights": "given"}, {"name": "dpo"}, columns={"weights": 0.5}),)
    try:
        rows = Rows()
        reductions(rows, random_probe(0), ["tisdpo"], 1e-10)
    finally:
        TISDPO.reductions = old
    assert rows and not any(r["passed"] for r in rows)


def test_duplicate_prior_name_is_an_error():
    with pytest.raises(ValueError, match="registered twice"):
        @register_prior("dpo")
        class AnotherDPO(midpo_cli.priors.Prior):
            beta: float = 0.1
    assert PRIORS["dpo"].__module__ == "midpo_cli.priors.dpo"


def test_learnable_priors_and_only_they_are_named_learned():
    """The fixed-prior preset (+experiment=all_priors) excludes `learned_*` by name: a learnable prior under another
    name would join the fixed-prior comparison unnoticed, a fixed one named learned_* would drop out of it. (A published
    prior with a setting that learns, SparsePO's masks=learned, is learnable per instance, not per class: it stays.)"""
    named = {n for n in PRIORS if n.startswith("learned_")}
    assert named == {n for n, cls in PRIORS.items() if cls.learnable}
    assert "exclude=learned_*" in (Path(__file__).resolve().parents[1] / "conf/experiment/all_priors.yaml").read_text()


@pytest.mark.parametrize("override, words", [("prior=hdpo prior.form=fixd", "fixed, policy"),
                                             ("prior=tdpo prior.variant=3", "1, 2"),
                                             ("prior=rdpo prior.sign=*", "+, -")])
def test_prior_options_are_checked_when_composing(override, words):
    with initialize_config_module(version_base="1.3", config_module="midpo_cli.conf"):
        with pytest.raises(Exception) as e:
            compose("train", overrides=override.split())
    assert f"expected one of [{words}]" in chain(e.value)


def chain(exc) -> str:
    """The messages of an exception and its causes (Hydra wraps OmegaConf's validation error)."""
    out = []
    while exc is not None:
        out.append(str(exc))
        exc = exc.__cause__ or exc.__context__
    return " | ".join(out)
