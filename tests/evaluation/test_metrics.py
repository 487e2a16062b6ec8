"""``PreferenceMetrics``: per-community preference figures, exact under DDP.

The hand-built batch (metric communities ["a", "b", "c", "d"]; "d" never gets a pair):

    pair  community  loss   chosen  rejected  margin  win   logp_w  logp_l
    0     a          0.5     1.0     0.0       1.0    1     -10     -12
    1     a          1.5     0.0     0.5      -0.5    0     -20     -14
    2     b          0.25    2.0     1.0       1.0    1      -8      -9
    3     c          1.0     0.5     0.5       0.0    0 (tie) -6    -6
    4     c          0.75   -1.0    -3.0       2.0    1      -4      -5

Overall means (weighted by pairs, 5 pairs):
    loss = 4.0 / 5 = 0.8; chosen = 2.5 / 5 = 0.5; rejected = -1.0 / 5 = -0.2; margins = 3.5 / 5 = 0.7;
    accuracy = 3 / 5 = 0.6; logps/chosen = -48 / 5 = -9.6; logps/rejected = -46 / 5 = -9.2.
    (The mean of community means would give loss (1 + 0.25 + 0.875) / 3 = 0.7083 instead.)
Per community:
    a (2 pairs): loss 1.0, chosen 0.5, rejected 0.25, margins 0.25, accuracy 0.5, logps -15 / -13
    b (1 pair) : loss 0.25, chosen 2.0, rejected 1.0, margins 1.0, accuracy 1.0, logps -8 / -9
    c (2 pairs): loss 0.875, chosen -0.25, rejected -1.25, margins 1.0, accuracy 0.5, logps -5 / -5.5
Accuracy macro = (0.5 + 1.0 + 0.5) / 3 = 2/3 (not the pair-weighted 0.6); worst = min = 0.5
("d" is left out, not counted as 0: with it the macro would be 0.5 and the worst 0).
"""

import json
import os
import socket
import time

import pytest
import torch
from torch.testing import assert_close

from personalm.evaluation.metrics import PAIR_METRICS, PreferenceMetrics

COMMUNITIES = ["a", "b", "c", "d"]
PAIRS = [  # community, loss, chosen reward, rejected reward, chosen logp, rejected logp
    ("a", 0.5, 1.0, 0.0, -10.0, -12.0),
    ("a", 1.5, 0.0, 0.5, -20.0, -14.0),
    ("b", 0.25, 2.0, 1.0, -8.0, -9.0),
    ("c", 1.0, 0.5, 0.5, -6.0, -6.0),
    ("c", 0.75, -1.0, -3.0, -4.0, -5.0),
]

EXPECTED = {
    "loss": 0.8, "rewards/chosen": 0.5, "rewards/rejected": -0.2, "rewards/margins": 0.7,
    "rewards/accuracies": 0.6, "logps/chosen": -9.6, "logps/rejected": -9.2,
    "loss/r_a": 1.0, "rewards/chosen/r_a": 0.5, "rewards/rejected/r_a": 0.25, "rewards/margins/r_a": 0.25,
    "rewards/accuracies/r_a": 0.5, "logps/chosen/r_a": -15.0, "logps/rejected/r_a": -13.0,
    "loss/r_b": 0.25, "rewards/chosen/r_b": 2.0, "rewards/rejected/r_b": 1.0, "rewards/margins/r_b": 1.0,
    "rewards/accuracies/r_b": 1.0, "logps/chosen/r_b": -8.0, "logps/rejected/r_b": -9.0,
    "loss/r_c": 0.875, "rewards/chosen/r_c": -0.25, "rewards/rejected/r_c": -1.25, "rewards/margins/r_c": 1.0,
    "rewards/accuracies/r_c": 0.5, "logps/chosen/r_c": -5.0, "logps/rejected/r_c": -5.5,
    "rewards/accuracies/macro": 2 / 3, "rewards/accuracies/worst": 0.5,
    "pairs": 5, "pairs/r_a": 2, "pairs/r_b": 1, "pairs/r_c": 2,
}


def _args(pairs, requires_grad=False):
    """``update`` arguments for the given rows: (communities, losses, chosen, rejected, logp_w, logp_l)."""
    cols = list(zip(*pairs))
    tensors = [torch.tensor(col, dtype=torch.float32, requires_grad=requires_grad) for col in cols[1:]]
    return [list(cols[0]), *tensors]


def _check(out: dict, expected: dict):
    assert set(out) == set(expected), sorted(set(out) ^ set(expected))
    for key, value in expected.items():
        assert isinstance(out[key], int if key.startswith("pairs") else float), key
        assert_close(out[key], value, rtol=1e-6, atol=1e-9, msg=lambda m, key=key: f"{key}: {m}")


def test_hand_built_batch():
    """See the module docstring for every expected number; "d" (no pair) has no key at all."""
    metric = PreferenceMetrics(COMMUNITIES)
    metric.update(*_args(PAIRS))
    out = metric.compute()
    _check(out, EXPECTED)
    assert not any(key.endswith("/r_d") for key in out)
    assert set(PAIR_METRICS) <= set(out)


def test_tie_is_not_a_win():
    """One pair in "a" with chosen == rejected == 0.3: accuracy 0 (strict >), margin 0; a second pair in
    "b" with chosen 0.3 + 1e-3 > 0.3 counts as a win. Overall accuracy 1/2, macro (0 + 1) / 2 = 1/2,
    worst 0."""
    metric = PreferenceMetrics(COMMUNITIES)
    metric.update(*_args([("a", 0.7, 0.3, 0.3, -1.0, -1.0), ("b", 0.6, 0.301, 0.3, -1.0, -1.0)]))
    out = metric.compute()
    assert out["rewards/accuracies/r_a"] == 0.0
    assert out["rewards/accuracies/r_b"] == 1.0
    assert out["rewards/margins/r_a"] == 0.0
    assert_close(out["rewards/accuracies"], 0.5)
    assert_close(out["rewards/accuracies/macro"], 0.5)
    assert out["rewards/accuracies/worst"] == 0.0


def test_two_updates_accumulate():
    """Pairs 0-2 in one update and 3-4 in a second give the same figures as the five at once (module
    docstring); keeping only the last update would give e.g. loss (1.0 + 0.75) / 2 = 0.875."""
    metric = PreferenceMetrics(COMMUNITIES)
    metric.update(*_args(PAIRS[:3]))
    metric.update(*_args(PAIRS[3:]))
    _check(metric.compute(), EXPECTED)


def test_pairs_in_any_order_and_interleaved_communities():
    """Order of pairs and of communities in a batch does not matter (reversed rows: same figures)."""
    metric = PreferenceMetrics(COMMUNITIES)
    metric.update(*_args(PAIRS[::-1]))
    _check(metric.compute(), EXPECTED)


def test_reset_clears():
    """After reset, only pair 2 (community "b": loss 0.25, chosen 2, rejected 1, logps -8 / -9):
    overall figures equal b's, accuracy 1, macro 1, worst 1; no key for a, c or d."""
    metric = PreferenceMetrics(COMMUNITIES)
    metric.update(*_args(PAIRS))
    metric.compute()
    metric.reset()
    metric.update(*_args(PAIRS[2:3]))
    b = {"loss": 0.25, "rewards/chosen": 2.0, "rewards/rejected": 1.0, "rewards/margins": 1.0,
         "rewards/accuracies": 1.0, "logps/chosen": -8.0, "logps/rejected": -9.0}
    expected = {**b, **{f"{k}/r_b": v for k, v in b.items()},
                "rewards/accuracies/macro": 1.0, "rewards/accuracies/worst": 1.0, "pairs": 1, "pairs/r_b": 1}
    _check(metric.compute(), expected)


def test_unknown_community_raises_and_leaves_state_alone():
    """A pair from a community the metric was not built with is an error (ValueError naming it), and the
    pairs of that batch are not half-counted: the earlier figures stay those of the module docstring."""
    metric = PreferenceMetrics(COMMUNITIES)
    metric.update(*_args(PAIRS))
    bad = _args([("a", 9.0, 9.0, 0.0, -1.0, -1.0), ("zzz", 9.0, 9.0, 0.0, -1.0, -1.0)])
    with pytest.raises(ValueError, match="zzz"):
        metric.update(*bad)
    _check(metric.compute(), EXPECTED)


def test_inputs_that_require_grad_are_accepted_and_detached():
    """Losses straight from the training step (requires_grad) can be logged; the state holds no graph."""
    metric = PreferenceMetrics(COMMUNITIES)
    metric.update(*_args(PAIRS, requires_grad=True))
    assert not any(v.requires_grad for v in metric.values)
    _check(metric.compute(), EXPECTED)


def test_a_repeated_row_counts_once():
    """The five pairs with row indices 0-4, then pair 0 and pair 1 again under their indices (what a
    distributed sampler's padding does): the figures of the module docstring. Counted twice they would
    give e.g. loss (4.0 + 0.5 + 1.5) / 7 = 0.857 and r_a accuracy 2/4 with 4 pairs. Without indices
    every update counts (a caller that has no row index)."""
    metric = PreferenceMetrics(COMMUNITIES)
    metric.update(*_args(PAIRS), indices=torch.arange(5))
    metric.update(*_args(PAIRS[:2]), indices=torch.tensor([0, 1]))
    _check(metric.compute(), EXPECTED)

    unindexed = PreferenceMetrics(COMMUNITIES)
    unindexed.update(*_args(PAIRS))
    unindexed.update(*_args(PAIRS[:2]))
    assert_close(unindexed.compute()["loss"], 6.0 / 7)


@pytest.mark.filterwarnings("ignore:The ``compute`` method")
def test_nothing_seen_gives_zeros_and_no_community():
    out = PreferenceMetrics(COMMUNITIES).compute()
    assert out == {**{name: 0.0 for name in PAIR_METRICS}, "pairs": 0}


# -------------------------------------------------------------------------------------------- DDP

# row indices as a padded DistributedSampler deals them (5 rows, 2 processes): rank 1 gets row 0 again
RANK_ROWS = {0: [0, 2, 3], 1: [1, 4, 0]}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    from datetime import timedelta

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=60))
    try:
        metric = PreferenceMetrics(COMMUNITIES)
        metric.update(*_args([PAIRS[i] for i in RANK_ROWS[rank]]), indices=torch.tensor(RANK_ROWS[rank]))
        result = metric.compute()
        dist.barrier()
    finally:
        dist.destroy_process_group()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)


@pytest.mark.slow
def test_ddp_sync_gives_the_union_of_both_ranks(tmp_path):
    """Rank 0 updates with pairs 0, 2, 3 (a, b, c); rank 1 with pairs 1, 4 (a, c) and pair 0 again, the
    sampler's padding. Both ranks must get the figures of the five pairs (module docstring), each once (the
    repeat would give loss 6.0 / 7 = 0.857), not a mean of per-rank means: that would give
    loss ((0.5 + 0.25 + 1.0) / 3 + (1.5 + 0.75) / 2) / 2 = (0.5833 + 1.125) / 2 = 0.854 instead of 0.8,
    accuracy (2/3 + 1/2) / 2 = 0.583 instead of 0.6, and a per-rank worst of 0 (rank 0: c is a tie;
    rank 1: a lost) instead of 0.5.
    """
    import torch.multiprocessing as mp

    ctx = mp.start_processes(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + 90
    try:
        while not ctx.join(timeout=1):
            assert time.monotonic() < deadline, "DDP workers did not finish in 90 s"
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    for rank in (0, 1):
        with open(tmp_path / f"rank{rank}.json") as f:
            _check(json.load(f), EXPECTED)
