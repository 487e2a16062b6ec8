"""Length grouping (``personalm.data.batching``): the training sampler for rows that are not packed."""

import numpy as np
import torch
from torch.utils.data import DistributedSampler

from personalm.data.batching import LengthGroupedSampler


def padding(order: list, lengths: np.ndarray, batch: int) -> int:
    """Tokens of padding when each batch is padded to its longest row."""
    return sum(int(lengths[b].max() * len(b) - lengths[b].sum())
               for b in (np.array(order[k:k + batch]) for k in range(0, len(order), batch)))


def test_every_row_once_an_epoch_less_padding_and_a_new_order_each_epoch():
    lengths = np.random.default_rng(0).lognormal(5, 1, size=203).astype(int) + 1
    rows = list(range(len(lengths)))
    grouped = LengthGroupedSampler(rows, lengths, batch_size=8, num_replicas=1, rank=0, seed=3)  # window 50
    plain = DistributedSampler(rows, num_replicas=1, rank=0, shuffle=True, seed=3)
    first = list(grouped)
    assert sorted(first) == rows
    assert padding(first, lengths, 8) < padding(list(plain), lengths, 8) / 10  # measured: 4,396 vs 72,523
    assert list(grouped) == first  # deterministic: a resumed loader replays it
    grouped.set_epoch(1)
    second = list(grouped)
    assert sorted(second) == rows and second != first


def test_processes_share_each_step_and_run_as_many_rows():
    lengths = np.arange(1, 38)  # 37 rows, 2 processes, 4 rows each a step: the sampler pads to 38
    rows = list(range(len(lengths)))
    parts = [list(LengthGroupedSampler(rows, lengths, 4, 2, rank, seed=0, window=2)) for rank in (0, 1)]
    assert len(parts[0]) == len(parts[1]) == 19
    assert set(parts[0]) | set(parts[1]) == set(rows)
    for step in range(4):  # at each optimizer step both processes hold rows of one sorted window's batch
        a, b = (lengths[p[step * 4:(step + 1) * 4]] for p in parts)
        assert abs(int(a.max()) - int(b.max())) <= 8, (a, b)
    torch.manual_seed(0)  # the sampler never draws from the global RNG
    before = torch.rand(1)
    torch.manual_seed(0)
    list(LengthGroupedSampler(rows, lengths, 4, 2, 0, seed=0))
    assert torch.equal(torch.rand(1), before)
