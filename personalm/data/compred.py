"""ComPreD rows: loading (Hub id or local folder in the Hub layout) and validation against the schema.

Files are read in validated Arrow chunks (parquet row groups streamed), never as whole-split Python lists
nor copied into a cache: the real ``train_pref`` splits hold millions of rows.

Where a split's files are (a local folder in the Hub layout, or the Hub) is ``personalm.data.sources``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence

import pyarrow as pa
import pyarrow.compute as pc

from personalm.jsonl import JSONLineError, read_jsonl

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
    subsampled_out: int = 0  # training rows left out by the paper's subsample (score ratio, pairs per post)
    capped_out: int = 0  # rows left out by the seeded cap (max_train_pairs / max_eval_pairs)
    shortened: int = 0  # rows whose post was shortened or whose response tail was cut
    post_shortened: int = 0  # rows whose post body was shortened to fit the prompt budget
    response_cut: int = 0  # rows with a response cut to fit max_length
    dropped: int = 0  # rows whose markers, community and title alone exceed the prompt budget
    rows_out: int = 0  # rows served

    def skip(self, reason: str, count: int) -> None:
        if count:
            self.skipped[reason] = self.skipped.get(reason, 0) + count


def schema_of(split: str) -> dict:
    return PROMPT_SCHEMA if split == PROMPT_SPLIT else PREFERENCE_SCHEMA


# ----------------------------------------------------------------------------------------------------
# Reading: validated chunks of one file, streamed (parquet row groups, never a whole split in memory)

CHUNK_ROWS = 20_000  # rows per chunk read from a parquet file


def parquet_row_groups(path: Path) -> list[tuple[int, int]]:
    """(first row, rows) of each row group of a parquet file: the units preparation splits work into."""
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(path).metadata
    starts, out = 0, []
    for i in range(meta.num_row_groups):
        n = meta.row_group(i).num_rows
        out.append((starts, n))
        starts += n
    return out


def read_chunks(path: Path, schema: dict, columns: Optional[Sequence[str]] = None,
                row_groups: Optional[Sequence[int]] = None, chunk_rows: Optional[int] = None
                ) -> Iterator[tuple[int, pa.Table]]:
    """``(first row in the file, table)`` chunks of one file, validated against ``schema`` (errors name the
    file, the row counted from 0 in that file, and the field), schema fields in their documented types.

    ``columns``: the fields to read (default: every schema field; validation covers the fields read).
    ``row_groups``: of a parquet file, only these (in order); a JSON-lines file is read whole (the Hub
    and large local copies are parquet).
    """
    path, chunk_rows = Path(path), chunk_rows or CHUNK_ROWS
    columns = list(columns or schema)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(path)
        except Exception as err:
            raise ComPreDDataError(f"{path}: could not be read as parquet: {err}") from err
        read = {k: schema[k] for k in columns if k in schema}  # the fields validated: those read
        check_fields(pf.schema_arrow, read, str(path))
        if pf.metadata.num_rows == 0:
            raise ComPreDDataError(f"{path}: no rows")
        groups = list(range(pf.metadata.num_row_groups)) if row_groups is None else list(row_groups)
        starts = [s for s, _ in parquet_row_groups(path)]
        for g in groups:
            offset = starts[g]
            for batch in pf.iter_batches(batch_size=chunk_rows, row_groups=[g], columns=columns):
                table = pa.Table.from_batches([batch])
                validate(table, read, str(path), row_offset=offset)
                yield offset, cast_to_schema(table, schema)
                offset += batch.num_rows
        return
    table = _read_jsonl(path, schema)
    validate(table, schema, str(path), jsonl=path)
    table = cast_to_schema(table.select([c for c in columns if c in table.column_names]), schema)
    for offset in range(0, table.num_rows, chunk_rows):
        yield offset, table.slice(offset, chunk_rows)


def _read_jsonl(path: Path, schema: dict) -> pa.Table:
    import pyarrow.json as pajson

    try:
        return pajson.read_json(path, read_options=pajson.ReadOptions(block_size=1 << 24))
    except Exception as err:  # Arrow's message names neither the line nor the field: find them
        problem = locate_jsonl_problem(path, schema)
        if problem:
            raise ComPreDDataError(problem) from err
        raise ComPreDDataError(f"{path}: could not be read as JSON lines: {err}") from err


_ARROW_TYPE = {"str": pa.string(), "int": pa.int64(), "float": pa.float64()}


def cast_to_schema(table: pa.Table, schema: dict) -> pa.Table:
    """Schema fields in their documented types, so shards that Arrow typed differently line up (a float
    field holding only whole numbers in one file comes out as int64 there; parquet may hold large_string)."""
    for i, name in enumerate(table.column_names):
        want = _ARROW_TYPE.get(schema.get(name))
        if want is not None and table.column(i).type != want:
            table = table.set_column(i, name, pc.cast(table.column(i), want))
    return table


def _matches(value, kind: str) -> bool:
    return isinstance(value, _PY_TYPES[kind]) and not isinstance(value, bool)


def locate_jsonl_problem(path: Path, schema: Optional[dict] = None) -> Optional[str]:
    """The first malformed line, missing field, null or wrongly typed value of a JSONL file.

    Only called on the error path (Arrow failed, or a column came out with the wrong type), so
    streaming through the file once is fine. Lines are counted from 1, as editors do.
    """
    first_types: dict[str, type] = {}
    try:
        for lineno, row in read_jsonl(path):
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
    except JSONLineError as err:
        return str(err)
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


def check_fields(arrow_schema: pa.Schema, schema: dict, source: str) -> None:
    """A file's fields and their types, before any row is read: missing or wrongly typed whole columns."""
    for name, kind in schema.items():
        if name not in arrow_schema.names:
            raise ComPreDDataError(f"{source}: field {name!r} is missing (row 0 and every other row)")
        have = _arrow_kind(arrow_schema.field(name).type)
        if have == "null":
            raise ComPreDDataError(f"{source}: row 0, field {name!r}: missing (null in every row)")
        if not (have == kind or (kind == "float" and have == "int") or (kind == "int" and have == "float")):
            raise ComPreDDataError(f"{source}: row 0, field {name!r}: wrong type: expected {kind}, found "
                                   f"{arrow_schema.field(name).type}")


def validate(table: pa.Table, schema: dict, source: str, jsonl: Optional[Path] = None, row_offset: int = 0) -> None:
    """Raise ``ComPreDDataError`` naming source, row (0-based, in that file: ``row_offset`` is the table's
    first row there) and field for schema problems.

    Schema problems are errors: a missing field, a null, a value of the wrong type, ``labels`` not 0/1.
    Content problems (empty texts, identical responses) are skipped and counted later, not here.
    """
    if table.num_rows == 0 and row_offset == 0:
        raise ComPreDDataError(f"{source}: no rows")
    for name, kind in schema.items():
        if name not in table.column_names:
            raise ComPreDDataError(f"{source}: field {name!r} is missing (row 0 and every other row)")
        col = table.column(name)
        have = _arrow_kind(col.type)
        if have == "null":
            raise ComPreDDataError(f"{source}: row {row_offset}, field {name!r}: missing (null in every row)")
        ok = have == kind or (kind == "float" and have == "int")
        if not ok and kind == "int" and have == "float":  # 3.0 is fine; the first 3.5 is the culprit
            frac = pc.not_equal(col, pc.floor(col))
            ok = not pc.any(frac).as_py()
            if not ok:
                row = pc.index(frac, True).as_py()
                raise ComPreDDataError(f"{source}: row {row_offset + row}, field {name!r}: wrong type: expected "
                                       f"int, found {col[row].as_py()!r}")
        if not ok and jsonl is not None:  # JSON: Arrow widened the column for a few bad values; find them
            problem = locate_jsonl_problem(jsonl, schema)
            if problem:
                raise ComPreDDataError(problem)
        if not ok:
            raise ComPreDDataError(
                f"{source}: row {row_offset}, field {name!r}: wrong type: expected {kind}, found {col.type} "
                f"(value {col[0].as_py()!r:.60})")
        nulls = pc.is_null(col)
        if pc.any(nulls).as_py():
            row = pc.index(nulls, True).as_py()
            raise ComPreDDataError(f"{source}: row {row_offset + row}, field {name!r}: missing (null)")
    if "labels" in schema and "labels" in table.column_names:
        labels = table.column("labels")
        good = pc.is_in(labels, value_set=pa.array([0, 1], type=labels.type))
        if not pc.all(good).as_py():
            row = pc.index(good, False).as_py()
            raise ComPreDDataError(
                f"{source}: row {row_offset + row}, field 'labels': must be 0 or 1 (1: A preferred, 0: B preferred), "
                f"found {labels[row].as_py()!r}")
