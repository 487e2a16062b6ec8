"""ComPreD rows: loading (Hub id or local folder in the Hub layout) and validation against the schema.

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
import pyarrow as pa
import pyarrow.compute as pc

from personalm.paths import local_path

log = logging.getLogger(__name__)

PREFERENCE_SPLITS = ("train_pref", "validation_pref", "test_pref")
PROMPT_SPLIT = "test_prompts"
# The one map from a phase (what metrics are logged under: train/..., val/..., test/...) to the split it reads,
# and the phases each Lightning entry point (``trainer.state.fn``) runs.
SPLIT_OF_PHASE = {"train": "train_pref", "val": "validation_pref", "test": "test_pref", "predict": PROMPT_SPLIT}
PHASES_OF = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("predict",)}

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
    """A local folder (which must exist) rather than a Hub id."""
    try:
        return local_path(dataset) is not None
    except FileNotFoundError:
        raise ComPreDDataError(f"dataset folder {dataset} does not exist") from None


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
