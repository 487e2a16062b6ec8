"""rng_untouched: what runs inside draws from a fork of the global RNG (seeded when asked); the run's draws after
it are the ones it would have drawn without it."""

import torch

from personalm.models.rng import rng_untouched


def test_the_global_rng_goes_on_as_if_nothing_had_run():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    with rng_untouched(torch.device("cpu")):
        torch.rand(100)
    assert torch.equal(torch.rand(3), expected)


def test_a_seed_gives_the_same_draws_whatever_the_global_state():
    draws = []
    for outside in (0, 1):
        torch.manual_seed(outside)
        with rng_untouched(seed=1234):
            draws.append(torch.rand(3))
        after = torch.rand(1)
        torch.manual_seed(outside)
        assert torch.equal(after, torch.rand(1))  # the global stream goes on untouched
    assert torch.equal(draws[0], draws[1])
