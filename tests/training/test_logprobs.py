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


# ------------------------------------------------------------- packed rows and chunked head on a real model
import pytest  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from personalm.data.collate import collate_preference, collate_sft  # noqa: E402
from personalm.training.dpo_loss import PairLogps, pair_losses  # noqa: E402
from personalm.training.logprobs import model_logprobs, sequence_logps, token_logps  # noqa: E402

# (prompt, chosen, rejected) lengths: a long post with short answers, an empty answer (a response cut to
# nothing by the length limit), one-token answers, a long cut answer, a prompt-only row, no prompt at all
SHAPES = [(30, 2, 9), (12, 0, 5), (25, 1, 1), (6, 40, 3), (18, 7, 0), (0, 4, 3), (9, 1, 14)]


def llama(attn: str, vocab: int = 500) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256, attn_implementation=attn)
    return LlamaForCausalLM(cfg).float()


def pair_rows(shapes=SHAPES, vocab: int = 500) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    ids = lambda n: torch.randint(3, vocab, (n,), generator=g).tolist()  # noqa: E731
    return [{"prompt_ids": ids(p), "chosen_ids": ids(c), "rejected_ids": ids(r), "community": "r/x", "index": i}
            for i, (p, c, r) in enumerate(shapes)]


def forwarded(model, fn):
    """What ``fn`` runs through the model: the input ids' shape of each forward."""
    shapes = []
    handle = model.get_input_embeddings().register_forward_pre_hook(lambda _m, a: shapes.append(tuple(a[0].shape)))
    try:
        return fn(), shapes
    finally:
        handle.remove()


def grads(model, loss) -> dict:
    model.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("budget", [None, 96])
def test_prefix_shared_packed_pairs_equal_the_padded_pairs(attn, budget):
    """Log-probs, DPO losses and gradients of prefix-shared (and packed) pairs == two padded rows per pair,
    fp32; the shared path really ran: one span per pair, fewer tokens forwarded."""
    model = llama(attn)
    batch = collate_preference(pair_rows(), pad_id=0, pair_packing="prefix_shared", pack_tokens=budget)
    padded = {k: v for k, v in batch.items() if k != "packed"}
    old, old_shapes = forwarded(model, lambda: model_logprobs(model, padded))
    new, new_shapes = forwarded(model, lambda: sequence_logps(model, batch, chunk=16))
    assert old_shapes == [(14, 46)] and new_shapes == [tuple(batch["packed"]["input_ids"].shape)]
    assert new_shapes[0][0] * new_shapes[0][1] < 14 * 46
    assert batch["packed"]["tokens"] < int(padded["attention_mask"].sum())
    assert_close(new.sum, old.sum, atol=1e-5, rtol=1e-6)
    assert_close(new.mean, old.mean, atol=1e-5, rtol=0)
    assert new.tokens.tolist() == old.tokens.tolist() == [2, 0, 1, 40, 7, 3, 1, 9, 5, 1, 3, 0, 2, 14]
    ref = PairLogps.from_sequences(old, 7)  # any fixed reference: the losses' graphs run through the policy
    ref = PairLogps(*(t.detach() - 0.3 for t in ref))
    loss_old = pair_losses(PairLogps.from_sequences(model_logprobs(model, padded), 7), ref, 0.1, "sigmoid", 0.0)
    loss_new = pair_losses(PairLogps.from_sequences(sequence_logps(model, batch, 16), 7), ref, 0.1, "sigmoid", 0.0)
    assert_close(loss_new.losses, loss_old.losses, atol=1e-5, rtol=0)
    g_old, g_new = grads(model, loss_old.losses.sum()), grads(model, loss_new.losses.sum())
    for name in g_old:
        assert_close(g_new[name], g_old[name], atol=1e-5, rtol=1e-4, msg=name)


def test_two_span_pairs_equal_the_padded_pairs():
    """The peer layout (``[prompt | chosen]`` and ``[prompt | rejected]`` as separate spans, packed): the same
    log-probs as two padded rows per pair, every prompt forwarded twice (as many tokens as the padded rows hold)."""
    model = llama("sdpa")
    batch = collate_preference(pair_rows(), pad_id=0, pair_packing="two_spans", pack_tokens=96)
    padded = {k: v for k, v in batch.items() if k != "packed"}
    old = model_logprobs(model, padded)
    new, shapes = forwarded(model, lambda: sequence_logps(model, batch, chunk=16))
    assert shapes == [tuple(batch["packed"]["input_ids"].shape)] and shapes[0][0] < 14  # several spans per row
    assert batch["packed"]["tokens"] == int(padded["attention_mask"].sum())
    assert_close(new.sum, old.sum, atol=1e-5, rtol=1e-6)
    assert new.tokens.tolist() == old.tokens.tolist()


def test_packed_sft_loss_equals_the_unpacked_loss():
    model = llama("sdpa")
    batch = collate_sft([{**r, "community": "r/x"} for r in pair_rows()], pad_id=0, pack=True, pack_tokens=64)
    hf = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    out, shapes = forwarded(model, lambda: sequence_logps(model, batch, chunk=8))
    assert shapes == [tuple(batch["packed"]["input_ids"].shape)] and shapes[0][0] < 7  # several examples per row
    packed = -out.sum.sum() / out.tokens.sum()
    assert_close(packed, hf, atol=1e-5, rtol=0)
    g_hf, g_packed = grads(model, hf), grads(model, packed)
    for name in g_hf:
        assert_close(g_packed[name], g_hf[name], atol=1e-6, rtol=1e-4, msg=name)


def test_chunked_head_equals_the_full_logits_over_several_chunks():
    """The head applied 7 rows at a time (4 chunks, recomputed in backward) == in one piece, values and
    gradients; the full path holds [rows, vocab] logits, the chunked one never more than [7, vocab]."""
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 1000, bias=False)
    hidden = torch.randn(25, 16, requires_grad=True)
    targets = torch.randint(0, 1000, (25,))
    widest = []
    handle = head.register_forward_hook(lambda _m, _a, out: widest.append(out.shape[0]))
    full = token_logps(head, hidden, targets, chunk=None)
    g_full = torch.autograd.grad(full.sum(), [hidden, head.weight])
    chunked = token_logps(head, hidden, targets, chunk=7)
    g_chunked = torch.autograd.grad(chunked.sum(), [hidden, head.weight])
    handle.remove()
    assert widest[0] == 25 and max(widest[1:]) == 7 and len(widest) >= 1 + 4 + 4  # 4 chunks, recomputed
    assert_close(chunked, full, atol=1e-6, rtol=0)
    for a, b in zip(g_chunked, g_full):
        assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_models_that_cannot_pack_fall_back_and_say_so(caplog, monkeypatch):
    """Flash-attention kernels take no custom mask; a soft-capped head is not the output embedding alone:
    both get the padded (or old) path and the same numbers, with a one-line message."""
    batch = collate_preference(pair_rows(), pad_id=0, pair_packing="prefix_shared")
    padded = {k: v for k, v in batch.items() if k != "packed"}
    model = llama("sdpa")
    expected = model_logprobs(model, padded)
    model.config._attn_implementation = "flash_attention_2"  # only the check reads it: no forward with it here
    from personalm.training import logprobs
    assert not logprobs.takes_4d_mask(model)
    model.config._attn_implementation = "sdpa"
    model.config.final_logit_softcapping = 30.0
    assert not logprobs.head_is_plain(model)
    logprobs.MESSAGES.clear()
    with caplog.at_level("INFO"):
        out, shapes = forwarded(model, lambda: sequence_logps(model, batch, chunk=16))
    # Llama's forward ignores the soft-capping key: the numbers alone cannot tell the paths apart, the shapes can
    assert shapes == [(14, 46)], "the padded rows (the model's own logits), not the packed ones"
    assert_close(out.sum, model_logprobs(model, padded).sum)
    assert "transforms its logits" in caplog.text
    assert expected.tokens.tolist() == out.tokens.tolist()
    model.config.final_logit_softcapping = None  # a plain head, attention without custom masks: padded rows
    monkeypatch.setattr(logprobs, "takes_4d_mask", lambda m: False)
    with caplog.at_level("INFO"):
        out, shapes = forwarded(model, lambda: sequence_logps(model, batch, chunk=16))
    assert shapes == [(14, 46)] and "packed rows are off" in caplog.text
    assert_close(out.sum, expected.sum, atol=1e-5, rtol=1e-6)


def test_a_model_that_scales_its_logits_inside_its_forward_is_caught_on_the_first_call():
    """No config key names it: the first call compares the head's output with the model's own logits, and the
    model's own (scaled) logits are used from then on."""
    class Scaled(LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 0.5
            return out

    plain = llama("sdpa")
    model = Scaled(plain.config)
    model.load_state_dict(plain.state_dict())
    batch = collate_preference(pair_rows(), pad_id=0, pair_packing="prefix_shared")
    padded = {k: v for k, v in batch.items() if k != "packed"}
    out = sequence_logps(model, batch, chunk=16)
    assert_close(out.sum, model_logprobs(model, padded).sum)
    assert (out.sum - model_logprobs(plain, padded).sum).abs().max() > 1e-2  # far beyond the 1e-5 tolerance


def test_sliding_window_and_hybrid_layers_do_not_pack():
    """A 4D mask would reach sliding-window layers without their window and linear-attention layers without
    the spans' boundaries: those models keep padded rows."""
    from personalm.training import logprobs

    model = llama("sdpa")
    assert logprobs.takes_4d_mask(model)
    model.config.layer_types = ["full_attention", "sliding_attention"]
    assert not logprobs.takes_4d_mask(model)
    model.config.layer_types = ["full_attention", "linear_attention"]
    assert not logprobs.takes_4d_mask(model)
    model.config.layer_types = None
    model.config.sliding_window = 64
    assert not logprobs.takes_4d_mask(model)
    model.config.use_sliding_window = False  # Qwen2's switch: the window is not used
    assert logprobs.takes_4d_mask(model)
