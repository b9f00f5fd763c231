"""The MI-DPO objective in loss.py against numbers derived by hand."""
import math

import torch

from midpo_cli.loss import mi_dpo_logits, mi_dpo_loss, pair_metrics


def test_dpo_by_hand():
    """DPO prior (zeta = pi_ref), a = beta = 0.1.

    pair 1: log pi_w=-10, log ref_w=-12, log pi_l=-11, log ref_l=-10
            h = 0.1*((-10+12) - (-11+10)) = 0.1*(2+1) = 0.3;  J = log(1+e^-0.3) = 0.554355...
    pair 2: log pi_w=-5, ref_w=-5, log pi_l=-7, ref_l=-6
            h = 0.1*(0 - (-1)) = 0.1;  J = log(1+e^-0.1) = 0.644397...
    """
    logps = torch.tensor([[-10.0, -5.0], [-11.0, -7.0]])
    ref = torch.tensor([[-12.0, -5.0], [-10.0, -6.0]])
    h = mi_dpo_logits(logps, ref, 0.1)
    assert torch.allclose(h, torch.tensor([0.3, 0.1]), atol=1e-6)
    losses = mi_dpo_loss(logps, ref, 0.1)
    assert abs(losses[0].item() - math.log1p(math.exp(-0.3))) < 1e-6
    assert abs(losses[0].item() - 0.5543552) < 1e-6
    assert abs(losses[1].item() - 0.6443967) < 1e-6


def test_metrics_by_hand():
    """rewards = a*(log pi - log zeta): pair 1 chosen 0.1*2=0.2, rejected 0.1*-1=-0.1 -> margin 0.3, correct;
    pair 2 chosen 0, rejected -0.1 -> margin 0.1, correct. Means: chosen 0.1, rejected -0.1, margin 0.2."""
    logps = torch.tensor([[-10.0, -5.0], [-11.0, -7.0]])
    ref = torch.tensor([[-12.0, -5.0], [-10.0, -6.0]])
    m = pair_metrics(logps, ref, 0.1, mi_dpo_loss(logps, ref, 0.1))
    assert abs(m["rewards/chosen"] - 0.1) < 1e-6 and abs(m["rewards/rejected"] + 0.1) < 1e-6
    assert abs(m["rewards/margins"] - 0.2) < 1e-6 and m["rewards/accuracies"] == 1.0
    assert m["logps/chosen"] == -7.5 and m["logps/rejected"] == -9.0
    assert abs(m["loss"] - (0.5543552 + 0.6443967) / 2) < 1e-6


def test_prior_gradient_sign():
    """dJ/dlog zeta_w = +a*sigmoid(-h), dJ/dlog zeta_l = -a*sigmoid(-h) (docs/priors.md)."""
    logps = torch.tensor([[-3.0], [-4.0]])
    zeta = torch.tensor([[-3.5], [-3.0]], requires_grad=True)
    a = 0.5
    mi_dpo_loss(logps, zeta, a).sum().backward()
    h = a * ((-3.0 + 3.5) - (-4.0 + 3.0))
    s = 1 / (1 + math.exp(h))
    assert abs(zeta.grad[0, 0].item() - a * s) < 1e-6 and abs(zeta.grad[1, 0].item() + a * s) < 1e-6
