"""Evaluation and prediction order: rows sorted by length, so a batch is not padded to an outlier.

Evaluation metrics and predictions are keyed by each row's ``index`` column, so their order is free; the
sort is stable (ties keep the split's order), the same on every process, and under DDP each process takes
every N-th row of it (Lightning's distributed sampler over the sorted split), so every process runs
batches of similar lengths. In training DPO and SFT rows are packed instead; the reward model's rows can
be grouped by ``LengthGroupedSampler`` (``data.train_group_by_length``).
"""

from __future__ import annotations

import datasets
import numpy as np
import pyarrow.compute as pc
import torch
from torch.utils.data import DistributedSampler

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


class LengthGroupedSampler(DistributedSampler):
    """Training order for rows that are not packed (the reward model's pairs): shuffled under (seed, epoch),
    then sorted by length within windows of ``window`` optimizer steps, cut into the steps' batches, and the
    batches shuffled again, so a batch holds rows of similar length while the epoch still mixes lengths.

    One order for all processes: each optimizer step's rows are taken together and shared out (every N-th row
    to each process), so the processes run batches of similar length at each step and as many of them as a
    ``DistributedSampler`` gives. Deterministic per (seed, epoch), so a resumed loader replays it exactly."""

    def __init__(self, ds, lengths: np.ndarray, batch_size: int, num_replicas: int, rank: int, seed: int,
                 window: int = 50):
        super().__init__(ds, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.lengths, self.batch_size, self.window = lengths, batch_size, window

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.dataset), generator=g).tolist()
        order += order[: self.total_size - len(order)]  # as DistributedSampler pads: every process as many rows
        step = self.batch_size * self.num_replicas
        batches = []
        for start in range(0, len(order), step * self.window):
            window = sorted(order[start:start + step * self.window], key=lambda i: -self.lengths[i])
            batches += [window[k:k + step] for k in range(0, len(window), step)]
        last = batches.pop() if len(batches[-1]) < step else None  # a short last batch stays last
        batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()] + ([last] if last else [])
        return iter([i for batch in batches for i in batch[self.rank::self.num_replicas]])
