"""File and path helpers every layer uses: atomic writes, the cache root, local-or-Hub names, ``embedded:``.

The lowest layer: imports nothing of personalm.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable, Optional, Union

PathLike = Union[str, "os.PathLike[str]"]
EMBEDDED = "embedded:"  # names of what ships with personalm: embedded:tiny-llama, embedded:compred


def is_embedded(name: str) -> bool:
    return isinstance(name, str) and name.startswith(EMBEDDED)


def cache_root() -> Path:
    """``$PERSONALM_CACHE`` (default ``~/.cache/personalm``): the synthetic data, reference log-prob caches."""
    return Path(os.environ.get("PERSONALM_CACHE", Path.home() / ".cache" / "personalm")).expanduser()


def local_path(name: str) -> Optional[Path]:
    """The local file or folder ``name`` names, or None for a Hub id (``org/name``).

    A name that looks local (starts with ``.``, ``/`` or ``~``, or has more than one ``/``) but does not
    exist is an error, not a Hub id: transformers would otherwise try the Hub and, offline, hang or fail
    with a message about the network.
    """
    path = Path(name).expanduser()
    if path.exists():
        return path
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise FileNotFoundError(f"{name} does not exist")
    return None


def write_atomically(path: PathLike, write: Callable[[str], None], suffix: str = "") -> None:
    """``write(tmp)`` to a temporary file next to ``path``, then move it into place (removed on failure), so
    a reader never sees half a file. ``suffix`` keeps the extension for writers that look at it (``.png``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{suffix}")
    try:
        write(str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def replace_dir(finished: PathLike, target: PathLike) -> None:
    """Move a finished folder into place; an older one there is moved aside first and removed after, so the
    target never holds a mix of both."""
    finished, target = Path(finished), Path(target)
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
    finished.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_text(path: PathLike, text: str) -> None:
    write_atomically(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_json(path: PathLike, data) -> None:
    """``data`` as indented, strict JSON (no NaN: other tools refuse it), written atomically."""
    write_text(path, json.dumps(data, indent=2, ensure_ascii=False, allow_nan=False) + "\n")
