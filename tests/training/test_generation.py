"""The Hugging Face generation path (``personalm.training.generation``): the repetition penalty over each row's own
tokens, so a row's generation does not depend on the rows batched with it."""

import pytest
import torch
from transformers import RepetitionPenaltyLogitsProcessor

from personalm.models import load_causal_lm, load_tokenizer
from personalm.training.decoding import GenerationSettings, until_eos
from personalm.training.generation import RowRepetitionPenalty, hf_generate
from tests.helpers import prompt_batches


def test_row_penalty_is_transformers_penalty_on_rows_without_padding():
    """No padding: the same scores as transformers' processor (CTRL's rule: positive logits of seen tokens / 1.1,
    negative ones x 1.1), a token seen twice penalized once."""
    torch.manual_seed(0)
    ids, scores = torch.randint(0, 50, (3, 12)), torch.randn(3, 50)
    ours = RowRepetitionPenalty(1.1, torch.zeros(3, dtype=torch.long))(ids, scores.clone())
    torch.testing.assert_close(ours, RepetitionPenaltyLogitsProcessor(1.1)(ids, scores.clone()), rtol=0, atol=0)
    assert not torch.equal(ours, scores)


def test_row_penalty_does_not_see_left_padding():
    """Row 0 is [pad pad pad 5 6], row 1 is [7 8 9 5 2] (pad = 2 = EOS, as for Llama and Mistral). Row 0's token 2
    (only in its padding) keeps its score; row 1's token 2 (a real token) is penalized; each row gets the scores it
    gets alone."""
    pad = 2
    ids = torch.tensor([[pad, pad, pad, 5, 6], [7, 8, 9, 5, 2]])
    scores = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, -1.0]] * 2)
    out = RowRepetitionPenalty(1.1, torch.tensor([3, 0]))(ids, scores.clone())
    assert out[0, pad] == 3.0 and out[1, pad] == pytest.approx(3.0 / 1.1)
    torch.testing.assert_close(out[0:1], RowRepetitionPenalty(1.1, torch.tensor([0]))(ids[0:1, 3:], scores[0:1]))
    # transformers' processor without the padding lengths (what transformers 5.19 and older generate with)
    assert RepetitionPenaltyLogitsProcessor(1.1)(ids, scores.clone())[0, pad] == pytest.approx(3.0 / 1.1)


def test_until_eos_keeps_eos_and_drops_what_follows():
    assert until_eos([5, 6, 2, 2, 2], 2) == [5, 6, 2]
    assert until_eos([5, 6, 7], 2) == [5, 6, 7]


@pytest.fixture(scope="module")
def mistral_batches(mistral_llama, small_compred):
    return prompt_batches(mistral_llama, small_compred)


def _alone(model, batch, i, settings):
    n = int(batch["attention_mask"][i].sum())
    ids, mask = batch["input_ids"][i:i + 1, -n:], batch["attention_mask"][i:i + 1, -n:]
    return hf_generate(model, ids, mask, settings, 2, 2)[0]


def test_a_rows_generation_does_not_depend_on_its_batch(mistral_llama, mistral_batches):
    """The Mistral tokenizer pads with EOS. Every test prompt of mixed lengths, batched 16 at a time, gets the same
    ids as alone, and many rows with left padding stop at EOS. The control: transformers' processor without the
    padding lengths (5.19 and older) penalizes those rows' EOS and they go on, so the check can tell."""
    tok = load_tokenizer(str(mistral_llama))
    assert tok.pad_token_id == tok.eos_token_id == 2
    model = load_causal_lm(str(mistral_llama)).eval()
    settings = GenerationSettings(max_new_tokens=32)
    padded_stops = differs_with_padding_counted = 0
    with torch.no_grad():
        for batch in mistral_batches:
            lengths = batch["attention_mask"].sum(1)
            assert len(set(lengths.tolist())) > 1  # mixed lengths in one batch
            batched = hf_generate(model, batch["input_ids"], batch["attention_mask"], settings, 2, 2)
            counted = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                     max_new_tokens=32, do_sample=False, repetition_penalty=1.0,
                                     logits_processor=[RepetitionPenaltyLogitsProcessor(1.1)], eos_token_id=2,
                                     pad_token_id=2)[:, batch["input_ids"].size(1):].tolist()
            for i, ids in enumerate(batched):
                assert ids == _alone(model, batch, i, settings), (batch["post_id"][i], ids)
                padded = lengths[i] < batch["input_ids"].size(1)
                padded_stops += bool(padded and ids[-1] == 2 and len(ids) < 32)
                differs_with_padding_counted += until_eos(counted[i], 2) != ids
    assert padded_stops >= 5, padded_stops
    assert differs_with_padding_counted >= 5, differs_with_padding_counted
