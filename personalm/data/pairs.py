"""ComPreD rows to training rows: documented skips, A/B to chosen/rejected, one prompt per post, the paper's
seeded subsample and the caps. Pure functions on Arrow tables and numpy arrays: no Python loop over the
millions of rows of a real split (``personalm.data.prepare`` streams a split through them chunk by chunk).
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from personalm.data.prompt import normalize_domain

CONTENT_PROBLEMS = ("empty_post", "empty_response", "identical_responses")  # documented skips, in this order


def _blank(col) -> pa.Array:
    return pc.equal(pc.utf8_trim_whitespace(col), "")


def content_problems(table: pa.Table, prompts_only: bool = False) -> dict[str, np.ndarray]:
    """Rows whose content cannot make a training example, by documented reason, each row under its first
    reason only: empty title and body together; an empty response (A or B); A identical to B (up to
    surrounding whitespace)."""
    masks = {"empty_post": pc.and_(_blank(table.column("title")), _blank(table.column("history")))}
    if not prompts_only:
        a, b = table.column("human_ref_A"), table.column("human_ref_B")
        masks["empty_response"] = pc.or_(_blank(a), _blank(b))
        masks["identical_responses"] = pc.equal(pc.utf8_trim_whitespace(a), pc.utf8_trim_whitespace(b))
    out, seen = {}, np.zeros(table.num_rows, dtype=bool)
    for reason, mask in masks.items():
        mask = mask.to_numpy(zero_copy_only=False) & ~seen
        out[reason] = mask
        seen |= mask
    return out


def communities_of(domain) -> pa.Array:
    """Subreddit names of a ``domain`` column (``normalize_domain`` once per distinct value)."""
    encoded = pc.dictionary_encode(domain).combine_chunks()
    names = pa.array([normalize_domain(d) for d in encoded.dictionary.to_pylist()], type=pa.string())
    return pc.take(names, encoded.indices)


def to_pairs(table: pa.Table) -> pa.Table:
    """A/B rows -> (community, post_id, title, post, chosen, rejected, score_chosen, score_rejected,
    score_ratio) using ``labels`` (1: A preferred, 0: B preferred); columns it is not given are left out."""
    a_wins = pc.equal(table.column("labels"), 1)
    have = set(table.column_names)
    out = {"community": communities_of(table.column("domain")), "post_id": table.column("post_id")}
    if {"title", "history"} <= have:
        out.update(title=table.column("title"), post=table.column("history"))
    for won, lost, a, b in (("chosen", "rejected", "human_ref_A", "human_ref_B"),
                            ("score_chosen", "score_rejected", "score_A", "score_B")):
        if {a, b} <= have:
            out[won] = pc.if_else(a_wins, table.column(a), table.column(b))
            out[lost] = pc.if_else(a_wins, table.column(b), table.column(a))
    if "score_ratio" in have:
        out["score_ratio"] = pc.cast(table.column("score_ratio"), pa.float64())
    return pa.table(out)


def to_prompts(table: pa.Table) -> pa.Table:
    """Test-prompt rows -> (community, post_id, title, post)."""
    return pa.table({"community": communities_of(table.column("domain")), "post_id": table.column("post_id"),
                     "title": table.column("title"), "post": table.column("history")})


def first_per_post(post_codes: np.ndarray) -> np.ndarray:
    """Positions of each post's first row, in order (one generation prompt per ``post_id``)."""
    _, first = np.unique(post_codes, return_index=True)
    return np.sort(first)


def subsample(score_ratio: np.ndarray, post_codes: np.ndarray, min_score_ratio: Optional[float],
              max_pairs_per_post: Optional[int], seed: int) -> np.ndarray:
    """Positions kept by the paper's training subsample, in order: ``score_ratio >= min_score_ratio``, then at
    most ``max_pairs_per_post`` pairs per post, chosen at random under ``seed`` (the original was unseeded).

    Vectorised: one random key per row passing the threshold, a lexsort by (post, key), a rank within a post.
    """
    keep = np.arange(len(post_codes))
    if min_score_ratio is not None:
        keep = np.flatnonzero(score_ratio >= min_score_ratio)
    if max_pairs_per_post is not None and len(keep):
        codes = post_codes[keep]
        keys = np.random.default_rng(seed).random(len(codes))
        order = np.lexsort((keys, codes))  # grouped by post, random order inside a post
        sorted_codes = codes[order]
        starts = np.r_[0, np.flatnonzero(np.diff(sorted_codes)) + 1]
        rank = np.arange(len(order)) - np.repeat(starts, np.diff(np.r_[starts, len(order)]))
        keep = keep[np.sort(order[rank < max_pairs_per_post])]
    return keep


def seeded_limit(n: int, limit: Optional[int], seed: int) -> np.ndarray:
    """Positions of at most ``limit`` of ``n`` rows, drawn at random under ``seed``, in their original order."""
    if limit is None or n <= limit:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=limit, replace=False))


def allocate(sizes: np.ndarray, limit: int, floor: int) -> np.ndarray:
    """How many rows of each group a cap of ``limit`` keeps when drawn per group: first each group's floor (all
    its rows if it has fewer), then the rest of the cap in proportion to the rows each has left (largest
    remainders first); a cap below the floors' sum shares itself out in proportion to them."""
    sizes = np.asarray(sizes, dtype=np.int64)
    if limit >= sizes.sum():
        return sizes.copy()
    floors = np.minimum(sizes, floor)
    if floors.sum() >= limit:
        return _largest_remainder(floors, limit)
    return floors + _largest_remainder(sizes - floors, limit - int(floors.sum()))


def _largest_remainder(weights: np.ndarray, total: int) -> np.ndarray:
    """``total`` shared out in proportion to ``weights`` (integers, each at most its weight), ties to the first."""
    exact = weights * total / max(weights.sum(), 1)
    out = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - out), kind="stable")
    out[order[:total - int(out.sum())]] += 1
    return np.minimum(out, weights)


def stratified_limit(groups: np.ndarray, limit: Optional[int], floor: int, seed: int) -> np.ndarray:
    """Positions of at most ``limit`` rows drawn per group (``groups``: a code per row): ``allocate``'s count of
    each group, drawn at random within it under ``seed``, in their original order. A small group keeps at least
    ``floor`` rows (or all it has) instead of losing rows in proportion to its size."""
    if limit is None or len(groups) <= limit:
        return np.arange(len(groups))
    codes, sizes = np.unique(groups, return_counts=True)
    rng = np.random.default_rng(seed)
    kept = [rng.choice(np.flatnonzero(groups == code), size=n, replace=False)
            for code, n in zip(codes, allocate(sizes, limit, floor))]
    return np.sort(np.concatenate(kept))


def communities(ds) -> list[str]:
    """Sorted distinct communities of a prepared split (a ``datasets.Dataset``)."""
    return sorted(set(ds.unique("community")))
