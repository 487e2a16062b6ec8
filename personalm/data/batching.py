"""Evaluation and prediction order (rows sorted by length, so a batch is not padded to an outlier) and the
training orders that are not a plain shuffle: length-grouped batches, and community-balanced draws.

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


def community_codes(ds: datasets.Dataset) -> tuple[list[str], np.ndarray]:
    """The communities of a split (sorted) and each row's community as a code into them (read as Arrow)."""
    column = ds.select_columns(["community"]).with_format("arrow")[:].column("community")
    encoded = pc.dictionary_encode(column).combine_chunks()
    names = encoded.dictionary.to_pylist()
    order = np.argsort(names)
    rank = np.empty(len(names), dtype=np.int64)
    rank[order] = np.arange(len(names))
    return sorted(names), rank[encoded.indices.to_numpy(zero_copy_only=False)]


def community_probabilities(counts: np.ndarray, tau: float) -> np.ndarray:
    """P(community g) proportional to n_g ** tau: tau 1, each pair equally likely (the plain shuffle's
    frequencies); tau 0, each community equally likely; in between, small communities drawn more often."""
    weights = counts.astype(np.float64) ** tau
    return weights / weights.sum()


class CommunityBalancedSampler(DistributedSampler):
    """Training draws by community: each draw picks community g with probability proportional to n_g ** tau, then
    the next row of that community's seeded shuffle (a community's rows repeat only once all of them were drawn,
    reshuffled each time round). An epoch is as many draws as the split has rows (padded, as ``DistributedSampler``
    pads, so every process gets as many); under DDP the draws are dealt out in turn, so every process runs the
    same number of steps and the processes together see the one sequence of draws. Deterministic per (seed, epoch),
    so a resumed loader replays it exactly."""

    def __init__(self, ds, codes: np.ndarray, tau: float, num_replicas: int, rank: int, seed: int):
        super().__init__(ds, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.codes, self.tau = codes, tau
        self.counts = np.bincount(codes)
        if tau < 0:
            raise ValueError(f"community sampling tau must be >= 0, got {tau}")

    def draws(self) -> np.ndarray:
        """Every row the epoch draws, in order (all processes' together)."""
        rng = np.random.default_rng([self.seed, self.epoch])
        groups = rng.choice(len(self.counts), size=self.total_size, p=community_probabilities(self.counts, self.tau))
        rows = np.empty(self.total_size, dtype=np.int64)
        for g in range(len(self.counts)):
            where = np.flatnonzero(groups == g)
            members = np.flatnonzero(self.codes == g)
            rounds = -(-len(where) // max(len(members), 1))
            cycle = np.concatenate([rng.permutation(members) for _ in range(rounds)]) if rounds else members[:0]
            rows[where] = cycle[:len(where)]
        return rows

    def __iter__(self):
        return iter(self.draws()[self.rank::self.num_replicas].tolist())
