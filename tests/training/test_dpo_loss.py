"""DPO losses (``personalm.training.dpo_loss``), torchtune style: every expected number is derived by hand in the
test's docstring and checked with ``torch.testing.assert_close``.

Facts used (Rafailov et al. 2023, arXiv 2305.18290): with h = (pi_w - ref_w) - (pi_l - ref_l),

    sigmoid          : -log sigmoid(beta h) = log(1 + exp(-beta h))
    conservative DPO : -(1 - e) log sigmoid(beta h) - e log sigmoid(-beta h)
    ipo              : (h - 1 / (2 beta))^2
    hinge            : max(0, 1 - beta h)

and the implicit reward r(y) = beta (log pi(y) - log ref(y)), detached.
"""

import math

import pytest
import torch
from torch.testing import assert_close

from personalm.training.dpo_loss import check_dpo_args, dpo_loss

LN2, LN3, LN6 = math.log(2), math.log(3), math.log(6)


# ----------------------------------------------------------------------------------------- dpo_loss

# h = (pc - rc) - (pr - rr) for four pairs: [4, 2, 0, -2]
PC = torch.tensor([-2.0, -2.0, -5.0, -6.0])  # policy chosen
RC = torch.tensor([-4.0, -3.0, -5.0, -5.0])  # reference chosen:   pc - rc = [ 2,  1, 0, -1]
PR = torch.tensor([-9.0, -4.0, -7.0, -3.0])  # policy rejected
RR = torch.tensor([-7.0, -3.0, -7.0, -4.0])  # reference rejected: pr - rr = [-2, -1, 0,  1]


def softplus(x):
    return math.log1p(math.exp(x))


def test_sigmoid_loss_hand_derived():
    """beta = 0.5, h = [4, 2, 0, -2], beta h = [2, 1, 0, -1].
    loss = -log sigmoid(beta h) = log(1 + exp(-beta h)) = [log(1+e^-2), log(1+e^-1), ln 2, log(1+e)].
    rewards: chosen = 0.5 * [2, 1, 0, -1] = [1, 0.5, 0, -0.5]; rejected = 0.5 * [-2, -1, 0, 1].
    """
    losses, chosen, rejected = dpo_loss(PC, PR, RC, RR, beta=0.5, loss_type="sigmoid")
    assert_close(losses, torch.tensor([softplus(-2), softplus(-1), LN2, softplus(1)]))
    assert_close(chosen, torch.tensor([1.0, 0.5, 0.0, -0.5]))
    assert_close(rejected, torch.tensor([-1.0, -0.5, 0.0, 0.5]))


def test_default_is_sigmoid_with_beta_0_1():
    """Defaults: beta 0.1, sigmoid. h = [4, 2, 0, -2], beta h = [0.4, 0.2, 0, -0.2]:
    loss = [log(1+e^-0.4), log(1+e^-0.2), ln 2, log(1+e^0.2)], chosen reward = 0.1 * [2, 1, 0, -1].
    """
    losses, chosen, rejected = dpo_loss(PC, PR, RC, RR)
    assert_close(losses, torch.tensor([softplus(-0.4), softplus(-0.2), LN2, softplus(0.2)]))
    assert_close(chosen, torch.tensor([0.2, 0.1, 0.0, -0.1]))
    assert_close(rejected, torch.tensor([-0.2, -0.1, 0.0, 0.1]))


def test_conservative_dpo_hand_derived():
    """beta = 0.5, e = 0.2, beta h = [2, 1, 0, -1]:
    loss = 0.8 log(1 + e^-x) + 0.2 log(1 + e^x) for x = beta h:
      x = 2 : 0.8 log(1+e^-2) + 0.2 log(1+e^2)
      x = 1 : 0.8 log(1+e^-1) + 0.2 log(1+e)
      x = 0 : 0.8 ln 2 + 0.2 ln 2 = ln 2
      x = -1: 0.8 log(1+e)    + 0.2 log(1+e^-1)
    Rewards do not depend on e.
    """
    losses, chosen, rejected = dpo_loss(PC, PR, RC, RR, beta=0.5, loss_type="sigmoid", label_smoothing=0.2)
    expected = [0.8 * softplus(-x) + 0.2 * softplus(x) for x in (2.0, 1.0, 0.0, -1.0)]
    assert_close(losses, torch.tensor(expected))
    assert_close(losses[2], torch.tensor(LN2))
    assert_close(chosen, torch.tensor([1.0, 0.5, 0.0, -0.5]))
    assert_close(rejected, torch.tensor([-1.0, -0.5, 0.0, 0.5]))


def test_ipo_loss_hand_derived():
    """beta = 0.25, so 1 / (2 beta) = 2; h = [4, 2, 0, -2]:
    loss = (h - 2)^2 = [4, 0, 4, 16]. (With 1/beta = 4 it would be [0, 4, 16, 36].)
    rewards = 0.25 * [2, 1, 0, -1] and 0.25 * [-2, -1, 0, 1].
    """
    losses, chosen, rejected = dpo_loss(PC, PR, RC, RR, beta=0.25, loss_type="ipo")
    assert_close(losses, torch.tensor([4.0, 0.0, 4.0, 16.0]))
    assert_close(chosen, torch.tensor([0.5, 0.25, 0.0, -0.25]))
    assert_close(rejected, torch.tensor([-0.5, -0.25, 0.0, 0.25]))


def test_hinge_loss_hand_derived():
    """beta = 0.5, h = [4, 2, 0, -2], 1 - beta h = [-1, 0, 1, 2]; max(0, .) = [0, 0, 1, 2]."""
    losses, chosen, rejected = dpo_loss(PC, PR, RC, RR, beta=0.5, loss_type="hinge")
    assert_close(losses, torch.tensor([0.0, 0.0, 1.0, 2.0]))
    assert_close(chosen, torch.tensor([1.0, 0.5, 0.0, -0.5]))
    assert_close(rejected, torch.tensor([-1.0, -0.5, 0.0, 0.5]))


def test_policy_equal_reference_gives_ln2():
    """policy == reference: h = 0 for every pair whatever the log-probs, loss = -log sigmoid(0) = ln 2
    for any beta; rewards are 0."""
    logps_w = torch.tensor([-3.0, -120.5, -0.25])
    logps_l = torch.tensor([-7.0, -80.0, -1.5])
    for beta in (0.01, 0.1, 2.0):
        losses, chosen, rejected = dpo_loss(logps_w, logps_l, logps_w.clone(), logps_l.clone(), beta=beta)
        assert_close(losses, torch.full((3,), LN2))
        assert_close(chosen, torch.zeros(3))
        assert_close(rejected, torch.zeros(3))


def test_rewards_are_detached():
    """Inputs that require grad give rewards that do not (logging must not keep the graph alive), while
    the losses do."""
    inputs = [t.clone().requires_grad_(True) for t in (PC, PR, RC, RR)]
    for loss_type in ("sigmoid", "ipo", "hinge"):
        losses, chosen, rejected = dpo_loss(*inputs, beta=0.5, loss_type=loss_type)
        assert losses.requires_grad
        assert not chosen.requires_grad and not rejected.requires_grad
        assert chosen.grad_fn is None and rejected.grad_fn is None
        assert_close(chosen, torch.tensor([1.0, 0.5, 0.0, -0.5]))


def test_sigmoid_gradient_raises_chosen_and_lowers_rejected():
    """L = -log sigmoid(beta h), dL/dh = -beta sigmoid(-beta h). With h = pc - rc - pr + rr:
    dL/dpc = -beta sigmoid(-beta h) < 0, dL/dpr = +beta sigmoid(-beta h) > 0, and the reference
    gradients are the opposite. At beta = 0.5, h = [4, 2, 0, -2], beta h = [2, 1, 0, -1]:
    dL/dpc = -0.5 sigmoid([-2, -1, 0, 1]); at h = 0 that is -0.25.
    So a gradient-descent step raises the chosen log-prob and lowers the rejected one.
    """
    pc, pr, rc, rr = (t.clone().requires_grad_(True) for t in (PC, PR, RC, RR))
    losses, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.5)
    losses.sum().backward()
    expected = -0.5 * torch.sigmoid(-torch.tensor([2.0, 1.0, 0.0, -1.0]))
    assert_close(pc.grad, expected)
    assert_close(pr.grad, -expected)
    assert_close(rc.grad, -expected)
    assert_close(rr.grad, expected)
    assert_close(pc.grad[2], torch.tensor(-0.25))
    assert (pc.grad < 0).all() and (pr.grad > 0).all()


# -------------------------------------------------------------------------------------- bad settings


@pytest.mark.parametrize("beta", [0.0, -0.1, -1.0, float("nan")])
def test_beta_must_be_positive(beta):
    with pytest.raises(ValueError, match="beta"):
        check_dpo_args(beta, "sigmoid", 0.0)
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(PC, PR, RC, RR, beta=beta)


@pytest.mark.parametrize("loss_type", ["kto", "dpo", "SIGMOID", "", "robust"])
def test_unknown_loss_type(loss_type):
    with pytest.raises(ValueError, match="loss_type"):
        check_dpo_args(0.1, loss_type, 0.0)
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(PC, PR, RC, RR, loss_type=loss_type)


@pytest.mark.parametrize("label_smoothing", [-0.01, -1.0, 0.5, 0.7, 1.0, float("nan")])
def test_label_smoothing_range(label_smoothing):
    with pytest.raises(ValueError, match="label_smoothing"):
        check_dpo_args(0.1, "sigmoid", label_smoothing)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(PC, PR, RC, RR, loss_type="sigmoid", label_smoothing=label_smoothing)


@pytest.mark.parametrize("loss_type", ["ipo", "hinge"])
def test_label_smoothing_only_with_sigmoid(loss_type):
    with pytest.raises(ValueError, match="label_smoothing"):
        check_dpo_args(0.1, loss_type, 0.1)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(PC, PR, RC, RR, loss_type=loss_type, label_smoothing=0.1)


@pytest.mark.parametrize("beta,loss_type,label_smoothing", [
    (0.1, "sigmoid", 0.0), (1e-6, "sigmoid", 0.0), (0.1, "sigmoid", 0.49), (0.5, "ipo", 0.0),
    (3.0, "hinge", 0.0)])
def test_valid_settings_pass(beta, loss_type, label_smoothing):
    check_dpo_args(beta, loss_type, label_smoothing)
    losses, _, _ = dpo_loss(PC, PR, RC, RR, beta=beta, loss_type=loss_type, label_smoothing=label_smoothing)
    assert losses.shape == (4,) and torch.isfinite(losses).all()
