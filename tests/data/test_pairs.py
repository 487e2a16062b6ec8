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


def test_allocate_hand_computed():
    """Groups of 1000, 500 and 40 rows, a cap of 300, floor 50: floors 50, 50, 40 (140); the other 160 in proportion
    to the rows left, 950 and 450 of 1400: 108.57 and 51.43, so 108 and 51, and the one left over to the larger
    remainder: 159, 101, 40. Floors over the cap share the cap in proportion to them; a cap over all keeps all."""
    assert pairing.allocate(np.array([1000, 500, 40]), 300, 50).tolist() == [159, 101, 40]
    assert pairing.allocate(np.array([10, 10, 10]), 15, 10).tolist() == [5, 5, 5]
    assert pairing.allocate(np.array([10, 3]), 20, 5).tolist() == [10, 3]
    assert pairing.allocate(np.array([1000, 500, 40]), 300, 0).tolist() == [195, 97, 8]  # floor 0: proportional


def test_stratified_limit_draws_each_groups_allocation_in_order():
    groups = np.repeat([0, 1, 2], [1000, 500, 40])
    kept = pairing.stratified_limit(np.random.default_rng(0).permutation(groups), 300, 50, seed=4)
    assert len(kept) == 300 and (np.diff(kept) > 0).all()
    shuffled = np.random.default_rng(0).permutation(groups)
    assert np.bincount(shuffled[kept]).tolist() == [159, 101, 40]
    assert kept.tolist() == pairing.stratified_limit(shuffled, 300, 50, seed=4).tolist()
    assert kept.tolist() != pairing.stratified_limit(shuffled, 300, 50, seed=5).tolist()
    assert pairing.stratified_limit(shuffled, None, 50, 0).tolist() == list(range(1540))


@pytest.fixture(scope="module")
def minority():
    from personalm.data import synthetic

    return synthetic.dataset_dir("embedded:compred-minority")


def test_a_stratified_cap_keeps_every_community_and_a_uniform_one_thins_the_small_one(minority):
    """The hard subset's 3,125 training pairs (750 per large community, 125 of r/financialindependence: 4%),
    capped at 400. Drawn over all pairs the small community keeps about 4% (16). Per community with floor 60: each
    keeps 60 (300), and the other 100 follow the pairs left, 690 of each large community and 65 of the small one
    (2,825): 24.42 and 2.30, so 24 and 2, and the 2 left over to the largest remainders (the first two large
    communities in sorted order): 85, 85, 84, 84 and 62."""
    counts = {}
    for floor in (None, 60):
        stats = PrepStats()
        rows = planned_rows(minority, ["minority"], "train_pref", stats, max_train_pairs=400, cap_floor=floor)
        counts[floor] = Counter(rows.column("community").to_pylist())
        assert rows.num_rows == 400 and stats.capped_out == 3125 - 400
    assert len(counts[None]) == len(counts[60]) == 5
    assert 5 <= counts[None]["financialindependence"] <= 30, counts[None]
    assert counts[60] == {"Frugal": 85, "investing": 85, "personalfinance": 84, "wallstreetbets": 84,
                          "financialindependence": 62}


def test_a_stratified_eval_cap_keeps_each_community_its_floor(minority):
    stats = PrepStats()
    rows = planned_rows(minority, ["minority"], "test_pref", stats, max_eval_pairs=500, cap_floor=100)
    assert Counter(rows.column("community").to_pylist()) == {c: 100 for c in (
        "personalfinance", "wallstreetbets", "Frugal", "investing", "financialindependence")}


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
