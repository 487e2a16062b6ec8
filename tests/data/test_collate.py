"""Label masking and the collate functions: padded tensors, labels on the response only, clear errors."""

import re

import pytest
import torch

from personalm.data.collate import IGNORE_INDEX, collate_preference, collate_prompts, collate_sft
from personalm.data.encoding import encode

TITLE = "Should I put my tax refund into index funds or pay off my car?"
POST = ("I am 29 and have 12k saved. My job is stable but rent keeps going up. My partner and I just got "
        "a bonus. We have some debt and no real plan yet, and I keep reading about crypto and gold.")
CHOSEN = "Build an emergency fund of six months first, then buy a low cost index fund and wait."

PAD = 99  # distinct from every id below, so padding is visible


def test_sft_labels_mask_prompt_and_padding(tokenizer):
    encs = [encode(tokenizer, "r/finance", TITLE, POST, [CHOSEN]),
            encode(tokenizer, "Reddit", "Short title", "", ["Ok."])]
    rows = [{"prompt_ids": e.prompt_ids, "chosen_ids": e.response_ids[0], "community": c, "index": i}
            for i, (e, c) in enumerate(zip(encs, ["finance", "Frugal"]))]
    batch = collate_sft(rows, pad_id=tokenizer.pad_token_id)
    width = max(len(e.prompt_ids) + len(e.response_ids[0]) for e in encs)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (2, width)
    assert batch["community"] == ["finance", "Frugal"]
    for i, e in enumerate(encs):
        p, r = len(e.prompt_ids), len(e.response_ids[0])
        labels, inputs, mask = batch["labels"][i].tolist(), batch["input_ids"][i].tolist(), batch["attention_mask"][i]
        assert inputs[: p + r] == e.prompt_ids + e.response_ids[0]
        assert labels[:p] == [IGNORE_INDEX] * p  # no prompt token in the loss
        assert labels[p: p + r] == e.response_ids[0]  # every response token labelled, EOS included
        assert labels[p + r:] == [IGNORE_INDEX] * (width - p - r)  # nor padding
        assert inputs[p + r:] == [tokenizer.pad_token_id] * (width - p - r)
        assert mask.tolist() == [1] * (p + r) + [0] * (width - p - r)
        positions = [j for j, v in enumerate(labels) if v != IGNORE_INDEX]
        assert positions == list(range(p, p + r))


def test_collate_preference_chosen_then_rejected():
    rows = [
        {"prompt_ids": [1, 2, 3], "chosen_ids": [10, 11], "rejected_ids": [20], "community": "a", "index": 7},
        {"prompt_ids": [4, 5], "chosen_ids": [12, 13, 14], "rejected_ids": [21, 22, 23, 24], "community": "b",
         "index": 3},
        {"prompt_ids": [6], "chosen_ids": [15], "rejected_ids": [25, 26], "community": "c", "index": 0},
    ]
    batch = collate_preference(rows, pad_id=PAD)
    expected = [[1, 2, 3, 10, 11, PAD], [4, 5, 12, 13, 14, PAD], [6, 15, PAD, PAD, PAD, PAD],
                [1, 2, 3, 20, PAD, PAD], [4, 5, 21, 22, 23, 24], [6, 25, 26, PAD, PAD, PAD]]
    assert batch["input_ids"].tolist() == expected
    m = IGNORE_INDEX
    assert batch["labels"].tolist() == [[m, m, m, 10, 11, m], [m, m, 12, 13, 14, m], [m, 15, m, m, m, m],
                                        [m, m, m, 20, m, m], [m, m, 21, 22, 23, 24], [m, 25, 26, m, m, m]]
    assert batch["attention_mask"].tolist() == [[int(t != PAD) for t in r] for r in expected]
    assert batch["index"].tolist() == [7, 3, 0]
    assert batch["community"] == ["a", "b", "c"]


def test_collate_preference_conditioning_variants():
    rows = [{"prompt_ids": [1, 2], "chosen_ids": [10], "rejected_ids": [20, 21], "community": "a", "index": 0,
             "none_prompt_ids": [3], "random_prompt_ids": [4, 5, 6]}]
    batch = collate_preference(rows, pad_id=PAD)
    assert batch["none"]["input_ids"].tolist() == [[3, 10, PAD], [3, 20, 21]]
    assert batch["random"]["input_ids"].tolist() == [[4, 5, 6, 10, PAD], [4, 5, 6, 20, 21]]
    m = IGNORE_INDEX
    assert batch["random"]["labels"].tolist() == [[m, m, m, 10, m], [m, m, m, 20, 21]]


def test_collate_prompts_left_pads():
    rows = [{"prompt_ids": p, "post_id": f"p{i}", "index": i, "community": "finance", "prompt_community": "r/finance",
             "title": f"t{i}", "post": f"b{i}"} for i, p in enumerate([[1, 2, 3], [4, 5, 6, 7, 8], [9]])]
    batch = collate_prompts(rows, pad_id=PAD)
    assert batch["input_ids"].tolist() == [[PAD, PAD, 1, 2, 3], [4, 5, 6, 7, 8], [PAD, PAD, PAD, PAD, 9]]
    assert batch["attention_mask"].tolist() == [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]]
    assert batch["attention_mask"].dtype == torch.long
    assert batch["post_id"] == ["p0", "p1", "p2"] and batch["index"] == [0, 1, 2]
    assert batch["title"] == ["t0", "t1", "t2"] and batch["prompt_community"] == ["r/finance"] * 3


def test_collate_prompts_pad_equal_to_a_real_token_is_still_attended():
    # the mask comes from lengths, not from comparing ids with the pad id
    rows = [{"prompt_ids": p, "post_id": "x", "index": 0, "community": "c", "prompt_community": "r/c",
             "title": "", "post": ""} for p in ([0, 5], [7, 0, 0])]
    batch = collate_prompts(rows, pad_id=0)
    assert batch["input_ids"].tolist() == [[0, 0, 5], [7, 0, 0]]
    assert batch["attention_mask"].tolist() == [[0, 1, 1], [1, 1, 1]]


SFT_ROW = {"prompt_ids": [1, 2], "chosen_ids": [3], "community": "a", "index": 0}
PREF_ROW = {**SFT_ROW, "rejected_ids": [4]}
PROMPT_ROW = {"prompt_ids": [1, 2], "post_id": "p", "index": 0, "community": "a", "prompt_community": "r/a",
              "title": "t", "post": "b"}
# (collate function, a complete row, the key to remove)
_MISSING = [
    (collate_sft, SFT_ROW, "prompt_ids"), (collate_sft, SFT_ROW, "chosen_ids"),
    (collate_sft, SFT_ROW, "community"),
    (collate_preference, PREF_ROW, "prompt_ids"), (collate_preference, PREF_ROW, "chosen_ids"),
    (collate_preference, PREF_ROW, "rejected_ids"), (collate_preference, PREF_ROW, "community"),
    (collate_preference, PREF_ROW, "index"),
    (collate_prompts, PROMPT_ROW, "prompt_ids"), (collate_prompts, PROMPT_ROW, "post_id"),
    (collate_prompts, PROMPT_ROW, "index"), (collate_prompts, PROMPT_ROW, "community"),
    (collate_prompts, PROMPT_ROW, "prompt_community"), (collate_prompts, PROMPT_ROW, "title"),
    (collate_prompts, PROMPT_ROW, "post"),
]


@pytest.mark.parametrize("collate, full, key", [
    pytest.param(fn, row, key, id=f"{fn.__name__}-{key}") for fn, row, key in _MISSING])
def test_collate_missing_key_is_a_value_error_naming_it(collate, full, key):
    rows = [{k: v for k, v in full.items() if k != key} for _ in range(2)]
    with pytest.raises(ValueError, match=re.escape(repr(key))):
        collate(rows, pad_id=0)


def test_collate_key_missing_in_a_later_row():
    rows = [dict(PREF_ROW), {k: v for k, v in PREF_ROW.items() if k != "rejected_ids"}]
    with pytest.raises(ValueError, match="rejected_ids"):
        collate_preference(rows, pad_id=0)


@pytest.mark.parametrize("collate", [collate_sft, collate_preference, collate_prompts])
def test_collate_empty_batch_is_a_value_error(collate):
    with pytest.raises(ValueError):
        collate([], pad_id=0)
