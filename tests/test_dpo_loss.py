"""DPO math (``personalm.dpo_loss``), torchtune style: every expected number is derived by hand in the
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

from personalm.dpo_loss import check_dpo_args, dpo_loss, sequence_logprobs
from personalm.encoding import IGNORE_INDEX

LN2, LN3, LN6 = math.log(2), math.log(3), math.log(6)
M = IGNORE_INDEX

# rows of logits over a vocabulary of 3 whose softmax is easy to write down
HALF_QUARTERS = [LN2, 0.0, 0.0]  # exp -> [2, 1, 1] / 4 -> p = [1/2, 1/4, 1/4]
HALF_SIXTH_THIRD = [LN3, 0.0, LN2]  # exp -> [3, 1, 2] / 6 -> p = [1/2, 1/6, 1/3]
UNIFORM = [0.0, 0.0, 0.0]  # p = [1/3, 1/3, 1/3]


def _hand_batch():
    """Three sequences of length 4 over a vocabulary of 3.

    seq 0: labels [M, M, 2, 0] (2 prompt tokens, 2 response tokens, no padding)
    seq 1: labels [M, 1, M, M] (1 prompt token, 1 response token, 2 padding)
    seq 2: labels [M, M, M, M] (no labelled token at all)
    """
    logits = torch.tensor([
        [UNIFORM, HALF_SIXTH_THIRD, HALF_QUARTERS, UNIFORM],
        [HALF_SIXTH_THIRD, UNIFORM, UNIFORM, UNIFORM],
        [UNIFORM, UNIFORM, UNIFORM, UNIFORM],
    ])
    labels = torch.tensor([[M, M, 2, 0], [M, 1, M, M], [M, M, M, M]])
    return logits, labels


# ----------------------------------------------------------------------------------- sequence_logprobs


def test_sequence_logprobs_hand_derived():
    """Logits at position t predict the label at t+1.

    seq 0: label[2] = 2 is predicted by logits[1] = [ln3, 0, ln2]: p = 2/6 = 1/3 -> -ln 3;
           label[3] = 0 is predicted by logits[2] = [ln2, 0, 0]: p = 2/4 = 1/2 -> -ln 2.
           sum = -ln 3 - ln 2 = -ln 6, tokens = 2, mean = -ln 6 / 2.
    seq 1: label[1] = 1 is predicted by logits[0] = [ln3, 0, ln2]: p = 1/6 -> -ln 6.
           sum = -ln 6, tokens = 1, mean = -ln 6.
    seq 2: nothing labelled: sum = 0, tokens = 0, mean = 0 (not 0/0 = NaN).
    (Unshifted, seq 0 would read p(2) under [ln2, 0, 0] = 1/4 and p(0) under uniform = 1/3: different.)
    """
    logits, labels = _hand_batch()
    out = sequence_logprobs(logits, labels)
    assert_close(out.sum, torch.tensor([-LN6, -LN6, 0.0]))
    assert_close(out.mean, torch.tensor([-LN6 / 2, -LN6, 0.0]))
    assert out.tokens.tolist() == [2, 1, 0]
    assert not torch.isnan(out.mean).any()


def test_sequence_logprobs_first_label_has_no_prefix():
    """The label at position 0 is never scored (no logits predict it), even when it is not ignored.

    labels [0, 1] with logits [[ln3, 0, ln2], anything]: only label[1] = 1 counts, predicted by
    logits[0]: p = 1/6 -> sum = -ln 6, tokens = 1, mean = -ln 6.
    """
    logits = torch.tensor([[HALF_SIXTH_THIRD, [5.0, -7.0, 1.0]]])
    labels = torch.tensor([[0, 1]])
    out = sequence_logprobs(logits, labels)
    assert_close(out.sum, torch.tensor([-LN6]))
    assert_close(out.mean, torch.tensor([-LN6]))
    assert out.tokens.tolist() == [1]


def test_masked_positions_contribute_nothing():
    """Logits that predict a prompt/padding label (or nothing: the last position) may be anything.

    seq 0 is scored by logits[1] and logits[2] only: scramble logits[0] and logits[3].
    seq 1 is scored by logits[0] only: scramble logits[1..3].
    seq 2 is scored by nothing: scramble it all. The result must be the hand-derived one unchanged.
    """
    logits, labels = _hand_batch()
    expected = sequence_logprobs(logits, labels)
    scrambled = logits.clone()
    gen = torch.Generator().manual_seed(0)
    noise = lambda *shape: 50 * torch.randn(*shape, generator=gen)  # noqa: E731
    scrambled[0, [0, 3]] = noise(2, 3)
    scrambled[1, 1:] = noise(3, 3)
    scrambled[2] = noise(4, 3)
    out = sequence_logprobs(scrambled, labels)
    assert_close(out.sum, expected.sum)
    assert_close(out.mean, expected.mean)
    assert_close(out.sum, torch.tensor([-LN6, -LN6, 0.0]))


def test_non_finite_logit_at_a_masked_position_contributes_nothing():
    """Same as ``test_masked_positions_contribute_nothing`` with a suppressed token (logit -inf, as a
    logits processor or a padded vocabulary slot leaves it) at masked positions: seq 0's logits[0] and
    seq 1's logits[2] get -inf for token 0. Nothing scored changes: sums [-ln 6, -ln 6, 0] as derived in
    ``test_sequence_logprobs_hand_derived``, no NaN.
    """
    logits, labels = _hand_batch()
    logits[0, 0, 0] = float("-inf")
    logits[1, 2, 0] = float("-inf")
    out = sequence_logprobs(logits, labels)
    assert_close(out.sum, torch.tensor([-LN6, -LN6, 0.0]))
    assert_close(out.mean, torch.tensor([-LN6 / 2, -LN6, 0.0]))


def test_logits_predicting_a_labelled_token_matter():
    """Changing logits[1] of seq 0 (it predicts label[2] = 2) from [ln3, 0, ln2] to [0, 0, ln2]:
    exp -> [1, 1, 2] / 4, p(2) = 1/2, so that token's log-prob goes from -ln 3 to -ln 2.
    seq 0: sum = -ln 2 - ln 2 = -2 ln 2, mean = -ln 2. seq 1 and seq 2 unchanged.
    """
    logits, labels = _hand_batch()
    logits[0, 1] = torch.tensor([0.0, 0.0, LN2])
    out = sequence_logprobs(logits, labels)
    assert_close(out.sum, torch.tensor([-2 * LN2, -LN6, 0.0]))
    assert_close(out.mean, torch.tensor([-LN2, -LN6, 0.0]))


def test_sequence_logprobs_is_fp32_from_bf16_logits():
    """bf16 logits give fp32 sums, equal (to fp32 precision) to the log-softmax of the very same bf16
    values computed in fp64. A log-softmax in bf16 would be off by ~2^-8 relative per token
    (~1e-2 on log-probs near -4), i.e. ~0.1 or more on a 63-token sum: far outside 1e-4.
    """
    gen = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(2, 64, 50, generator=gen)).to(torch.bfloat16)
    labels = torch.randint(0, 50, (2, 64), generator=gen)
    labels[:, :5] = M  # prompt
    labels[1, 40:] = M  # padding
    out = sequence_logprobs(logits, labels)
    assert out.sum.dtype == torch.float32 and out.mean.dtype == torch.float32

    ref_logps = torch.log_softmax(logits.double()[:, :-1], -1)
    tgt = labels[:, 1:]
    keep = tgt != M
    tok = torch.gather(ref_logps, 2, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1) * keep
    ref_sum = tok.sum(-1)
    assert_close(out.sum, ref_sum.float(), rtol=1e-5, atol=1e-4)
    assert_close(out.mean, (ref_sum / keep.sum(-1)).float(), rtol=1e-5, atol=1e-5)
    assert out.tokens.tolist() == [63 - 4, 39 - 4]


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


def test_response_start_keeps_every_scored_position():
    """Rows labelled from positions 3 and 5 (and one row with no label): logits are needed from
    position 2 on (position 2 predicts label 3), and slicing there changes nothing."""
    from personalm.dpo_loss import response_start

    labels = torch.full((3, 8), -100)
    labels[0, 3:6] = torch.tensor([4, 1, 2])
    labels[1, 5:8] = torch.tensor([0, 3, 3])
    assert response_start(labels) == 2
    assert response_start(torch.full((2, 4), -100)) == 0
    logits = torch.randn(3, 8, 6)
    whole, sliced = sequence_logprobs(logits, labels), sequence_logprobs(logits[:, 2:], labels[:, 2:])
    assert_close(sliced.sum, whole.sum)
    assert_close(sliced.mean, whole.mean)
    assert torch.equal(sliced.tokens, whole.tokens)
