"""Progress a person can read: a bar per step in a terminal, one line per step in a log file."""

from __future__ import annotations

import sys
import time
from typing import Callable


class Progress:
    def __init__(self, split: str, log: Callable[[str], None]):
        self.split, self.log, self.seconds = split, log, {}
        self.tty = sys.stderr.isatty()

    def step(self, name: str, unit: str) -> "_Step":
        return _Step(self, name, unit)


class _Step:
    def __init__(self, progress: Progress, name: str, unit: str):
        self.progress, self.name, self.unit, self.count, self.bar = progress, name, unit, 0, None

    def __enter__(self) -> "_Step":
        self.start = time.perf_counter()
        if self.progress.tty:
            from tqdm.auto import tqdm

            self.bar = tqdm(desc=f"{self.progress.split}: {self.name}", unit=f" {self.unit}", unit_scale=True)
        return self

    def update(self, n: int) -> None:
        self.count += n
        if self.bar is not None:
            self.bar.update(n)

    def __exit__(self, *exc) -> None:
        seconds = time.perf_counter() - self.start
        self.progress.seconds[self.name.split(" (")[0]] = round(seconds, 2)
        if self.bar is not None:
            self.bar.close()
        elif exc[0] is None:
            self.progress.log(f"[personalm] {self.progress.split}: {self.name}: {self.count:,} {self.unit} in "
                              f"{seconds:.1f} s ({self.count / max(seconds, 1e-9):,.0f} {self.unit}/s)")
