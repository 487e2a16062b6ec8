"""How packed rows attend: the BlockMask's rule equals the dense mask, the SDPA kernel list and its fallback on CUDA
(decided on a CPU by naming the device type), and FlexAttention's packed rows equal SDPA's in fp32."""

import logging
import warnings

import pytest
import torch
from torch.nn.attention import SDPBackend
from torch.testing import assert_close

from personalm.data.collate import collate_preference, collate_sft
from personalm.data.packing import attention_mask_4d
from personalm.training import attention
from personalm.training.dpo_loss import PairLogps, pair_losses
from personalm.training.logprobs import sequence_logps
from tests.training.test_logprobs import llama, pair_rows


def layouts():
    """Prefix-shared pairs and packed SFT examples, several per row, with padding at the end of some rows."""
    rows = pair_rows()
    pairs = collate_preference(rows, pad_id=0, pair_packing="prefix_shared", pack_tokens=96)["packed"]
    two_spans = collate_preference(rows, pad_id=0, pair_packing="two_spans", pack_tokens=96)["packed"]
    sft = collate_sft(rows, pad_id=0, pack=True, pack_tokens=64)["packed"]
    return {"pairs": pairs, "two_spans": two_spans, "sft": sft}


@pytest.mark.parametrize("kind", ["pairs", "two_spans", "sft"])
def test_flex_mask_rule_equals_the_dense_mask(kind):
    """``mask_mod`` evaluated at every (row, query, key) == ``attention_mask_4d``; the layout really has several
    spans, both branches and padding in a row, so each clause of the rule is exercised."""
    layout = layouts()[kind]
    group, branch = layout["group"], layout["branch"]
    assert (group == -1).any() and group.max() >= 1
    assert kind != "pairs" or set(branch.unique().tolist()) == {0, 1, 2}
    rows, t = group.shape
    b, q, k = torch.arange(rows)[:, None, None], torch.arange(t)[None, :, None], torch.arange(t)[None, None, :]
    rule = attention.mask_mod(group, branch)(b, 0, q, k)
    assert torch.equal(rule, attention_mask_4d(group, branch)[:, 0])
    mask = attention.block_mask(group, branch)
    assert mask.shape == (rows, 1, t, t)


def ones_forward(seen: list):
    """A forward that records whether the math kernel is enabled while it runs, and fails without it."""
    def forward():
        seen.append(torch.backends.cuda.math_sdp_enabled())
        if not seen[-1]:
            raise RuntimeError("No available kernel. Aborting execution.")
        return torch.ones(2)
    return forward


def test_cuda_runs_without_the_math_kernel_and_a_fallback_is_warned_with_its_cause(caplog):
    """On CUDA (named here; the decision runs on a CPU) the first try has math off; a 'no kernel' error is warned
    with torch's reasons and the forward runs again under math. A real failure: on a CPU the memory-efficient
    kernel alone cannot run, so SDPA raises, and the fallback gives the padded model's own numbers."""
    model = llama("sdpa")
    attention.MESSAGES.clear()
    seen = []
    with pytest.warns(UserWarning, match=r"fall back to the math kernel .*: No available kernel"):
        out = attention.attend(model, ones_forward(seen), "cuda")
    assert seen == [False, True] and out.tolist() == [1.0, 1.0]

    model, ids = llama("sdpa"), torch.randint(3, 500, (2, 12))
    expected = model(input_ids=ids).logits
    attention.MESSAGES.clear()
    with pytest.warns(UserWarning, match=r"fall back to the math kernel .*: .*No viable backend"):
        out = attention.attend(model, lambda: model(input_ids=ids).logits, "cuda",
                               kernels=[SDPBackend.EFFICIENT_ATTENTION])
    assert_close(out, expected)
    assert attention.kernel_used(model) == "MATH (cuda, math kernel after the fused ones failed)"


def test_the_kernel_is_said_once_and_other_errors_are_not_taken_for_a_missing_kernel(caplog):
    """A forward that runs under the fused list says its kernel once (torch's choice for the call: on a CPU, its
    flash kernel); an error that is not 'no kernel' (here a shape error) propagates, no math rerun."""
    model = llama("sdpa")
    ids = torch.randint(3, 500, (2, 12))
    attention.MESSAGES.clear()
    with caplog.at_level(logging.INFO), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            attention.attend(model, lambda: model(input_ids=ids), "cuda")
    assert not [w for w in caught if "math kernel" in str(w.message)]
    said = [r.message for r in caplog.records if "SDPA kernel" in r.message]
    assert said == ["[personalm] packed rows attend with SDPA kernel FLASH_ATTENTION (cuda, kernel list "
                    "EFFICIENT_ATTENTION/FLASH_ATTENTION/CUDNN_ATTENTION)"]
    assert attention.kernel_used(model).startswith("FLASH_ATTENTION (cuda, kernel list")
    seen = []

    def broken():
        seen.append(1)
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        attention.attend(model, broken, "cuda")
    assert seen == [1]


def test_on_a_cpu_no_kernel_list_is_set_and_that_is_said(caplog):
    model = llama("sdpa")
    attention.MESSAGES.clear()
    seen = []
    with caplog.at_level(logging.INFO):
        attention.attend(model, lambda: seen.append(torch.backends.cuda.math_sdp_enabled()), "cpu")
    assert seen == [True] and "the kernel list applies on CUDA only" in caplog.text


@pytest.mark.slow  # torch.compile of flex_attention on a CPU: about 20 s warm, a minute cold
def test_flex_attention_packed_rows_equal_the_dense_packed_rows():
    """fp32, forward only (FlexAttention has no CPU backward in torch 2.13; gradients are compared in
    benchmarks/gpu_check.py): log-probs and DPO losses of prefix-shared pairs, and the packed SFT loss, under a
    BlockMask == under SDPA's dense mask, same weights, to 1e-5."""
    dense, flex = llama("sdpa"), llama("sdpa")
    attention.use_attention(flex, "flex_attention")
    assert flex.config._attn_implementation == "flex_attention" and dense.config._attn_implementation == "sdpa"
    batch = collate_preference(pair_rows(), pad_id=0, pair_packing="prefix_shared", pack_tokens=96)
    with torch.no_grad():
        a, b = sequence_logps(dense, batch, chunk=16), sequence_logps(flex, batch, chunk=16)
        assert_close(b.sum, a.sum, atol=1e-5, rtol=0)
        ref = PairLogps(*(t - 0.3 for t in PairLogps.from_sequences(a, 7)))
        losses = [pair_losses(PairLogps.from_sequences(x, 7), ref, 0.1, "sigmoid", 0.0).losses for x in (a, b)]
        assert_close(losses[1], losses[0], atol=1e-5, rtol=0)
        sft = collate_sft(pair_rows(), pad_id=0, pack=True, pack_tokens=64)
        a, b = sequence_logps(dense, sft, chunk=8), sequence_logps(flex, sft, chunk=8)
    assert_close(b.sum, a.sum, atol=1e-5, rtol=0)
    assert_close(-b.sum.sum() / b.tokens.sum(), -a.sum.sum() / a.tokens.sum(), atol=1e-5, rtol=0)
    assert (a.sum[a.tokens > 0].abs() > 1).all()  # real log-probs compared, not zeros


def test_the_attention_setting_reaches_the_loaded_model():
    """``model.attention`` sets the loaded model's implementation (None keeps the loaded one, SDPA)."""
    from personalm.training.sft import SFTModule

    flex, default = SFTModule(attention="flex_attention"), SFTModule()
    flex.configure_model()
    default.configure_model()
    assert flex.model.config._attn_implementation == "flex_attention"
    assert default.model.config._attn_implementation == "sdpa"


def test_the_forwards_own_warnings_are_passed_on():
    """The warnings caught while a CUDA forward runs (to name a fallback's cause) reach the caller when it ran."""
    def forward():
        warnings.warn("from the forward", FutureWarning)
        return 1

    with pytest.warns(FutureWarning, match="from the forward"):
        assert attention.attend(llama("sdpa"), forward, "cuda") == 1
