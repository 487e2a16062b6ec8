"""File and path helpers every layer uses: atomic writes, the cache root, local-or-Hub names, ``embedded:``,
a run's own folder.

The lowest layer: imports nothing of personalm.

A run's own folder, whatever the logger, is ``<default_root_dir>/lightning_logs/version_<N>`` (``run_folder``): its
checkpoints (``checkpoints/``), its Hugging Face export (``hf_model``), ``config.yaml``, ``test_metrics.json`` and,
by default, its predictions go there, so ``--ckpt_path last`` and the study find them under any Lightning logger.
With the default TensorBoard logger (or a CSV logger with its default name and folder), wherever it is in the list
of loggers (the first such one where there are two), the run's folder is the logger's own, as Lightning lays it out:
one folder per run, the logs beside the checkpoints. Any other logger (W&B, MLflow, a CSV logger with its own
``name`` or ``save_dir``, none) writes its logs where it writes them, and the run's folder is the next free
``version_<N>``: two runs never share one (W&B's and MLflow's folders are not versioned by run), and a run resumed
with ``--ckpt_path last`` goes on in the folder of the run it resumes.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable, Optional, Union
from weakref import WeakKeyDictionary

PathLike = Union[str, "os.PathLike[str]"]
RUNS = "lightning_logs"  # under a run's default_root_dir: the run folders, version_<N>
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


# -- a run's own folder ----------------------------------------------------------------------------

_folders: "WeakKeyDictionary[object, Path]" = WeakKeyDictionary()  # trainer -> its run's folder


def run_folder(trainer) -> Path:
    """The folder of ``trainer``'s run, picked (and made) the first time it is asked for. Call it on every
    process: the first one picks, the others receive its choice."""
    if trainer not in _folders:
        picked = str(_pick(trainer)) if trainer.is_global_zero else None
        _folders[trainer] = Path(trainer.strategy.broadcast(picked))
    return _folders[trainer]


def go_on_in(trainer, folder: Path) -> None:
    """Make ``folder`` (a resumed run's) the run's folder of ``trainer``."""
    _folders[trainer] = Path(folder)


def version(folder: Path) -> Optional[int]:
    """N of a ``version_<N>`` folder, else None."""
    prefix, _, n = Path(folder).name.partition("_")
    return int(n) if prefix == "version" and n.isdigit() else None


def runs(root: Path) -> list[Path]:
    """The run folders under ``root`` (a ``default_root_dir``), oldest (lowest N) first."""
    found = [p for p in (Path(root) / RUNS).glob("version_*") if p.is_dir() and version(p) is not None]
    return sorted(found, key=version)


def _pick(trainer) -> Path:
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    parent = Path(trainer.default_root_dir) / RUNS
    own = next((logger for logger in trainer.loggers if isinstance(logger, (TensorBoardLogger, CSVLogger))
                and Path(logger.root_dir).resolve() == parent.resolve()), None)
    if own is not None:  # the first TensorBoard or CSV logger writing into the run folders: its folder is the run's
        folder = Path(own.log_dir)
        folder.mkdir(parents=True, exist_ok=True)
        return folder
    parent.mkdir(parents=True, exist_ok=True)
    taken = runs(parent.parent)
    n = version(taken[-1]) + 1 if taken else 0
    while True:  # made, not just named: a run started beside this one takes the next number
        try:
            (parent / f"version_{n}").mkdir()
            return parent / f"version_{n}"
        except FileExistsError:
            n += 1
