"""Randomness that leaves the run's alone: loading the embedded model, a DPO reference or its cache must not
change the data order or the dropout a run draws."""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch


@contextlib.contextmanager
def rng_untouched(device: Optional[torch.device] = None, seed: Optional[int] = None) -> Iterator[None]:
    """Whatever runs inside leaves torch's global RNG as it found it (the CPU's, and ``device``'s where that is a
    GPU), so a run gives the same result with a model loaded early, late, or not at all; with ``seed`` it runs on
    the CPU generator seeded with it (only that one: a GPU's, which the fork may not restore, is left alone)."""
    devices = [device] if device is not None and device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        if seed is not None:
            torch.default_generator.manual_seed(seed)
        yield
