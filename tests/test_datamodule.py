"""ComPreDDataModule: one class serves SFT rows, preference rows and prompts, with or without context."""

import pytest

from personalm.datamodule import ComPreDDataModule


def dm(path, **kw):
    kw = {"dataset": str(path), "subset": ["finance", "history"], "max_length": 128, "batch_size": 4, **kw}
    return ComPreDDataModule(**kw)


def test_sft_rows_mask_the_prompt(small_compred, tokenizer):
    d = dm(small_compred)
    batch = next(iter(d.train_dataloader()))
    assert set(batch) >= {"input_ids", "labels", "attention_mask", "community"}
    for ids, labels in zip(batch["input_ids"], batch["labels"]):
        labelled = (labels != -100).nonzero().flatten()
        text = tokenizer.decode(ids[labelled])
        assert "<|assistant|>" not in text and "<|domain|>" not in text
        assert tokenizer.decode(ids[: labelled[0]]).endswith("<|assistant|>\n")


def test_preference_rows_put_chosen_then_rejected(small_compred):
    d = dm(small_compred, rows="preference", batch_size=3)
    batch = next(iter(d.val_dataloader()))
    assert batch["input_ids"].shape[0] == 6 and len(batch["community"]) == 3
    assert "none" not in batch
    ds = d.splits["validation_pref"]
    for i, index in enumerate(batch["index"].tolist()):
        row = ds[i]
        assert row["index"] == index
        n_c = len(row["prompt_ids"]) + len(row["chosen_ids"])
        assert batch["input_ids"][i, :n_c].tolist() == row["prompt_ids"] + row["chosen_ids"]
        n_r = len(row["prompt_ids"]) + len(row["rejected_ids"])
        assert batch["input_ids"][3 + i, :n_r].tolist() == row["prompt_ids"] + row["rejected_ids"]


def test_conditioning_variants_share_responses(small_compred, tokenizer):
    d = dm(small_compred, rows="preference", conditioning_variants=True)
    batch = next(iter(d.test_dataloader()))
    assert set(batch) >= {"none", "random"}
    none_text = tokenizer.decode(batch["none"]["input_ids"][0])
    assert none_text.startswith("<|domain|>\nReddit\n")
    true_text = tokenizer.decode(batch["input_ids"][0])
    rand_text = tokenizer.decode(batch["random"]["input_ids"][0])
    assert true_text.split("\n")[1] == f"r/{batch['community'][0]}" != rand_text.split("\n")[1]
    for variant in ("none", "random"):  # the same responses are scored under each prompt
        for a, b in zip(batch["labels"], batch[variant]["labels"]):
            assert a[a != -100].tolist() == b[b != -100].tolist()
    assert "none" not in next(iter(d.train_dataloader()))  # training never needs them


def test_contextualize_false_and_random_community(small_compred, tokenizer):
    plain = dm(small_compred, contextualize=False)
    plain.setup("predict")
    assert set(plain.splits["test_prompts"]["prompt_community"]) == {"Reddit"}
    rand = dm(small_compred, random_community=True, seed=3)
    rand.setup("predict")
    ds = rand.splits["test_prompts"]
    shown = [s[2:] for s in ds["prompt_community"]]
    assert all(s != c for s, c in zip(shown, ds["community"]))
    assert set(shown) <= set(ds["community"])  # drawn from the same data
    again = dm(small_compred, random_community=True, seed=3)
    again.setup("predict")
    assert again.splits["test_prompts"]["prompt_community"] == ds["prompt_community"]


def test_bad_settings_are_refused():
    with pytest.raises(TypeError, match="true or false"):
        ComPreDDataModule(contextualize="False")
    with pytest.raises(ValueError, match="contextualize"):
        ComPreDDataModule(contextualize=False, random_community=True)


def test_prompts_one_per_post_and_stats(small_compred):
    d = dm(small_compred)
    d.setup("predict")
    ds = d.splits["test_prompts"]
    assert len(ds) == len(set(ds["post_id"])) == 2 * 4 * 4  # 2 subsets x 4 communities x 4 posts
    assert d.stats["test_prompts"].rows == 3 * len(ds)


def test_truncation_is_counted(small_compred):
    d = dm(small_compred, max_length=40)
    d.setup("validate")
    stats = d.stats["validation_pref"]
    assert stats.shortened > 0
    assert max(len(p) + len(c) for p, c in zip(d.splits["validation_pref"]["prompt_ids"],
                                               d.splits["validation_pref"]["chosen_ids"])) <= 40


def test_dropped_rows_leave_index_equal_to_position(small_compred):
    """Rows whose title and markers leave no room are dropped; ``index`` is then renumbered so it is
    the row's position in the prepared split (precomputed reference log-probs are looked up by it)."""
    d = dm(small_compred, rows="preference", max_prompt_length=36)
    d.setup("validate")
    ds = d.splits["validation_pref"]
    assert 0 < d.stats["validation_pref"].dropped < d.stats["validation_pref"].rows
    assert ds["index"] == list(range(len(ds)))
