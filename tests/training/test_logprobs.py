"""Per-sequence log-probs (``personalm.training.logprobs``): every expected number derived by hand in the
test's docstring and checked with ``torch.testing.assert_close``."""

import math

import torch
from torch.testing import assert_close

from personalm.data.encoding import IGNORE_INDEX
from personalm.training.logprobs import response_start, sequence_logprobs

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


def test_response_start_keeps_every_scored_position():
    """Rows labelled from positions 3 and 5 (and one row with no label): logits are needed from
    position 2 on (position 2 predicts label 3), and slicing there changes nothing."""
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
