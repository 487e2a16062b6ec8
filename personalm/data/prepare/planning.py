"""Pass 1 of a preparation, in this process, streamed chunk by chunk: every row validated (file, row, field in
errors), content problems skipped and counted, then the selection computed on small numpy arrays (post codes,
score ratios): the paper's subsample, the caps, one prompt per post. The result is, per unit of a source file
(a parquet row group, or a whole JSON-lines file), the rows kept."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from personalm.data import compred, pairs
from personalm.data.compred import ComPreDDataError, PrepStats
from personalm.data.prepare.progress import Progress
from personalm.data.prepare.spec import RowSpec
from personalm.data.prompt import normalize_domain


@dataclass
class Unit:
    """A piece of one source file that a task reads: a parquet row group (``row_group``) or a whole
    JSON-lines file (None); ``rows``: the kept rows, as positions within the unit."""

    file: str
    row_group: Optional[int]
    rows: np.ndarray


@dataclass
class Plan:
    units: list[Unit]
    communities: list[str]  # of the rows kept (the random-community draws pick among them)
    kept: int


class _Codes:
    """Strings to dense integer codes, chunk by chunk (a dictionary per chunk, then its few distinct values)."""

    def __init__(self):
        self.codes: dict = {}

    def __call__(self, column, prefix=None) -> np.ndarray:
        import pyarrow.compute as pc

        encoded = pc.dictionary_encode(column).combine_chunks()
        values = encoded.dictionary.to_pylist()
        mapping = np.array([self.codes.setdefault((prefix, v), len(self.codes)) for v in values], dtype=np.int64)
        return mapping[encoded.indices.to_numpy(zero_copy_only=False)] if len(values) else np.zeros(0, np.int64)


def plan_split(files: Sequence[tuple[str, list[Path]]], spec: RowSpec, stats: PrepStats, progress: Progress,
               where: str = "") -> Plan:
    """Pass 1 over ``files`` ((subset, its files) in order): validation, documented skips, the selection.
    ``where``: the rows' source as errors name it (default: the files)."""
    where = where or files_named(files)
    prompts = spec.rows == "prompts"
    schema = compred.schema_of(spec.split)
    post_codes, community_codes, names = _Codes(), _Codes(), {}
    units, unit_rows, codes, communities, ratios = [], [], [], [], []
    with progress.step("read and check", unit="rows") as step:
        for subset, paths in files:
            for path in paths:
                groups = list(range(len(compred.parquet_row_groups(path)))) if path.suffix == ".parquet" else [None]
                for g in groups:
                    start, kept = None, []
                    for offset, chunk in compred.read_chunks(path, schema, row_groups=None if g is None else [g]):
                        start = offset if start is None else start
                        stats.rows += chunk.num_rows
                        problems = pairs.content_problems(chunk, prompts_only=prompts)
                        bad = np.zeros(chunk.num_rows, dtype=bool)
                        for reason, mask in problems.items():
                            stats.skip(reason, int(mask.sum()))
                            bad |= mask
                        ok = np.flatnonzero(~bad)
                        kept.append(offset - start + ok)
                        step.update(chunk.num_rows)  # rows read, skipped ones included
                        chunk = chunk.take(ok)
                        # prompts: one per post within a subset; pairs: a post's pairs across subsets
                        codes.append(post_codes(chunk.column("post_id"), prefix=subset if prompts else None))
                        comm = community_codes(chunk.column("domain"))
                        communities.append(comm)
                        if not prompts:
                            ratios.append(chunk.column("score_ratio").to_numpy())
                    units.append(Unit(str(path), g, np.zeros(0, np.int64)))
                    unit_rows.append(np.concatenate(kept) if kept else np.zeros(0, np.int64))
    for (_, value), code in community_codes.codes.items():
        names[code] = value
    codes_all = np.concatenate(codes) if codes else np.zeros(0, np.int64)
    community_all = np.concatenate(communities) if communities else np.zeros(0, np.int64)
    # one group per community, whatever its domain strings (a stratified cap draws per community)
    normalized = sorted({normalize_domain(v) for v in names.values()})
    group_of = np.array([normalized.index(normalize_domain(names[c])) for c in range(len(names))], dtype=np.int64)
    groups_all = group_of[community_all] if len(names) else community_all
    n = len(codes_all)
    if n == 0:
        raise empty_split(where, spec, stats, f"the documented skips ({stats.skipped})")
    if prompts:
        keep = pairs.first_per_post(codes_all)
    elif spec.split == "train_pref":
        keep = pairs.subsample(np.concatenate(ratios), codes_all, spec.min_score_ratio, spec.max_pairs_per_post,
                               spec.seed)
        stats.subsampled_out = n - len(keep)
        if len(keep) == 0:
            raise empty_split(where, spec, stats, f"the paper's subsample (the score-ratio threshold, min_score_ratio: "
                         f"{spec.min_score_ratio}, then max_pairs_per_post: {spec.max_pairs_per_post}; none of "
                         f"the {n} pairs passes)")
        keep = keep[_cap(spec, groups_all[keep])]
    else:
        keep = _cap(spec, groups_all)
    stats.capped_out = n - stats.subsampled_out - len(keep) if not prompts else 0
    # the kept positions back to their units
    bounds = np.cumsum([0] + [len(r) for r in unit_rows])
    for i, unit in enumerate(units):
        lo, hi = np.searchsorted(keep, [bounds[i], bounds[i + 1]])
        unit.rows = unit_rows[i][keep[lo:hi] - bounds[i]]
    kept_communities = np.unique(community_all[keep])
    return Plan(units=[u for u in units if len(u.rows)], kept=len(keep),
                communities=sorted({normalize_domain(names[c]) for c in kept_communities}))


def _cap(spec: RowSpec, communities: np.ndarray) -> np.ndarray:
    """Positions the split's cap keeps: drawn over all pairs, or per community with ``cap_floor``."""
    if spec.cap_floor is None:
        return pairs.seeded_limit(len(communities), spec.max_pairs, spec.seed)
    return pairs.stratified_limit(communities, spec.max_pairs, spec.cap_floor, spec.seed)


def files_named(files: Sequence[tuple[str, list[Path]]]) -> str:
    """The files of a split, as an error names where its rows come from."""
    return ", ".join(str(p) for _, paths in files for p in paths)


def empty_split(where: str, spec: RowSpec, stats: PrepStats, after: str) -> ComPreDDataError:
    return ComPreDDataError(f"{spec.split} of {where}: no rows left after {after}; {stats.rows} rows read")

