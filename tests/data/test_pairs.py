"""ComPreD rows to training rows: A/B -> chosen/rejected, the paper's subsample and caps, one prompt per post,
documented skips counted. The split-level checks run the preparation's own plan (``prepare.planning.plan_split``)."""

from collections import Counter

import numpy as np
import pyarrow as pa
import pytest

from personalm.data import pairs as pairing
from personalm.data.compred import PrepStats
from tests.helpers import planned_rows, read_jsonl, write_jsonl
from tests.helpers import pref_row as row

# ----------------------------------------------------------------------------------------------------
# A/B -> chosen/rejected


def test_to_pairs_swaps_on_labels_including_scores():
    rows = [
        row(post_id="p1", human_ref_A="alpha", human_ref_B="beta", score_A=10, score_B=3, labels=1),
        row(post_id="p2", human_ref_A="gamma", human_ref_B="delta", score_A=2, score_B=9, labels=0,
            score_ratio=4.5, domain="r/Frugal_validation"),
    ]
    pairs = pairing.to_pairs(pa.Table.from_pylist(rows)).to_pylist()
    assert [(p["chosen"], p["rejected"], p["score_chosen"], p["score_rejected"]) for p in pairs] == [
        ("alpha", "beta", 10, 3), ("delta", "gamma", 9, 2)]
    assert [p["community"] for p in pairs] == ["personalfinance", "Frugal"]
    assert [p["post_id"] for p in pairs] == ["p1", "p2"]
    assert [p["title"] for p in pairs] == ["A title", "A title"]
    assert [p["post"] for p in pairs] == ["A body", "A body"]
    assert pairs[1]["score_ratio"] == pytest.approx(4.5)


def test_load_pairs_chosen_is_the_labelled_winner(small_compred):
    """On the synthetic files: labels 1 -> chosen is human_ref_A, labels 0 -> human_ref_B, scores follow."""
    raw = read_jsonl(small_compred / "finance" / "train_pref.jsonl")
    assert {r["labels"] for r in raw} == {0, 1}  # both branches are exercised
    stats = PrepStats()
    pairs = planned_rows(small_compred, ["finance"], "train_pref", stats, min_score_ratio=None,
                         max_pairs_per_post=None).to_pylist()
    assert stats.rows == len(raw) and not stats.skipped and len(pairs) == len(raw)
    for r, p in zip(raw, pairs):
        a_wins = r["labels"] == 1
        assert p["chosen"] == (r["human_ref_A"] if a_wins else r["human_ref_B"])
        assert p["rejected"] == (r["human_ref_B"] if a_wins else r["human_ref_A"])
        assert p["score_chosen"] == (r["score_A"] if a_wins else r["score_B"])
        assert p["score_rejected"] == (r["score_B"] if a_wins else r["score_A"])
        assert p["community"] == r["domain"][: -len("_train")]
        assert p["post_id"] == r["post_id"]


def test_load_pairs_over_two_subsets(small_compred):
    stats = PrepStats()
    ds = planned_rows(small_compred, ["finance", "history"], "validation_pref", stats)
    n_fin = len(read_jsonl(small_compred / "finance" / "validation_pref.jsonl"))
    n_his = len(read_jsonl(small_compred / "history" / "validation_pref.jsonl"))
    assert ds.num_rows == stats.rows == n_fin + n_his
    assert set(ds.column("community").to_pylist()) == {"personalfinance", "wallstreetbets", "Frugal", "investing",
                                            "AskHistorians", "HistoryMemes", "history", "AskEurope"}


# ----------------------------------------------------------------------------------------------------
# Subsampling and caps


@pytest.fixture(scope="module")
def train_pairs(small_compred) -> pa.Table:
    return planned_rows(small_compred, ["finance"], "train_pref", PrepStats(), min_score_ratio=None,
                        max_pairs_per_post=None)


def keys(table: pa.Table) -> list[tuple]:
    return [(r["post_id"], r["chosen"], r["rejected"], r["score_ratio"]) for r in table.to_pylist()]


def subsampled(table: pa.Table, min_ratio, per_post, seed: int) -> pa.Table:
    codes = pa.compute.dictionary_encode(table.column("post_id")).combine_chunks().indices.to_numpy()
    return table.take(pairing.subsample(table.column("score_ratio").to_numpy(), codes, min_ratio, per_post, seed))


def test_subsample_matches_independent_count(train_pairs, small_compred):
    min_ratio, per_post = 2.0, 2
    all_rows = keys(train_pairs)
    eligible = Counter(k[0] for k in all_rows if k[3] >= min_ratio)
    expected = sum(min(n, per_post) for n in eligible.values())
    # the fixture must make both filters bite, or this test could not fail
    assert len(eligible) and expected < sum(eligible.values()) < len(all_rows)

    stats = PrepStats()
    got = keys(planned_rows(small_compred, ["finance"], "train_pref", stats, min_score_ratio=min_ratio,
                            max_pairs_per_post=per_post, seed=0))  # the preparation's own plan
    assert len(got) == expected
    assert stats.subsampled_out == len(all_rows) - expected
    assert all(k[3] >= min_ratio for k in got)
    per = Counter(k[0] for k in got)
    assert max(per.values()) <= per_post
    assert per == Counter({post: min(n, per_post) for post, n in eligible.items()})  # full posts kept full
    assert not Counter(got) - Counter(all_rows)  # only rows that were there


def test_subsample_is_seeded(train_pairs):
    def run(seed):
        return keys(subsampled(train_pairs, 2.0, 1, seed))

    assert run(0) == run(0)
    assert Counter(run(0)) != Counter(run(1))


def test_subsample_none_keeps_everything(train_pairs):
    assert keys(subsampled(train_pairs, None, None, 0)) == keys(train_pairs)


def test_subsample_ratio_only(train_pairs):
    out = subsampled(train_pairs, 3.0, None, 0)
    assert keys(out) == [k for k in keys(train_pairs) if k[3] >= 3.0]  # order kept


def test_subsample_min_score_ratio_is_inclusive():
    ratios = [1.0, 1.99, 2.0, 2.01, 7.5]
    keep = pairing.subsample(np.array(ratios), np.arange(5), 2.0, 5, seed=0)
    assert [ratios[i] for i in keep] == [2.0, 2.01, 7.5]  # "score_ratio >= 2", in the original order


def test_seeded_limit():
    assert pairing.seeded_limit(50, None, 0).tolist() == list(range(50))
    assert pairing.seeded_limit(50, 50, 0).tolist() == list(range(50))
    assert pairing.seeded_limit(50, 80, 0).tolist() == list(range(50))
    a, a2, b = (pairing.seeded_limit(50, 10, s).tolist() for s in (4, 4, 5))
    assert len(a) == 10 and len(set(a)) == 10 and set(a) <= set(range(50))
    assert a == sorted(a)  # original order kept
    assert a == a2
    assert a != b
    assert a != list(range(10))  # a random draw, not the head


# ----------------------------------------------------------------------------------------------------
# Test prompts


def test_to_prompts_one_per_post_in_file_order(tmp_path):
    order = ["p2", "p1", "p2", "p3", "p1", "p3", "p4"]
    rows = [{"rank": i, "only_comment": False, "domain": f"c{p}_test", "post_id": p, "title": f"t{p}",
             "history": f"h{p}"} for i, p in enumerate(order)]
    write_jsonl(tmp_path / "c" / "finance_test_prompts" / "test_prompts.jsonl", rows)
    out = planned_rows(tmp_path / "c", ["finance"], "test_prompts", PrepStats()).to_pylist()
    assert [r["post_id"] for r in out] == ["p2", "p1", "p3", "p4"]
    assert out[0] == {"community": "cp2", "post_id": "p2", "title": "tp2", "post": "hp2"}


def test_load_prompts_dedups_the_synthetic_file(small_compred):
    raw = read_jsonl(small_compred / "finance_test_prompts" / "test_prompts.jsonl")
    seen, expected = set(), []
    for r in raw:
        if r["post_id"] not in seen:
            seen.add(r["post_id"])
            expected.append(r["post_id"])
    assert len(expected) < len(raw)  # the file holds several rows per post
    stats = PrepStats()
    ds = planned_rows(small_compred, ["finance"], "test_prompts", stats)
    assert ds.column("post_id").to_pylist() == expected
    assert stats.rows == len(raw)


# ----------------------------------------------------------------------------------------------------
# Content problems: skipped and counted, not errors


def test_content_problems_are_skipped_and_counted(tmp_path):
    rows = [
        row(post_id="ok1"),
        row(post_id="empty_post", title="", history="  "),
        row(post_id="no_title_ok", title="", history="a body is enough"),
        row(post_id="no_body_ok", title="a title is enough", history=""),
        row(post_id="empty_a", human_ref_A=""),
        row(post_id="blank_b", human_ref_B=" \n "),
        row(post_id="same", human_ref_A="same text", human_ref_B="same text"),
        row(post_id="same_but_spaces", human_ref_A="same text\n", human_ref_B=" same text"),
        row(post_id="ok2", labels=0),
    ]
    write_jsonl(tmp_path / "c" / "finance" / "train_pref.jsonl", rows)
    stats = PrepStats()
    pairs = planned_rows(tmp_path / "c", ["finance"], "train_pref", stats, min_score_ratio=None)
    assert stats.rows == len(rows)
    assert stats.skipped == {"empty_post": 1, "empty_response": 2, "identical_responses": 2}
    assert pairs.column("post_id").to_pylist() == ["ok1", "no_title_ok", "no_body_ok", "ok2"]
    assert pairs.column("chosen").to_pylist()[-1] == "beta answer"


def test_row_with_several_content_problems_is_counted_once(tmp_path):
    rows = [row(post_id="ok"), row(post_id="bad", title="", history="", human_ref_A="", human_ref_B="")]
    write_jsonl(tmp_path / "c" / "finance" / "train_pref.jsonl", rows)
    stats = PrepStats()
    pairs = planned_rows(tmp_path / "c", ["finance"], "train_pref", stats, min_score_ratio=None)
    assert pairs.column("post_id").to_pylist() == ["ok"]
    assert sum(stats.skipped.values()) == 1
