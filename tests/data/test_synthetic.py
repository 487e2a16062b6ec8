"""The synthetic data: the demo rows as they were, and the heavy-tailed lengths option for benchmarks."""

import json
import statistics

from personalm.data import synthetic


def test_length_option_keeps_the_demo_rows_and_only_lengthens_texts():
    plain = list(synthetic.preference_rows("finance", "train_pref", 5))
    longer = list(synthetic.preference_rows("finance", "train_pref", 5, lengths=synthetic.LengthModel()))
    assert len(plain) == len(longer)
    for a, b in zip(plain, longer):
        assert (a["post_id"], a["title"], a["labels"], a["score_A"], a["score_B"]) == \
               (b["post_id"], b["title"], b["labels"], b["score_A"], b["score_B"])
        assert b["history"].startswith(a["history"]) and b["human_ref_A"].startswith(a["human_ref_A"])
    assert plain == list(synthetic.preference_rows("finance", "train_pref", 5))  # the demo is unchanged


def test_lengths_are_heavy_tailed_around_the_chosen_medians():
    model = synthetic.LengthModel(post_median=100, comment_median=30)
    posts = list(synthetic.posts("history", "train_pref", 300, lengths=model))
    body = sorted(len(p["history"].split()) for p in posts)
    comments = sorted(len(t.split()) for p in posts for t, _ in p["comments"])
    assert 80 < statistics.median(body) < 130 and 24 < statistics.median(comments) < 40
    assert body[int(0.99 * len(body))] > 5 * statistics.median(body)  # a long tail, not a fixed length
    assert max(body) <= model.post_max + 20 and max(comments) <= model.comment_max + 20


def test_the_hard_subset_flips_its_share_of_training_labels_and_keeps_the_evaluation_splits_true(tmp_path):
    """``embedded:compred-minority`` as written: the small community has 4% of the training pairs; the training
    split's labels are flipped in the noise's share (within 4 standard errors) against the same rows without noise,
    and no validation or test label is. The noise stays low: at 5% the demo's tiny model no longer learns the small
    community even from every pair (README.md, "Measured on the hard subset")."""
    _, written = synthetic.DATASETS["compred-minority"]
    noise, n_posts, lengths = written["noise"], written["n_posts"], written["lengths"]
    assert 0 < noise < 0.05
    root = synthetic.write_dataset(tmp_path / "hard", **written)
    read = {split: [json.loads(line) for line in (root / "minority" / f"{split}.jsonl").read_text().splitlines()]
            for split in synthetic.SPLITS}
    clean = list(synthetic.preference_rows("minority", "train_pref", n_posts["train_pref"], lengths=lengths))
    assert [r["post_id"] for r in clean] == [r["post_id"] for r in read["train_pref"]]
    flipped = sum(a["labels"] != b["labels"] for a, b in zip(clean, read["train_pref"])) / len(clean)
    assert abs(flipped - noise) < 4 * (noise * (1 - noise) / len(clean)) ** 0.5, flipped
    small = sum(r["domain"].startswith("financialindependence") for r in clean) / len(clean)
    assert 0.03 < small < 0.05, small
    for split in ("validation_pref", "test_pref"):
        assert read[split] == list(synthetic.preference_rows("minority", split, n_posts[split], lengths=lengths))
