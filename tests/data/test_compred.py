"""ComPreD loading: the local Hub layout (jsonl, parquet, shards) and bad input named by file, row and field."""

import json
import re
from pathlib import Path

import pyarrow as pa
import pytest

from personalm.data import compred, sources
from personalm.data.compred import ComPreDDataError, PrepStats
from tests.helpers import planned_rows, pref_rows, write_jsonl, write_parquet

# ----------------------------------------------------------------------------------------------------
# Local layout


def pair_keys(table: pa.Table) -> list[tuple]:
    return [(r["post_id"], r["chosen"], r["rejected"], r["score_chosen"], r["score_rejected"])
            for r in table.to_pylist()]


def test_jsonl_and_parquet_load_the_same(tmp_path):
    rows = pref_rows(2)
    write_jsonl(tmp_path / "j" / "finance" / "train_pref.jsonl", rows)
    write_parquet(tmp_path / "p" / "finance" / "train_pref.parquet", rows)
    from_jsonl = sources.load_split(str(tmp_path / "j"), "finance", "train_pref")
    from_parquet = sources.load_split(str(tmp_path / "p"), "finance", "train_pref")
    assert from_jsonl.num_rows == from_parquet.num_rows == len(rows)
    assert from_parquet.to_pylist() == rows
    for name in compred.PREFERENCE_SCHEMA:
        expected = [r[name] for r in rows]
        if isinstance(expected[0], float):
            assert from_jsonl.column(name).to_pylist() == pytest.approx(expected), name
        else:
            assert from_jsonl.column(name).to_pylist() == expected, name
    a = planned_rows(tmp_path / "j", ["finance"], "train_pref", PrepStats(), min_score_ratio=None)
    b = planned_rows(tmp_path / "p", ["finance"], "train_pref", PrepStats(), min_score_ratio=None)
    assert pair_keys(a) == pair_keys(b)


def test_sharded_parquet(tmp_path):
    rows = pref_rows(3)
    cut = len(rows) // 2 + 1  # a post spans both shards
    folder = tmp_path / "c" / "finance"
    write_parquet(folder / "train_pref-00001-of-00002.parquet", rows[cut:])
    write_parquet(folder / "train_pref-00000-of-00002.parquet", rows[:cut])
    write_parquet(folder / "validation_pref.parquet", rows[:3])  # another split: not picked up
    ds = sources.load_split(str(tmp_path / "c"), "finance", "train_pref")
    assert ds.to_pylist() == rows  # both shards, shard 0 first
    # per-post caps see a post across shards
    out = planned_rows(tmp_path / "c", ["finance"], "train_pref", PrepStats(), min_score_ratio=None,
                       max_pairs_per_post=1, seed=0)
    assert sorted(out.column("post_id").to_pylist()) == sorted({r["post_id"] for r in rows})


def test_sharded_jsonl(tmp_path):
    rows = pref_rows(2)
    folder = tmp_path / "c" / "finance"
    write_jsonl(folder / "test_pref-00000-of-00002.jsonl", rows[:5])
    write_jsonl(folder / "test_pref-00001-of-00002.jsonl", rows[5:])
    ds = sources.load_split(str(tmp_path / "c"), "finance", "test_pref")
    assert ds.column("post_id").to_pylist() == [r["post_id"] for r in rows]


def test_shards_with_integral_float_field_concatenate(tmp_path):
    rows = pref_rows(2)
    first = [dict(r, created_at_utc_A=int(r["created_at_utc_A"])) for r in rows[:6]]
    folder = tmp_path / "c" / "finance"
    write_jsonl(folder / "train_pref-00000-of-00002.jsonl", first)
    write_jsonl(folder / "train_pref-00001-of-00002.jsonl", rows[6:])
    ds = sources.load_split(str(tmp_path / "c"), "finance", "train_pref")
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
    return sources.load_split(str(root), "finance", "train_pref")


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
        sources.load_split(str(tmp_path / "c"), "politics", "train_pref")
    assert "politics" in str(err.value)


def test_split_that_does_not_exist(tmp_path):
    write_jsonl(tmp_path / "c" / "finance" / "train_pref.jsonl", pref_rows(1))
    with pytest.raises(ComPreDDataError) as err:
        sources.load_split(str(tmp_path / "c"), "finance", "test_pref")
    assert "test_pref" in str(err.value) and str(tmp_path / "c" / "finance") in str(err.value)


def test_prompt_split_missing_field(tmp_path):
    rows = [{"rank": 1, "domain": "x", "post_id": "p", "title": "t"}]  # no history
    path = write_jsonl(tmp_path / "c" / "finance_test_prompts" / "test_prompts.jsonl", rows)
    with pytest.raises(ComPreDDataError) as err:
        sources.load_split(str(tmp_path / "c"), "finance", compred.PROMPT_SPLIT)
    assert_names(err, path, "history")




def test_hub_files_are_the_configs_data_files_fetched_at_their_revision(tmp_path, monkeypatch):
    """A Hub id: the files ``datasets`` lists for the config's split (``hf://datasets/<repo>@<revision>/...``),
    each fetched by ``huggingface_hub`` at that revision, then read as local parquet (no Arrow copy)."""
    import types

    import datasets
    import huggingface_hub

    rows = pref_rows(2)
    local = {f"finance/train_pref-0000{i}-of-00002.parquet": write_parquet(tmp_path / f"shard{i}.parquet", part)
             for i, part in enumerate((rows[:4], rows[4:]))}
    asked = []

    def builder(repo, config):
        assert (repo, config) == ("allenai/compred", "finance")
        urls = [f"hf://datasets/allenai/compred@0123abcd/{name}" for name in local]
        return types.SimpleNamespace(config=types.SimpleNamespace(data_files={"train_pref": urls}))

    def download(repo, filename, repo_type, revision):
        asked.append((repo, filename, repo_type, revision))
        return str(local[filename])

    monkeypatch.setattr(datasets, "load_dataset_builder", builder)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    assert sources.load_split("allenai/compred", "finance", "train_pref").to_pylist() == rows
    assert asked[0] == ("allenai/compred", "finance/train_pref-00000-of-00002.parquet", "dataset", "0123abcd")
    with pytest.raises(ComPreDDataError, match="has no split 'test_pref'"):
        sources.load_split("allenai/compred", "finance", "test_pref")
