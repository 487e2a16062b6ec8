"""ComPreD loading, validation, A/B -> chosen/rejected, subsampling, caps, prompts, and bad input."""

import json
import re
from collections import Counter
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from personalm import compred
from personalm.compred import ComPreDDataError, PrepStats

from .conftest import pref_rows, write_jsonl


def write_parquet(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def row(**overrides) -> dict:
    """One valid preference row (every schema field), with chosen values overridden."""
    base = {
        "domain": "personalfinance_train", "post_id": "p1", "title": "A title", "history": "A body",
        "c_root_id_A": "ca", "c_root_id_B": "cb", "created_at_utc_A": 1.6e9, "created_at_utc_B": 1.6e9 + 60,
        "score_A": 10, "score_B": 3, "human_ref_A": "alpha answer", "human_ref_B": "beta answer",
        "labels": 1, "overlap_ratio": 0.0, "seconds_difference": 60.0, "score_ratio": 10 / 3, "len_ratio": 1.0,
    }
    base.update(overrides)
    return base


# ----------------------------------------------------------------------------------------------------
# A/B -> chosen/rejected


def test_to_pairs_swaps_on_labels_including_scores():
    rows = [
        row(post_id="p1", human_ref_A="alpha", human_ref_B="beta", score_A=10, score_B=3, labels=1),
        row(post_id="p2", human_ref_A="gamma", human_ref_B="delta", score_A=2, score_B=9, labels=0,
            score_ratio=4.5, domain="r/Frugal_validation"),
    ]
    pairs = compred.to_pairs(datasets.Dataset.from_list(rows)).to_list()
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
    pairs = compred.load_pairs(str(small_compred), ["finance"], "train_pref", stats).to_list()
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
    ds = compred.load_pairs(str(small_compred), ["finance", "history"], "validation_pref", stats)
    n_fin = len(read_jsonl(small_compred / "finance" / "validation_pref.jsonl"))
    n_his = len(read_jsonl(small_compred / "history" / "validation_pref.jsonl"))
    assert ds.num_rows == stats.rows == n_fin + n_his
    assert set(compred.communities(ds)) == {"personalfinance", "wallstreetbets", "Frugal", "investing",
                                            "AskHistorians", "HistoryMemes", "history", "AskEurope"}


# ----------------------------------------------------------------------------------------------------
# Subsampling and caps


@pytest.fixture(scope="module")
def train_pairs(small_compred) -> datasets.Dataset:
    return compred.load_pairs(str(small_compred), ["finance"], "train_pref", PrepStats())


def keys(ds: datasets.Dataset) -> list[tuple]:
    return [(r["post_id"], r["chosen"], r["rejected"], r["score_ratio"]) for r in ds.to_list()]


def test_subsample_matches_independent_count(train_pairs):
    min_ratio, per_post = 2.0, 2
    all_rows = keys(train_pairs)
    eligible = Counter(k[0] for k in all_rows if k[3] >= min_ratio)
    expected = sum(min(n, per_post) for n in eligible.values())
    # the fixture must make both filters bite, or this test could not fail
    assert len(eligible) and expected < sum(eligible.values()) < len(all_rows)

    stats = PrepStats()
    out = compred.subsample(train_pairs, min_ratio, per_post, seed=0, stats=stats)
    got = keys(out)
    assert len(got) == expected
    assert stats.subsampled_out == len(all_rows) - expected
    assert all(k[3] >= min_ratio for k in got)
    per = Counter(k[0] for k in got)
    assert max(per.values()) <= per_post
    assert per == Counter({post: min(n, per_post) for post, n in eligible.items()})  # full posts kept full
    assert not Counter(got) - Counter(all_rows)  # only rows that were there


def test_subsample_is_seeded(train_pairs):
    def run(seed):
        return keys(compred.subsample(train_pairs, 2.0, 1, seed=seed, stats=PrepStats()))

    assert run(0) == run(0)
    assert Counter(run(0)) != Counter(run(1))


def test_subsample_none_keeps_everything(train_pairs):
    stats = PrepStats()
    out = compred.subsample(train_pairs, None, None, seed=0, stats=stats)
    assert keys(out) == keys(train_pairs) and stats.subsampled_out == 0


def test_subsample_ratio_only(train_pairs):
    out = compred.subsample(train_pairs, 3.0, None, seed=0, stats=PrepStats())
    assert keys(out) == [k for k in keys(train_pairs) if k[3] >= 3.0]  # order kept


def test_subsample_min_score_ratio_is_inclusive():
    ratios = [1.0, 1.99, 2.0, 2.01, 7.5]
    ds = datasets.Dataset.from_dict({"post_id": [f"p{i}" for i in range(5)], "score_ratio": ratios})
    stats = PrepStats()
    out = compred.subsample(ds, 2.0, 5, seed=0, stats=stats)
    assert out["score_ratio"] == [2.0, 2.01, 7.5]  # "score_ratio >= 2", in the original order
    assert stats.subsampled_out == 2


def test_seeded_limit():
    ds = datasets.Dataset.from_dict({"i": list(range(50))})
    assert compred.seeded_limit(ds, None, 0)["i"] == list(range(50))
    assert compred.seeded_limit(ds, 50, 0)["i"] == list(range(50))
    assert compred.seeded_limit(ds, 80, 0)["i"] == list(range(50))
    a, a2, b = (compred.seeded_limit(ds, 10, s)["i"] for s in (4, 4, 5))
    assert len(a) == 10 and len(set(a)) == 10 and set(a) <= set(range(50))
    assert a == sorted(a)  # original order kept
    assert a == a2
    assert a != b
    assert a != list(range(10))  # a random draw, not the head


# ----------------------------------------------------------------------------------------------------
# Test prompts


def test_to_prompts_one_per_post_in_file_order():
    order = ["p2", "p1", "p2", "p3", "p1", "p3", "p4"]
    rows = [{"rank": i, "only_comment": False, "domain": f"c{p}_test", "post_id": p, "title": f"t{p}",
             "history": f"h{p}"} for i, p in enumerate(order)]
    out = compred.to_prompts(datasets.Dataset.from_list(rows)).to_list()
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
    ds = compred.load_prompts(str(small_compred), ["finance"], stats)
    assert ds["post_id"] == expected
    assert stats.rows == len(raw)


# ----------------------------------------------------------------------------------------------------
# Local layout


def pair_keys(ds: datasets.Dataset) -> list[tuple]:
    return [(r["post_id"], r["chosen"], r["rejected"], r["score_chosen"], r["score_rejected"]) for r in ds.to_list()]


def test_jsonl_and_parquet_load_the_same(tmp_path):
    rows = pref_rows(2)
    write_jsonl(tmp_path / "j" / "finance" / "train_pref.jsonl", rows)
    write_parquet(tmp_path / "p" / "finance" / "train_pref.parquet", rows)
    from_jsonl = compred.load_split(str(tmp_path / "j"), "finance", "train_pref")
    from_parquet = compred.load_split(str(tmp_path / "p"), "finance", "train_pref")
    assert from_jsonl.num_rows == from_parquet.num_rows == len(rows)
    assert from_parquet.to_list() == rows
    for name in compred.PREFERENCE_SCHEMA:
        expected = [r[name] for r in rows]
        if isinstance(expected[0], float):
            assert from_jsonl[name] == pytest.approx(expected), name
        else:
            assert from_jsonl[name] == expected, name
    a = compred.load_pairs(str(tmp_path / "j"), ["finance"], "train_pref", PrepStats())
    b = compred.load_pairs(str(tmp_path / "p"), ["finance"], "train_pref", PrepStats())
    assert pair_keys(a) == pair_keys(b)


def test_sharded_parquet(tmp_path):
    rows = pref_rows(3)
    cut = len(rows) // 2 + 1  # a post spans both shards
    folder = tmp_path / "c" / "finance"
    write_parquet(folder / "train_pref-00001-of-00002.parquet", rows[cut:])
    write_parquet(folder / "train_pref-00000-of-00002.parquet", rows[:cut])
    write_parquet(folder / "validation_pref.parquet", rows[:3])  # another split: not picked up
    ds = compred.load_split(str(tmp_path / "c"), "finance", "train_pref")
    assert ds.to_list() == rows  # both shards, shard 0 first
    # per-post caps see a post across shards
    pairs = compred.load_pairs(str(tmp_path / "c"), ["finance"], "train_pref", PrepStats())
    out = compred.subsample(pairs, None, 1, seed=0, stats=PrepStats())
    assert sorted(out["post_id"]) == sorted({r["post_id"] for r in rows})


def test_sharded_jsonl(tmp_path):
    rows = pref_rows(2)
    folder = tmp_path / "c" / "finance"
    write_jsonl(folder / "test_pref-00000-of-00002.jsonl", rows[:5])
    write_jsonl(folder / "test_pref-00001-of-00002.jsonl", rows[5:])
    assert compred.load_split(str(tmp_path / "c"), "finance", "test_pref")["post_id"] == [r["post_id"] for r in rows]


def test_shards_with_integral_float_field_concatenate(tmp_path):
    rows = pref_rows(2)
    first = [dict(r, created_at_utc_A=int(r["created_at_utc_A"])) for r in rows[:6]]
    folder = tmp_path / "c" / "finance"
    write_jsonl(folder / "train_pref-00000-of-00002.jsonl", first)
    write_jsonl(folder / "train_pref-00001-of-00002.jsonl", rows[6:])
    ds = compred.load_split(str(tmp_path / "c"), "finance", "train_pref")
    assert ds.num_rows == len(rows)


# ----------------------------------------------------------------------------------------------------
# Bad input: ComPreDDataError naming file, row (or line) and field

BAD_ROW = 5  # 0-based row index of the corrupted row (line 6 of a jsonl file)


def assert_names(err: pytest.ExceptionInfo, path: Path, field: str = None, row: int = None):
    msg = str(err.value)
    assert isinstance(err.value, ComPreDDataError), err.type
    assert str(path) in msg, msg
    if field is not None:
        assert f"'{field}'" in msg or f'"{field}"' in msg, msg
    if row is not None:
        assert re.search(rf"\brow {row}\b|\bline {row + 1}\b", msg), msg


def corrupt(rows: list[dict], **changes) -> list[dict]:
    rows = [dict(r) for r in rows]
    rows[BAD_ROW].update(changes)
    return rows


def load_finance(root: Path):
    return compred.load_split(str(root), "finance", "train_pref")


@pytest.mark.parametrize("ext", ["jsonl", "parquet"])
def test_missing_field_column_absent(tmp_path, ext):
    rows = [{k: v for k, v in r.items() if k != "len_ratio"} for r in pref_rows(2)]
    path = tmp_path / "c" / "finance" / f"train_pref.{ext}"
    (write_jsonl if ext == "jsonl" else write_parquet)(path, rows)
    with pytest.raises(ComPreDDataError) as err:
        load_finance(tmp_path / "c")
    assert_names(err, path, "len_ratio")
    assert "row" in str(err.value)


@pytest.mark.parametrize("ext", ["jsonl", "parquet"])
@pytest.mark.parametrize("field", ["title", "human_ref_B", "score_A", "labels"])
def test_null_field_in_one_row(tmp_path, ext, field):
    rows = corrupt(pref_rows(2), **{field: None})
    path = tmp_path / "c" / "finance" / f"train_pref.{ext}"
    (write_jsonl if ext == "jsonl" else write_parquet)(path, rows)
    with pytest.raises(ComPreDDataError) as err:
        load_finance(tmp_path / "c")
    assert_names(err, path, field, BAD_ROW)


def test_field_absent_in_one_jsonl_row(tmp_path):
    rows = pref_rows(2)
    del rows[BAD_ROW]["history"]
    path = write_jsonl(tmp_path / "c" / "finance" / "train_pref.jsonl", rows)
    with pytest.raises(ComPreDDataError) as err:
        load_finance(tmp_path / "c")
    assert_names(err, path, "history", BAD_ROW)


@pytest.mark.parametrize("field, value", [("score_A", "abc"), ("score_A", 3.5), ("title", 7), ("labels", True)])
def test_wrong_type_in_one_jsonl_row_names_that_line(tmp_path, field, value):
    rows = corrupt(pref_rows(2), **{field: value})
    path = write_jsonl(tmp_path / "c" / "finance" / "train_pref.jsonl", rows)
    with pytest.raises(ComPreDDataError) as err:
        load_finance(tmp_path / "c")
    assert_names(err, path, field, BAD_ROW)


def test_wrong_type_in_first_jsonl_row(tmp_path):
    rows = pref_rows(2)
    rows[0]["score_A"] = "abc"
    path = write_jsonl(tmp_path / "c" / "finance" / "train_pref.jsonl", rows)
    with pytest.raises(ComPreDDataError) as err:
        load_finance(tmp_path / "c")
    assert_names(err, path, "score_A", 0)


def test_wrong_type_whole_parquet_column(tmp_path):
    rows = [dict(r, score_A=str(r["score_A"])) for r in pref_rows(2)]
    path = write_parquet(tmp_path / "c" / "finance" / "train_pref.parquet", rows)
    with pytest.raises(ComPreDDataError) as err:
        load_finance(tmp_path / "c")
    assert_names(err, path, "score_A", 0)


@pytest.mark.parametrize("ext", ["jsonl", "parquet"])
@pytest.mark.parametrize("value", [2, -1])
def test_labels_not_0_or_1(tmp_path, ext, value):
    rows = corrupt(pref_rows(2), labels=value)
    path = tmp_path / "c" / "finance" / f"train_pref.{ext}"
    (write_jsonl if ext == "jsonl" else write_parquet)(path, rows)
    with pytest.raises(ComPreDDataError) as err:
        load_finance(tmp_path / "c")
    assert_names(err, path, "labels", BAD_ROW)


def test_malformed_jsonl_line(tmp_path):
    lines = [json.dumps(r) for r in pref_rows(2)]
    lines[BAD_ROW] = lines[BAD_ROW][:-5]  # cut the closing of the object
    path = write_jsonl(tmp_path / "c" / "finance" / "train_pref.jsonl", lines)
    with pytest.raises(ComPreDDataError) as err:
        load_finance(tmp_path / "c")
    assert_names(err, path)
    assert re.search(rf"\bline {BAD_ROW + 1}\b", str(err.value)), str(err.value)


def test_path_that_does_not_exist(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(ComPreDDataError) as err:
        load_finance(missing)
    assert str(missing) in str(err.value)


def test_subset_that_does_not_exist(tmp_path):
    write_jsonl(tmp_path / "c" / "finance" / "train_pref.jsonl", pref_rows(1))
    with pytest.raises(ComPreDDataError) as err:
        compred.load_split(str(tmp_path / "c"), "politics", "train_pref")
    assert "politics" in str(err.value)


def test_split_that_does_not_exist(tmp_path):
    write_jsonl(tmp_path / "c" / "finance" / "train_pref.jsonl", pref_rows(1))
    with pytest.raises(ComPreDDataError) as err:
        compred.load_split(str(tmp_path / "c"), "finance", "test_pref")
    assert "test_pref" in str(err.value) and str(tmp_path / "c" / "finance") in str(err.value)


def test_prompt_split_missing_field(tmp_path):
    rows = [{"rank": 1, "domain": "x", "post_id": "p", "title": "t"}]  # no history
    path = write_jsonl(tmp_path / "c" / "finance_test_prompts" / "test_prompts.jsonl", rows)
    with pytest.raises(ComPreDDataError) as err:
        compred.load_split(str(tmp_path / "c"), "finance", compred.PROMPT_SPLIT)
    assert_names(err, path, "history")


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
    pairs = compred.load_pairs(str(tmp_path / "c"), ["finance"], "train_pref", stats)
    assert stats.rows == len(rows)
    assert stats.skipped == {"empty_post": 1, "empty_response": 2, "identical_responses": 2}
    assert pairs["post_id"] == ["ok1", "no_title_ok", "no_body_ok", "ok2"]
    assert pairs["chosen"][-1] == "beta answer"


def test_row_with_several_content_problems_is_counted_once(tmp_path):
    rows = [row(post_id="ok"), row(post_id="bad", title="", history="", human_ref_A="", human_ref_B="")]
    write_jsonl(tmp_path / "c" / "finance" / "train_pref.jsonl", rows)
    stats = PrepStats()
    pairs = compred.load_pairs(str(tmp_path / "c"), ["finance"], "train_pref", stats)
    assert pairs["post_id"] == ["ok"]
    assert sum(stats.skipped.values()) == 1
