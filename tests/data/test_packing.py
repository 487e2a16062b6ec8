"""Packed layouts (``personalm.data.packing``): where each token goes, what it sees, what predicts it."""

import torch

from personalm.data.packing import FIRST, SECOND, SHARED, attention_mask_4d, pack_examples, pack_pairs


def test_a_pair_is_one_span_whose_answers_continue_from_the_prompt():
    out = pack_pairs([[1, 2, 3]], [[4, 5]], [[6]], pad_id=0)
    assert out["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6]]
    assert out["position_ids"].tolist() == [[0, 1, 2, 3, 4, 3]]  # the rejected answer starts where chosen did
    assert out["branch"].tolist() == [[SHARED] * 3 + [FIRST] * 2 + [SECOND]]
    # chosen 4 <- token 3 (col 2), chosen 5 <- 4 (col 3); rejected 6 <- token 3 (col 2), not the chosen's last
    assert out["target_ids"].tolist() == [4, 5, 6]
    assert out["target_source"].tolist() == [2, 3, 2]
    assert out["target_sequence"].tolist() == [0, 0, 1]
    assert out["sequences"] == 2 and out["tokens"] == 6


def test_the_rejected_answer_sees_the_prompt_and_itself_never_the_chosen_one():
    out = pack_pairs([[1, 2]], [[3, 4]], [[5, 6]], pad_id=0)
    mask = attention_mask_4d(out["group"], out["branch"])[0, 0]
    sees = {i: mask[i].nonzero().flatten().tolist() for i in range(6)}
    assert sees[3] == [0, 1, 2, 3]  # chosen's second token: prompt + chosen
    assert sees[4] == [0, 1, 4] and sees[5] == [0, 1, 4, 5]  # rejected: prompt + rejected
    additive = attention_mask_4d(out["group"], out["branch"], torch.float32)[0, 0]
    assert (additive == 0).equal(mask) and additive[4, 2] == torch.finfo(torch.float32).min


def test_pairs_pack_first_fit_within_the_budget_and_never_see_each_other():
    prompts, chosen, rejected = [[1] * 6, [2] * 2, [3] * 2, [4]], [[5] * 3, [6], [7], [8]], [[9], [6], [7], []]
    out = pack_pairs(prompts, chosen, rejected, pad_id=0)  # spans 10, 4, 4, 2: budget 10 (the longest)
    assert out["input_ids"].shape == (2, 10)
    assert out["tokens"] == 20 and (out["group"] >= 0).sum() == 20
    mask = attention_mask_4d(out["group"], out["branch"])[:, 0]
    row, col = (out["group"] == 1).nonzero()[0].tolist()  # first token of the second span of its row
    assert not mask[row, col, :col].any()  # it sees nothing of the span before it
    assert out["sequences"] == 8 and sorted(set(out["target_sequence"].tolist())) == [0, 1, 2, 3, 4, 5, 6]
    # the empty rejected answer of pair 3 (sequence 7) has nothing scored; padding sees earlier padding only
    wide = pack_pairs(prompts, chosen, rejected, pad_id=0, budget=64)
    assert wide["input_ids"].shape == (1, 20)


def test_padding_rows_are_never_all_masked():
    out = pack_pairs([[1] * 5, [2]], [[3], [3]], [[4], [4]], pad_id=0)  # spans 7 and 3: the second row padded
    mask = attention_mask_4d(out["group"], out["branch"])
    assert mask.any(-1).all()


def test_sft_examples_restart_positions_and_score_their_responses():
    out = pack_examples([[1, 2], [3]], [[4], [5, 6]], pad_id=0, budget=8)
    assert out["input_ids"].tolist() == [[1, 2, 4, 3, 5, 6]]
    assert out["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2]]
    assert out["target_ids"].tolist() == [4, 5, 6] and out["target_source"].tolist() == [1, 3, 4]
    assert out["target_sequence"].tolist() == [0, 1, 1] and out["sequences"] == 2
    mask = attention_mask_4d(out["group"], out["branch"])[0, 0]
    assert mask[3].nonzero().flatten().tolist() == [3]
