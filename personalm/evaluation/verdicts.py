"""The LLM judge's verdict store: a JSON-lines file that keeps every verdict the moment it arrives and every
call before it is made, so a rerun asks only for what is missing and a budget spans reruns."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from personalm.evaluation.judge import Verdict
from personalm.jsonl import JSONLineError, json_line, read_jsonl


class VerdictStore:
    """Verdicts as they arrive, one JSON line each, keyed by the item and the judge's settings, and a line
    for every call before it is made (so a call a kill cut short still counts against the budget). Each
    line is appended, flushed and synced at once: a kill loses at most the verdict in flight."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.lines: dict[str, dict] = {}
        self.spent = 0
        if self.path.is_file():
            number = 0
            try:
                for number, entry in read_jsonl(self.path, finished_only=True):  # a kill may leave the last line
                    if "call" in entry:  # unfinished
                        self.spent += 1
                    elif entry["status"] != "failed":  # transport failures are asked again
                        self.lines[entry["key"]] = entry
            except (JSONLineError, KeyError, TypeError) as err:
                number = err.lineno if isinstance(err, JSONLineError) else number
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
            f.write(json_line(entry))
            f.flush()
            os.fsync(f.fileno())
