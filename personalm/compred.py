"""ComPreD rows: loading (Hub id or local folder in the Hub layout), validation, pairs, subsampling.

Everything here works on ``datasets.Dataset`` objects (Arrow, memory-mapped, cached on disk), never on
whole-split Python lists: the real ``train_pref`` splits hold millions of rows.

Local layout, mirroring the Hub (``allenai/compred``)::

    <dir>/<subset>/<split>.jsonl | .parquet            (or shards <split>-*.jsonl | .parquet)
    <dir>/<subset>_test_prompts/test_prompts.jsonl | .parquet
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from personalm.prompt import normalize_domain

log = logging.getLogger(__name__)

PREFERENCE_SPLITS = ("train_pref", "validation_pref", "test_pref")
PROMPT_SPLIT = "test_prompts"

# Every field of a ComPreD preference row (SHP-style), with the kind of value it holds.
PREFERENCE_SCHEMA = {
    "domain": "str", "post_id": "str", "title": "str", "history": "str",
    "c_root_id_A": "str", "c_root_id_B": "str",
    "created_at_utc_A": "float", "created_at_utc_B": "float",
    "score_A": "int", "score_B": "int",
    "human_ref_A": "str", "human_ref_B": "str",
    "labels": "int",
    "overlap_ratio": "float", "seconds_difference": "float", "score_ratio": "float", "len_ratio": "float",
}
# Fields a test-prompt row must have (it may carry more, e.g. rank, only_comment).
PROMPT_SCHEMA = {"domain": "str", "post_id": "str", "title": "str", "history": "str"}

_PY_TYPES = {"str": (str,), "int": (int,), "float": (int, float)}


class ComPreDDataError(ValueError):
    """Bad input: names the file (or Hub split), the row and the field."""


@dataclass
class PrepStats:
    """What preparation did to one split; logged, and kept on the DataModule for scripts and tests."""

    rows: int = 0
    skipped: dict = field(default_factory=dict)  # reason -> count (content problems, documented skips)
    subsampled_out: int = 0
    shortened: int = 0  # rows whose post was shortened or whose response tail was cut
    post_shortened: int = 0  # rows whose post body was shortened to fit the prompt budget
    response_cut: int = 0  # rows with a response cut to fit max_length
    dropped: int = 0  # rows whose markers, community and title alone exceed the prompt budget
    rows_out: int = 0  # rows served

    def skip(self, reason: str, count: int) -> None:
        if count:
            self.skipped[reason] = self.skipped.get(reason, 0) + count


# ----------------------------------------------------------------------------------------------------
# Loading


def is_local(dataset: str) -> bool:
    return Path(dataset).expanduser().exists() or dataset.startswith((".", "/", "~"))


def split_files(root: Path, subset: str, split: str) -> list[Path]:
    """The files of one split in the local Hub layout; a clear error when there are none."""
    folder = root / (f"{subset}_test_prompts" if split == PROMPT_SPLIT else subset)
    if not root.is_dir():
        raise ComPreDDataError(f"dataset folder {root} does not exist")
    if not folder.is_dir():
        have = sorted(p.name for p in root.iterdir() if p.is_dir())
        raise ComPreDDataError(f"subset {subset!r} not found: no folder {folder} (subsets present: {have})")
    files = []
    for ext in ("jsonl", "json", "parquet"):
        files += [folder / f"{split}.{ext}"] if (folder / f"{split}.{ext}").is_file() else []
        files += sorted(folder.glob(f"{split}-*.{ext}"))
    if not files:
        have = sorted(p.name for p in folder.iterdir())
        raise ComPreDDataError(f"split {split!r} not found in {folder} (files present: {have})")
    return files


def describe_source(dataset: str, subsets: Sequence[str], split: str) -> str:
    """Where a split's rows come from, for error messages: its files, or the Hub id, config and split."""
    if not is_local(dataset):
        return ", ".join(f"{dataset}:{f'{s}_test_prompts' if split == PROMPT_SPLIT else s}/{split}" for s in subsets)
    try:
        return ", ".join(str(p) for s in subsets for p in split_files(Path(dataset).expanduser(), s, split))
    except ComPreDDataError:
        return f"{dataset} ({', '.join(subsets)}/{split})"


def load_split(dataset: str, subset: str, split: str, cache_dir: Optional[str] = None) -> datasets.Dataset:
    """One split of one subset, validated, from the Hub or a local folder in the Hub layout."""
    schema = PROMPT_SCHEMA if split == PROMPT_SPLIT else PREFERENCE_SCHEMA
    if not is_local(dataset):
        config = f"{subset}_test_prompts" if split == PROMPT_SPLIT else subset
        ds = datasets.load_dataset(dataset, config, split=split, cache_dir=cache_dir)
        validate(ds, schema, source=f"{dataset}:{config}/{split}")
        return ds
    parts = []
    for path in split_files(Path(dataset).expanduser(), subset, split):
        part = _load_file(path, cache_dir)
        validate(part, schema, source=str(path), jsonl=path if path.suffix != ".parquet" else None)
        parts.append(_cast_to_schema(part, schema))
    try:
        return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    except ValueError as err:  # e.g. an extra column with different types in two shards
        raise ComPreDDataError(f"shards of {subset}/{split} in {dataset} do not share one schema: {err}") from err


_FEATURE = {"str": "string", "int": "int64", "float": "float64"}


def _cast_to_schema(ds: datasets.Dataset, schema: dict) -> datasets.Dataset:
    """Schema fields in their documented types, so shards that Arrow typed differently line up
    (a float field holding only whole numbers in one file comes out as int64 there)."""
    features = ds.features.copy()
    changed = False
    for name, kind in schema.items():
        want = datasets.Value(_FEATURE[kind])
        if features[name] != want:
            features[name], changed = want, True
    return ds.cast(features) if changed else ds


def _schema_for(path: Path) -> dict:
    return PROMPT_SCHEMA if path.parent.name.endswith("_test_prompts") else PREFERENCE_SCHEMA


def _load_file(path: Path, cache_dir: Optional[str]) -> datasets.Dataset:
    builder = "parquet" if path.suffix == ".parquet" else "json"
    try:
        return datasets.load_dataset(builder, data_files=str(path), split="train", cache_dir=cache_dir)
    except Exception as err:  # Arrow's message names neither the line nor the field: find them
        if builder == "json":
            problem = locate_jsonl_problem(path, _schema_for(path))
            if problem:
                raise ComPreDDataError(problem) from err
        raise ComPreDDataError(f"{path}: could not be read as {builder}: {err}") from err


def _matches(value, kind: str) -> bool:
    return isinstance(value, _PY_TYPES[kind]) and not isinstance(value, bool)


def locate_jsonl_problem(path: Path, schema: Optional[dict] = None) -> Optional[str]:
    """The first malformed line, missing field, null or wrongly typed value of a JSONL file.

    Only called on the error path (Arrow failed, or a column came out with the wrong type), so
    streaming through the file once is fine. Lines are counted from 1, as editors do.
    """
    first_types: dict[str, type] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                return f"{path}: line {lineno} is not valid JSON ({err.msg} at column {err.colno})"
            if not isinstance(row, dict):
                return f"{path}: line {lineno} is not a JSON object"
            for key, kind in (schema or {}).items():
                if key not in row or row[key] is None:
                    return f"{path}: line {lineno}, field {key!r}: missing"
                if not _matches(row[key], kind):
                    return (f"{path}: line {lineno}, field {key!r}: wrong type: expected {kind}, found "
                            f"{type(row[key]).__name__} ({row[key]!r:.60})")
            for key, value in row.items():  # fields outside the schema: consistent types at least
                if value is None or key in (schema or {}):
                    continue
                kind = float if isinstance(value, (int, float)) and not isinstance(value, bool) else type(value)
                if first_types.setdefault(key, kind) is not kind:
                    return (f"{path}: line {lineno}, field {key!r}: wrong type {type(value).__name__} "
                            f"({value!r:.60}); earlier rows hold {first_types[key].__name__}")
    return None


# ----------------------------------------------------------------------------------------------------
# Validation (vectorised with pyarrow.compute: no Python loop over rows)


def _arrow_kind(typ: pa.DataType) -> Optional[str]:
    if pa.types.is_string(typ) or pa.types.is_large_string(typ):
        return "str"
    if pa.types.is_integer(typ):
        return "int"
    if pa.types.is_floating(typ):
        return "float"
    if pa.types.is_null(typ):
        return "null"
    return None


def validate(ds: datasets.Dataset, schema: dict, source: str, jsonl: Optional[Path] = None) -> None:
    """Raise ``ComPreDDataError`` naming source, row (0-based, in that file) and field for schema problems.

    Schema problems are errors: a missing field, a null, a value of the wrong type, ``labels`` not 0/1.
    Content problems (empty texts, identical responses) are skipped and counted later, not here.
    """
    table = ds.data.table
    if ds.num_rows == 0:
        raise ComPreDDataError(f"{source}: no rows")
    for name, kind in schema.items():
        if name not in table.column_names:
            raise ComPreDDataError(f"{source}: field {name!r} is missing (row 0 and every other row)")
        col = table.column(name)
        have = _arrow_kind(col.type)
        if have == "null":
            raise ComPreDDataError(f"{source}: row 0, field {name!r}: missing (null in every row)")
        ok = have == kind or (kind == "float" and have == "int")
        if not ok and kind == "int" and have == "float":  # 3.0 is fine; the first 3.5 is the culprit
            frac = pc.not_equal(col, pc.floor(col))
            ok = not pc.any(frac).as_py()
            if not ok:
                row = pc.index(frac, True).as_py()
                raise ComPreDDataError(f"{source}: row {row}, field {name!r}: wrong type: expected int, "
                                       f"found {col[row].as_py()!r}")
        if not ok and jsonl is not None:  # JSON: Arrow widened the column for a few bad values; find them
            problem = locate_jsonl_problem(jsonl, schema)
            if problem:
                raise ComPreDDataError(problem)
        if not ok:
            raise ComPreDDataError(
                f"{source}: row 0, field {name!r}: wrong type: expected {kind}, found {col.type} "
                f"(value {col[0].as_py()!r:.60})")
        nulls = pc.is_null(col)
        if pc.any(nulls).as_py():
            row = pc.index(nulls, True).as_py()
            raise ComPreDDataError(f"{source}: row {row}, field {name!r}: missing (null)")
    if "labels" in schema:
        good = pc.is_in(table.column("labels"), value_set=pa.array([0, 1], type=table.column("labels").type))
        if not pc.all(good).as_py():
            row = pc.index(good, False).as_py()
            raise ComPreDDataError(
                f"{source}: row {row}, field 'labels': must be 0 or 1 (1: A preferred, 0: B preferred), "
                f"found {table.column('labels')[row].as_py()!r}")


# ----------------------------------------------------------------------------------------------------
# Rows -> pairs


def _table(ds: datasets.Dataset) -> pa.Table:
    """The Arrow table behind ``ds``, with any pending ``select`` applied."""
    return ds.flatten_indices().data.table if ds._indices is not None else ds.data.table


def _blank(col) -> pa.Array:
    return pc.equal(pc.utf8_trim_whitespace(col), "")


def drop_content_problems(ds: datasets.Dataset, stats: PrepStats, prompts_only: bool = False) -> datasets.Dataset:
    """Skip (and count) rows whose content cannot make a training example.

    Documented skips: empty title and body together; an empty response (A or B); A identical to B.
    """
    def problems(table: pa.Table) -> dict:
        out = {"empty_post": pc.and_(_blank(table.column("title")), _blank(table.column("history")))}
        if not prompts_only:
            a, b = table.column("human_ref_A"), table.column("human_ref_B")
            out["empty_response"] = pc.or_(_blank(a), _blank(b))
            out["identical_responses"] = pc.equal(pc.utf8_trim_whitespace(a), pc.utf8_trim_whitespace(b))
        return out

    bad = problems(_table(ds))
    any_bad = None
    for reason, mask in bad.items():
        mask = pc.and_not(mask, any_bad) if any_bad is not None else mask  # count each row once
        stats.skip(reason, pc.sum(mask).as_py() or 0)
        any_bad = mask if any_bad is None else pc.or_(any_bad, mask)
    if not pc.any(any_bad).as_py():
        return ds
    keep = np.flatnonzero(~any_bad.to_numpy(zero_copy_only=False))
    return ds.select(keep)


def to_pairs(ds: datasets.Dataset) -> datasets.Dataset:
    """A/B rows -> (community, post_id, title, post, chosen, rejected) using ``labels`` (1: A, 0: B)."""
    def convert(batch: dict) -> dict:
        a_wins = [label == 1 for label in batch["labels"]]
        pick = lambda x, y: [u if w else v for u, v, w in zip(batch[x], batch[y], a_wins)]  # noqa: E731
        return {
            "community": [normalize_domain(d) for d in batch["domain"]],
            "post_id": batch["post_id"],
            "title": batch["title"],
            "post": batch["history"],
            "chosen": pick("human_ref_A", "human_ref_B"),
            "rejected": pick("human_ref_B", "human_ref_A"),
            "score_chosen": pick("score_A", "score_B"),
            "score_rejected": pick("score_B", "score_A"),
            "score_ratio": [float(r) for r in batch["score_ratio"]],
        }

    return ds.map(convert, batched=True, remove_columns=ds.column_names, desc="A/B -> chosen/rejected")


def to_prompts(ds: datasets.Dataset) -> datasets.Dataset:
    """Test-prompt rows -> one row per ``post_id`` (first occurrence), in the file's order."""
    codes = _post_codes(ds)
    _, first = np.unique(codes, return_index=True)
    ds = ds.select(np.sort(first))

    def convert(batch: dict) -> dict:
        return {"community": [normalize_domain(d) for d in batch["domain"]], "post_id": batch["post_id"],
                "title": batch["title"], "post": batch["history"]}

    return ds.map(convert, batched=True, remove_columns=ds.column_names, desc="one prompt per post")


def _post_codes(ds: datasets.Dataset) -> np.ndarray:
    """post_id as integer codes (Arrow dictionary encoding), without building Python strings."""
    encoded = pc.dictionary_encode(_table(ds).column("post_id")).combine_chunks()
    return encoded.indices.to_numpy(zero_copy_only=False)


def subsample(ds: datasets.Dataset, min_score_ratio: Optional[float], max_pairs_per_post: Optional[int],
              seed: int, stats: PrepStats) -> datasets.Dataset:
    """The paper's training subsample: ``score_ratio >= min_score_ratio``, then at most
    ``max_pairs_per_post`` pairs per post, chosen at random under ``seed`` (the original was unseeded).

    Vectorised: one random key per row, a lexsort by (post, key), and a rank within each post.
    """
    n0 = ds.num_rows
    if min_score_ratio is not None:
        ratio = _table(ds).column("score_ratio").to_numpy()
        keep = np.flatnonzero(ratio >= min_score_ratio)
        ds = ds.select(keep) if len(keep) < ds.num_rows else ds
    if max_pairs_per_post is not None and ds.num_rows:
        codes = _post_codes(ds)
        keys = np.random.default_rng(seed).random(len(codes))
        order = np.lexsort((keys, codes))  # grouped by post, random order inside a post
        sorted_codes = codes[order]
        starts = np.r_[0, np.flatnonzero(np.diff(sorted_codes)) + 1]
        rank = np.arange(len(order)) - np.repeat(starts, np.diff(np.r_[starts, len(order)]))
        keep = np.sort(order[rank < max_pairs_per_post])
        ds = ds.select(keep) if len(keep) < ds.num_rows else ds
    stats.subsampled_out += n0 - ds.num_rows
    return ds.flatten_indices() if ds._indices is not None else ds


def seeded_limit(ds: datasets.Dataset, limit: Optional[int], seed: int) -> datasets.Dataset:
    """At most ``limit`` rows, drawn at random under ``seed`` and kept in their original order."""
    if limit is None or ds.num_rows <= limit:
        return ds
    keep = np.sort(np.random.default_rng(seed).choice(ds.num_rows, size=limit, replace=False))
    return ds.select(keep).flatten_indices()


def count_true(ds: datasets.Dataset, column: str) -> int:
    return int(pc.sum(_table(ds).column(column)).as_py() or 0)


def drop_where(ds: datasets.Dataset, column: str) -> datasets.Dataset:
    """Rows whose boolean ``column`` is false (vectorised; no Python loop over rows)."""
    mask = _table(ds).column(column).to_numpy(zero_copy_only=False)
    return ds.select(np.flatnonzero(~mask)).flatten_indices() if mask.any() else ds


def communities(ds: datasets.Dataset) -> list[str]:
    """Sorted distinct communities of a prepared split."""
    return sorted(pc.unique(_table(ds).column("community")).to_pylist())


def load_pairs(dataset: str, subsets: Sequence[str], split: str, stats: PrepStats,
               cache_dir: Optional[str] = None) -> datasets.Dataset:
    """Validated preference pairs of one split across subsets (content problems skipped, counted)."""
    parts = []
    for subset in subsets:
        raw = load_split(dataset, subset, split, cache_dir)
        stats.rows += raw.num_rows
        parts.append(to_pairs(drop_content_problems(raw, stats)))
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def load_prompts(dataset: str, subsets: Sequence[str], stats: PrepStats,
                 cache_dir: Optional[str] = None) -> datasets.Dataset:
    parts = []
    for subset in subsets:
        raw = load_split(dataset, subset, PROMPT_SPLIT, cache_dir)
        stats.rows += raw.num_rows
        parts.append(to_prompts(drop_content_problems(raw, stats, prompts_only=True)))
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
