"""Writing files so that a reader never sees half of one: write a temporary file beside it, then rename."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Union

PathLike = Union[str, "os.PathLike[str]"]


def write_atomically(path: PathLike, write: Callable[[str], None], suffix: str = "") -> None:
    """``write(tmp)`` to a temporary file next to ``path``, then move it into place (removed on failure).

    ``suffix`` keeps the extension for writers that look at it (e.g. ``.png`` for matplotlib).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{suffix}")
    try:
        write(str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: PathLike, text: str) -> None:
    write_atomically(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
