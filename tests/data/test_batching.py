"""Training orders (``personalm.data.batching``): length grouping for rows that are not packed, and draws balanced
by community."""

import numpy as np
import pytest
import torch
from torch.utils.data import DistributedSampler

from personalm.data.batching import CommunityBalancedSampler, LengthGroupedSampler, community_probabilities


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


# ----------------------------------------------------------------------------------------------------
# Community-balanced draws


def codes_of(sizes) -> np.ndarray:
    """Community codes of rows: ``sizes[g]`` rows of community g, interleaved."""
    return np.random.default_rng(1).permutation(np.repeat(np.arange(len(sizes)), sizes))


@pytest.mark.parametrize("tau", [0.0, 0.5, 1.0])
def test_community_frequencies_follow_n_to_the_tau(tau):
    """Communities of 900, 90 and 10 rows: over 20 epochs of 1,000 draws each community is drawn in proportion to
    n_g ** tau, within 4 standard errors of a binomial: tau 0 gives each a third, tau 1 its share of the rows."""
    sizes = np.array([900, 90, 10])
    codes = codes_of(sizes)
    sampler = CommunityBalancedSampler(list(range(len(codes))), codes, tau, num_replicas=1, rank=0, seed=0)
    drawn = []
    for epoch in range(20):
        sampler.set_epoch(epoch)
        drawn += list(sampler)
    assert len(drawn) == 20 * len(codes)  # an epoch is as many draws as rows
    frequencies = np.bincount(codes[drawn], minlength=3) / len(drawn)
    expected = sizes ** tau / (sizes ** tau).sum()
    assert np.allclose(community_probabilities(sizes, tau), expected)
    error = np.sqrt(expected * (1 - expected) / len(drawn))
    assert (np.abs(frequencies - expected) <= 4 * error).all(), (frequencies, expected)


def test_a_small_community_is_cycled_before_any_row_repeats_and_draws_replay():
    """tau 0: the 10-row community gets about a third of 1,000 draws: every one of its rows is drawn once before
    any is drawn again. The same epoch replays; the next differs."""
    codes = codes_of([900, 90, 10])
    sampler = CommunityBalancedSampler(list(range(len(codes))), codes, 0.0, num_replicas=1, rank=0, seed=3)
    first = list(sampler)
    small = [i for i in first if codes[i] == 2]
    assert len(small) > 250
    for start in range(0, len(small) - 9, 10):
        assert sorted(small[start:start + 10]) == sorted(np.flatnonzero(codes == 2).tolist())
    assert list(sampler) == first
    sampler.set_epoch(1)
    assert list(sampler) != first


def test_processes_take_turns_on_one_sequence_of_draws():
    """1,001 rows on 2 processes: both run 501 draws (the sampler pads, as DistributedSampler does) and together
    they are the one-process sequence, dealt out in turn."""
    codes = codes_of([900, 90, 11])
    rows = list(range(len(codes)))
    one = CommunityBalancedSampler(rows, codes, 0.5, num_replicas=1, rank=0, seed=0)
    parts = [list(CommunityBalancedSampler(rows, codes, 0.5, num_replicas=2, rank=r, seed=0)) for r in (0, 1)]
    assert len(parts[0]) == len(parts[1]) == 501
    padded = CommunityBalancedSampler(rows, codes, 0.5, num_replicas=2, rank=0, seed=0).draws()
    assert parts[0] == padded[0::2].tolist() and parts[1] == padded[1::2].tolist()
    assert len(list(one)) == 1001
