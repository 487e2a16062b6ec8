"""The synthetic data: the demo rows as they were, and the heavy-tailed lengths option for benchmarks."""

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
