"""SparsePO's learned masks (prior.masks=learned, the default): mask heads on the reference's hidden states of every
layer, trained with the policy by the prior's own optimiser. They start at m = 1 (TDPO1), every head parameter gets a
gradient, weight decay acts on the heads' weights, and a run trains, checkpoints, resumes exactly and saves prior/."""
import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from midpo_cli.__main__ import main
from midpo_cli.config import register_schemas
from midpo_cli.engine.forward import pair_view
from midpo_cli.engine.views import layer_means, layer_states, live_reference
from midpo_cli.loss import preference_loss
from midpo_cli.priors import PRIORS, Needs, build_prior
from midpo_cli.recipe import prior_optimizer
from midpo_cli.verify.batches import tiny_engine_setup

CONF = Path(__file__).resolve().parents[1] / "conf"
register_schemas()


def compose_train(overrides):
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        return compose("train", overrides=overrides)


def test_default_sparsepo_learns_its_masks_and_only_that_setting_learns():
    prior = build_prior(compose_train(["prior=sparsepo"]).prior)
    assert prior.masks == "learned" and prior.learnable and prior.lr == pytest.approx(5e-5)   # the policy's lr
    assert prior.initial_equivalent() == {"name": "tdpo", "variant": 1, "beta": 0.1}
    assert not build_prior({"name": "sparsepo", "masks": "activation"}).learnable
    assert not PRIORS["sparsepo"].learnable              # the class: not every setting learns (arms, learned_* names)


def test_hidden_states_are_declared_label_aligned_and_keep_the_reference_live():
    hs = tuple(torch.randn(2, 6, 8) for _ in range(4))                    # embeddings + 3 layers, [N, S, H]
    assert layer_states(hs).shape == (2, 5, 3, 8)
    assert torch.allclose(layer_states(hs).mean(-1), layer_means(hs))     # position t+1, as MaPO's activations
    assert Needs(ref_hidden=True).reference_model and live_reference(Needs(ref_hidden=True), cached=True)
    policy, reference, batch = tiny_engine_setup(0)
    dpo = build_prior({"name": "dpo"})
    assert pair_view(batch, policy, dpo, reference=reference).ref_hidden is None    # only when declared


@pytest.mark.parametrize("common", [True, False])
def test_masks_start_at_one_and_every_head_parameter_gets_a_gradient(common):
    """Documented start (docs/priors.md): w_l = 0, b_l = 1, c_l = 1/L, so m = 1 on every completion token and the
    loss is TDPO1's. At step 1 the policy is the reference, so J's gradient into the masks is 0 (to rounding); once the
    policy has moved, one backward reaches every head parameter (weights at 0 included)."""
    policy, reference, batch = tiny_engine_setup(0)
    prior = build_prior({"name": "sparsepo", "common": common}).eval()   # eval: no dropout
    prior.attach(policy, reference)
    prior.to(torch.float64)
    assert {n: tuple(p.shape) for n, p in prior.named_parameters()} == {
        f"heads.{h}.{k}": s for h in (("m",) if common else ("u", "d"))
        for k, s in (("weight", (2, 64)), ("bias", (2,)), ("mixer", (2,)))}           # tiny model: L = 2, H = 64
    tdpo = build_prior({"name": "tdpo", "variant": 1})
    for moved in (False, True):
        if moved:
            with torch.no_grad():
                for w in policy.parameters():
                    w.add_(0.05 * torch.randn_like(w))
        view = pair_view(batch, policy, prior, reference=reference)
        on = view.mask > 0
        assert all(torch.equal(m[on], torch.ones_like(m[on])) for m in prior.mask_pair(view))
        out = preference_loss(prior, view)
        tdpo_loss = preference_loss(tdpo, pair_view(batch, policy, tdpo, reference=reference)).loss
        assert abs(float((out.loss - tdpo_loss).detach())) < 1e-12
        grads = torch.autograd.grad(out.total, prior.trainable())
        biggest = [float(g.abs().max()) for g in grads]
        assert all(b > 1e-8 for b in biggest) if moved else all(b < 1e-15 for b in biggest), biggest


@pytest.mark.parametrize("decay", [0.01, 0.0])
def test_mask_weight_decay_shrinks_the_head_weights(decay):
    """The recipe's prior optimiser (AdamW from the optimizer config, prior.lr): with a zero gradient, the heads'
    weights w_l and c_l shrink by lr * mask_weight_decay per step (decoupled); the biases never decay."""
    cfg = compose_train(["prior=sparsepo", "prior.lr=0.1", f"prior.mask_weight_decay={decay}"])
    prior = build_prior(cfg.prior)
    policy, reference, _ = tiny_engine_setup(0)
    prior.attach(policy, reference)
    head = prior.heads["m"]
    with torch.no_grad():
        head.weight.fill_(1.0)
        head.mixer.fill_(1.0)
    for p in prior.trainable():
        p.grad = torch.zeros_like(p)
    opt = prior_optimizer(cfg.optimizer, prior)
    opt.step()
    shrunk = 1.0 - 0.1 * decay
    assert torch.allclose(head.weight, torch.full_like(head.weight, shrunk))
    assert torch.allclose(head.mixer, torch.full_like(head.mixer, shrunk))
    assert torch.equal(head.bias, torch.ones_like(head.bias))


def _rows(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_learned_mask_run_checkpoints_resumes_exactly_and_saves_the_prior(tmp_path, fast):
    """10 steps of `train prior=sparsepo prior.masks=learned`; a second run resumed from the step-5 checkpoint (heads,
    their optimiser, dropout's RNG) logs the same steps 6-10 and saves the same heads in prior/."""
    from safetensors.torch import load_file
    args = [*fast, "prior=sparsepo", "prior.masks=learned", "prior.lr=0.01", "trainer.max_steps=10",
            "trainer.save_every=5", "trainer.save_model=false"]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    main(["train", *args, f"hydra.run.dir={full}"])
    assert (full / "checkpoints" / "step-5" / "prior.safetensors").exists()
    main(["train", *args, f"trainer.resume={full / 'checkpoints' / 'step-5'}", f"hydra.run.dir={resumed}"])
    a, b = _rows(full), _rows(resumed)
    assert [r["step"] for r in b] == list(range(1, 11)) and json.loads((resumed / "results.json").read_text())[
        "resumed_from"].endswith("step-5")
    for x, y in zip(a[5:], b[5:]):
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-6) and x["prior/mask_mean"] == pytest.approx(
            y["prior/mask_mean"], abs=1e-6)
    saved = [load_file(str(d / "prior" / "prior.safetensors")) for d in (full, resumed)]
    assert sorted(saved[0]) == ["heads.m.bias", "heads.m.mixer", "heads.m.weight"]
    assert all(torch.allclose(saved[0][k], saved[1][k], atol=1e-6) for k in saved[0])
    assert float(saved[0]["heads.m.weight"].abs().max()) > 0                        # the heads learned
    assert json.loads((full / "prior" / "prior.json").read_text())["masks"] == "learned"
    assert "prior/grad_norm" in a[-1] and "prior/mask_zero" in a[-1]


@pytest.mark.parametrize("override, words", [
    ("prior.mask_dropout=1.5", ["prior.mask_dropout=1.5", "[0, 1)"]),
    ("prior.mask_weight_decay=-0.1", ["prior.mask_weight_decay=-0.1", ">= 0"]),
    ("prior.masks=learnt", ["prior.masks='learnt'", "learned, activation, given"]),
])
def test_bad_learned_mask_settings_are_one_line(override, words, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "prior=sparsepo", override, f"hydra.run.dir={tmp_path / 'r'}"])
    err = capsys.readouterr().err
    assert e.value.code == 1 and all(w in err for w in words), err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_experiment_preset_is_one_learned_mask_run(capsys):
    main(["train", "--cfg", "job", "+experiment=sparsepo"])
    out = capsys.readouterr().out
    assert "name: sparsepo" in out and "masks: learned" in out and "l1_u: 0.001" in out and "max_steps: 150" in out


def test_verify_checks_the_mask_heads_gradient_and_catches_a_cut_one(monkeypatch):
    """verify's learned-mask rows: both forms give the heads the same, non-zero gradient; a written form whose masks
    carry no gradient (value unchanged) fails the row."""
    from midpo_cli.priors.sparsepo import MaskHead
    from midpo_cli.verify import checks
    from midpo_cli.verify.batches import random_probe

    def rows():
        out = checks.Rows()
        checks.equivalence(out, random_probe(0), ["sparsepo"], 1e-10)
        return {(r["option"], r["check"].rsplit(": ", 1)[0]): r["passed"] for r in out if "learned" in r["option"]}
    ok = rows()
    assert len(ok) == 6 and all(ok.values()), ok                          # 2 settings x (J, heads ==, heads != 0)
    monkeypatch.setattr(MaskHead, "written", lambda self, h: MaskHead.forward(self, h).detach())
    cut = rows()
    assert [k for k, v in cut.items() if not v] == [(o, "learned-mask gradient: MI-DPO == original") for o in
                                                    ("masks=learned, common=True", "masks=learned, common=False")]
