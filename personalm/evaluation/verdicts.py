"""The LLM judge's verdict store: a JSON-lines file that keeps every verdict the moment it arrives and every
call before it is made, so a rerun asks only for what is missing and a budget spans reruns."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

from personalm.evaluation.judge import Verdict


class VerdictStore:
    """Verdicts as they arrive, one JSON line each, keyed by the item and the judge's settings, and a line
    for every call before it is made (so a call a kill cut short still counts against the budget). Each
    line is appended, flushed and synced at once: a kill loses at most the verdict in flight."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.lines: dict[str, dict] = {}
        self.spent = 0
        if self.path.is_file():
            for number, line in enumerate(self.path.read_text(encoding="utf-8").splitlines(keepends=True), 1):
                if not line.endswith("\n"):  # a kill may leave the last line unfinished
                    continue
                try:
                    entry = json.loads(line)
                    if "call" in entry:
                        self.spent += 1
                    elif entry["status"] != "failed":  # transport failures are asked again
                        self.lines[entry["key"]] = entry
                except (ValueError, KeyError, TypeError) as err:
                    raise ValueError(f"{self.path}, line {number}: not a stored verdict or call ({err!r}); the "
                                     "judge writes whole JSON lines with key, status and verdict, or call") from None

    def get(self, key: str) -> Optional[dict]:
        return self.lines.get(key)

    def spend(self, key: str) -> None:
        """Record a call about to be made for item ``key``."""
        self._append({"call": key})
        self.spent += 1

    def add(self, key: str, status: str, verdict: Verdict) -> None:
        entry = {"key": key, "status": status, "verdict": verdict}
        self._append(entry)
        if status != "failed":
            self.lines[key] = entry

    def _append(self, entry: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")
            f.flush()
            os.fsync(f.fileno())
