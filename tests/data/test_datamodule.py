"""ComPreDDataModule: one class serves SFT rows, preference rows and prompts, with or without context."""

import pytest

from personalm.data.datamodule import ComPreDDataModule


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
        row = ds[index]  # "index" is the row's position in the split (the loader's order is by length)
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
    with pytest.raises(ValueError, match="cap_floor must be >= 0"):
        ComPreDDataModule(cap_floor=-1)
    with pytest.raises(ValueError, match="community_tau must be >= 0"):
        ComPreDDataModule(community_tau=-0.5)
    with pytest.raises(ValueError, match="community_tau and train_group_by_length"):
        ComPreDDataModule(community_tau=0.0, train_group_by_length=True)


def test_community_tau_makes_the_training_loader_draw_by_community(small_compred):
    """With community_tau the training loader's sampler is the community-balanced one over the split's rows (the
    split's community codes, sorted names), and an epoch still has as many batches as the plain shuffle."""
    from personalm.data.batching import CommunityBalancedSampler, community_codes

    plain = ComPreDDataModule(dataset=str(small_compred), subset=["finance", "history"], rows="preference",
                              max_length=128, batch_size=8)
    balanced = ComPreDDataModule(dataset=str(small_compred), subset=["finance", "history"], rows="preference",
                                 max_length=128, batch_size=8, community_tau=0.0)
    loader = balanced.train_dataloader()
    assert isinstance(loader.sampler, CommunityBalancedSampler) and loader.sampler.tau == 0.0
    assert len(loader) == len(plain.train_dataloader())
    names, codes = community_codes(balanced.splits["train_pref"])
    assert names == sorted(balanced.splits["train_pref"].unique("community")) and len(names) == 8
    assert [names[c] for c in codes[:20]] == balanced.splits["train_pref"]["community"][:20]


def test_prompts_one_per_post_and_stats(small_compred):
    d = dm(small_compred)
    d.setup("predict")
    ds = d.splits["test_prompts"]
    assert len(ds) == len(set(ds["post_id"])) == 2 * 4 * 4  # 2 subsets x 4 communities x 4 posts
    assert d.stats["test_prompts"].rows == 3 * len(ds)


def test_truncation_is_counted(small_compred, tokenizer):
    """The counts against an independent reading: a post is shortened where the whole prompt's text is over the
    prompt budget, a response cut where prompt + response + EOS is over ``max_length``."""
    from personalm.data.compred import PrepStats
    from personalm.data.prompt import format_prompt
    from tests.helpers import planned_rows

    d = dm(small_compred, max_length=56, max_prompt_length=40)
    d.setup("validate")
    stats, ds = d.stats["validation_pref"], d.splits["validation_pref"]
    source = planned_rows(small_compred, ["finance", "history"], "validation_pref", PrepStats()).to_pylist()
    assert stats.dropped == 0 and len(source) == len(ds)
    long_post = [len(tokenizer(format_prompt(f"r/{r['community']}", r["title"], r["post"]))["input_ids"]) > 40
                 for r in source]
    cut = [len(p) + len(tokenizer(r["chosen"], add_special_tokens=False)["input_ids"]) + 1 > 56
           for p, r in zip(ds["prompt_ids"], source)]
    assert 0 < stats.post_shortened == sum(long_post) < len(ds)
    assert 0 < stats.response_cut == sum(cut)
    assert stats.shortened == sum(a or b for a, b in zip(long_post, cut))
    assert max(len(p) for p in ds["prompt_ids"]) <= 40
    assert max(len(p) + len(c) for p, c in zip(ds["prompt_ids"], ds["chosen_ids"])) <= 56


def test_variant_rows_hold_the_true_rows_post_text_with_a_sentencepiece_tokenizer(small_compred, tmp_path):
    """The none/random rows score the same post text and responses as the true row (Mistral's tokenizer)."""
    from personalm.data.compred import PrepStats
    from personalm.data.prompt import format_prompt
    from tests.helpers import planned_rows, write_mistral_tokenizer

    folder = write_mistral_tokenizer(tmp_path / "mistral")
    d = dm(small_compred, rows="preference", conditioning_variants=True, tokenizer=str(folder), max_length=96,
           max_prompt_length=48)
    d.setup("test")
    ds, tok = d.splits["test_pref"], d.tokenizer
    source = planned_rows(small_compred, ["finance", "history"], "test_pref", PrepStats()).to_pylist()
    assert len(source) == len(ds) and 0 < d.stats["test_pref"].post_shortened < len(ds)
    for row, src in zip(ds, source):
        assert (row["post_id"], row["community"]) == (src["post_id"], src["community"])
        head = f"<|domain|>\nr/{src['community']}\n<|user|>\n{src['title']}\n"
        text = tok.decode(row["prompt_ids"], skip_special_tokens=True)
        assert text.startswith(head) and text.endswith("\n<|assistant|>\n")
        post = text[len(head):-len("\n<|assistant|>\n")]
        assert src["post"].startswith(post)  # the true prompt holds a prefix of the post (shortened or whole)
        shown = {"prompt_ids": f"r/{src['community']}", "none_prompt_ids": "Reddit", "random_prompt_ids": None}
        for column, community in shown.items():
            ids = row[column]
            if community is None:  # the random community: read it back from the ids
                community = tok.decode(ids, skip_special_tokens=True).split("\n")[1]
                assert community.startswith("r/") and community != f"r/{src['community']}"
            assert ids == tok(format_prompt(community, src["title"], post), split_special_tokens=True)["input_ids"]
            assert len(ids) <= 48 or column != "prompt_ids"  # a variant may pass it by its community's tokens
            assert len(ids) + max(len(row["chosen_ids"]), len(row["rejected_ids"])) <= 96


def test_a_split_emptied_by_a_filter_names_the_split_file_and_filter(small_compred):
    from personalm.data.compred import ComPreDDataError

    with pytest.raises(ComPreDDataError, match=r"train_pref of .*finance/train_pref\.jsonl.*score-ratio threshold"):
        dm(small_compred, subset="finance", min_score_ratio=1e9).setup("fit")
    with pytest.raises(ComPreDDataError, match=r"validation_pref of .*length limits.*prompt budget of 3 tokens"):
        dm(small_compred, max_length=10, max_prompt_length=3).setup("validate")


def test_max_prompt_length_over_max_length_fails_at_start_up():
    with pytest.raises(ValueError, match="smaller than max_length"):
        ComPreDDataModule(max_length=128, max_prompt_length=512)


def test_dropped_rows_leave_index_equal_to_position(small_compred):
    """Rows whose title and markers leave no room are dropped; ``index`` is then renumbered so it is
    the row's position in the prepared split (precomputed reference log-probs are looked up by it)."""
    d = dm(small_compred, rows="preference", max_prompt_length=36)
    d.setup("validate")
    ds = d.splits["validation_pref"]
    assert 0 < d.stats["validation_pref"].dropped < d.stats["validation_pref"].rows
    assert ds["index"] == list(range(len(ds)))


@pytest.mark.parametrize("rows, variants", [("sft", False), ("preference", True)])
def test_prediction_prompts_are_the_training_prompts(rows, variants, small_compred, tmp_path):
    """A post's generation prompt is the very ids its pairs were trained and scored on (shortened alike),
    also when the test pairs carry the "no community"/"random community" variants."""
    from tests.helpers import write_mistral_tokenizer

    folder = write_mistral_tokenizer(tmp_path / "mistral")
    d = dm(small_compred, tokenizer=str(folder), max_length=96, max_prompt_length=48, rows=rows,
           conditioning_variants=variants)
    d.setup("test")
    d.setup("predict")
    pairs, prompts = d.splits["test_pref"], d.splits["test_prompts"]
    assert d.stats["test_prompts"].post_shortened > 0
    by_post = {p: ids for p, ids in zip(pairs["post_id"], pairs["prompt_ids"])}
    assert set(prompts["post_id"]) <= set(by_post)
    for post_id, ids in zip(prompts["post_id"], prompts["prompt_ids"]):
        assert ids == by_post[post_id], post_id


@pytest.mark.parametrize("name", ["max_pairs_per_post", "max_train_pairs", "max_eval_pairs"])
def test_caps_of_zero_are_refused_at_start_up(name):
    with pytest.raises(ValueError, match=f"{name} must be at least 1"):
        ComPreDDataModule(**{name: 0})


def test_the_tokenization_cache_key_follows_the_tokenizer(tokenizer, mistral_tokenizer, tmp_path):
    """The same tokenizer loaded again: the same identity. Another vocabulary, or the same files with another
    EOS token: another identity (a cached tokenization made with the first is not reused)."""
    import json

    from personalm.data.cache_key import tokenizer_identity
    from personalm.models import load_tokenizer

    assert tokenizer_identity(load_tokenizer("embedded:tiny-llama")) == tokenizer_identity(tokenizer)
    assert tokenizer_identity(mistral_tokenizer) != tokenizer_identity(tokenizer)
    tokenizer.save_pretrained(tmp_path / "tok")
    assert tokenizer_identity(load_tokenizer(str(tmp_path / "tok"))) == tokenizer_identity(tokenizer)  # a copy
    config = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())
    config["eos_token"] = config.get("bos_token") or "<s>"
    (tmp_path / "tok" / "tokenizer_config.json").write_text(json.dumps(config))
    assert tokenizer_identity(load_tokenizer(str(tmp_path / "tok"))) != tokenizer_identity(tokenizer)


@pytest.mark.parametrize("split", ["val", "predict"])
def test_evaluation_and_prediction_batches_are_grouped_by_length(small_compred, split):
    """Each row once, longest first (prompt + chosen + rejected tokens), so a batch is padded to rows of its own
    length; off: the split's order."""
    def served(d):
        loader = d.val_dataloader() if split == "val" else d.predict_dataloader()
        index = [i for batch in loader for i in (batch["index"].tolist() if split == "val" else batch["index"])]
        ds = d.splits["validation_pref" if split == "val" else "test_prompts"]
        columns = [c for c in ("prompt_ids", "chosen_ids", "rejected_ids") if c in ds.column_names]
        return index, [sum(len(ds[i][c]) for c in columns) for i in index]

    grouped, lengths = served(dm(small_compred, rows="preference"))
    plain, plain_lengths = served(dm(small_compred, rows="preference", group_by_length=False))
    assert sorted(grouped) == plain == list(range(len(plain)))
    assert lengths == sorted(lengths, reverse=True) and lengths != plain_lengths


def test_pair_packing_and_sft_packing_are_settings(small_compred):
    shared = next(iter(dm(small_compred, rows="preference").val_dataloader()))
    assert shared["packed"]["sequences"] == 2 * len(shared["community"])
    assert shared["packed"]["tokens"] < int(shared["attention_mask"].sum())  # each post once per pair
    assert "packed" not in next(iter(dm(small_compred, rows="preference", pair_packing="none").val_dataloader()))
    apart = next(iter(dm(small_compred, rows="preference", pair_packing="two_spans").val_dataloader()))
    assert apart["packed"]["sequences"] == 2 * len(apart["community"])
    assert apart["packed"]["tokens"] == int(apart["attention_mask"].sum())  # each post twice per pair
    assert "packed" in next(iter(dm(small_compred).val_dataloader()))
    assert "packed" not in next(iter(dm(small_compred, pack_sft=False).val_dataloader()))
