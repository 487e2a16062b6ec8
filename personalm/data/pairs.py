"""ComPreD rows to training rows: documented skips, A/B to chosen/rejected, one prompt per post, the paper's
seeded subsample. Vectorised with pyarrow and numpy on ``datasets.Dataset`` objects: no Python loop over the
millions of rows of a real split."""

from __future__ import annotations

from typing import Optional, Sequence

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from personalm.data.compred import PROMPT_SPLIT, PrepStats, load_split
from personalm.data.prompt import normalize_domain


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
