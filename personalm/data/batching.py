"""Evaluation and prediction order: rows sorted by length, so a batch is not padded to an outlier.

Evaluation metrics and predictions are keyed by each row's ``index`` column, so their order is free; the
sort is stable (ties keep the split's order), the same on every process, and under DDP each process takes
every N-th row of it (Lightning's distributed sampler over the sorted split), so every process runs
batches of similar lengths. Training keeps its seeded shuffle: there DPO and SFT rows are packed instead.
"""

from __future__ import annotations

import datasets
import numpy as np
import pyarrow.compute as pc

LENGTH_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")


def row_lengths(ds: datasets.Dataset) -> np.ndarray:
    """Tokens per row: prompt + chosen + rejected, those of them the split has (read as Arrow, no Python lists)."""
    columns = [c for c in LENGTH_COLUMNS if c in ds.column_names]
    table = ds.select_columns(columns).with_format("arrow")[:]
    total = np.zeros(ds.num_rows, dtype=np.int64)
    for c in columns:
        total += pc.list_value_length(table.column(c)).to_numpy(zero_copy_only=False)
    return total


def by_length(ds: datasets.Dataset) -> datasets.Dataset:
    """The split in order of decreasing length (a view: an indices mapping, nothing copied); the longest
    batch comes first, so a length that does not fit in memory fails at once."""
    order = np.argsort(-row_lengths(ds), kind="stable")
    return ds.select(order)
