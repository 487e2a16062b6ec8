"""JSON Lines, one JSON value a line: the predictions, the judge's verdicts, the synthetic data's files. A low
layer beside ``paths``: imports nothing of personalm but it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Iterator

from personalm.paths import PathLike, write_atomically


class JSONLineError(ValueError):
    """A line that is not JSON, named by its file and its number (from 1, as editors count)."""

    def __init__(self, path: PathLike, lineno: int, msg: str, colno: int):
        super().__init__(f"{path}: line {lineno} is not valid JSON ({msg} at column {colno})")
        self.path, self.lineno, self.msg, self.colno = path, lineno, msg, colno


def json_line(value: Any) -> str:
    """``value`` as one line (text outside ASCII kept as it is), its newline at the end."""
    return json.dumps(value, ensure_ascii=False) + "\n"


def read_jsonl(path: PathLike, finished_only: bool = False) -> Iterator[tuple[int, Any]]:
    """``(line number, value)`` of every line that is not blank; a line that is not JSON raises
    :class:`JSONLineError`. ``finished_only``: a last line without its newline (a kill cut it short) is left out."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip() or (finished_only and not line.endswith("\n")):
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as err:
                raise JSONLineError(path, lineno, err.msg, err.colno) from None


def write_jsonl(path: PathLike, rows: Iterable) -> int:
    """``rows`` as JSON Lines, written atomically (a reader never sees half a file); returns how many."""
    count = 0

    def write(tmp: str) -> None:
        nonlocal count
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json_line(row))
                count += 1

    write_atomically(Path(path), write)
    return count
