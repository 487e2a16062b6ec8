"""Preparing a split once: ComPreD files -> the token ids and the few fields training and evaluation read,
written as memory-mapped Arrow under a key known before any step runs.

Two passes over the source, never the whole split in memory and never a copy of it on disk:

1. **Plan** (this process, streamed chunk by chunk): every row validated (file, row, field in errors),
   content problems skipped and counted, then the selection computed on small numpy arrays (post codes,
   score ratios): the paper's subsample, the caps, one prompt per post. The result is, per unit of a
   source file (a parquet row group, or a whole JSON-lines file), the rows kept.
2. **Tokenize** (``num_proc`` processes, or this one): each task reads its units' kept rows (only the text
   columns), turns A/B into chosen/rejected with Arrow, tokenizes in batches of ``ENCODE_ROWS`` and writes its
   own Arrow file. The files, in task order, are the split: the same rows, ids and order for any
   ``num_proc``, since a row's ids depend on that row alone.

Parallelism: processes (spawned; each is given the tokenizer's definition once, never the DataModule). Each
worker sets ``TOKENIZERS_PARALLELISM=false``, so the Rust tokenizer does not also thread inside a batch; with
one process the variable is left as the user set it.

The folder ``<root>/<split>-<key>`` is written under a temporary name, synced and renamed when complete
(``info.json`` inside it records what was done), so a killed preparation leaves nothing a rerun takes as
finished (the next preparation on that host removes what it left), and every later process or run with the
same key opens it without recomputing anything. Finished folders are never evicted: delete old ones by hand.

Modules: ``spec`` (what shapes the rows: the key), ``planning`` (pass 1), ``tasks`` (pass 2), ``progress``.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from personalm.data.compred import PrepStats
from personalm.data.encoding import plain_tokenizer, prompt_budget
from personalm.data.prepare import planning, tasks
from personalm.data.prepare.progress import Progress
from personalm.data.prepare.spec import RowSpec

__all__ = ["Prepared", "Progress", "RowSpec", "default_num_proc", "find", "prepare"]

FORMAT_VERSION = 1
INFO = "info.json"
PARALLEL_MIN_ROWS = 20_000  # fewer kept rows than this: one process (starting workers would cost more)
MAX_PROC = 16


def default_num_proc() -> int:
    """The cores this process may use, at most ``MAX_PROC``."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, MAX_PROC))


@dataclass
class Prepared:
    """A prepared split as found on disk: where, what, and what preparation did."""

    folder: Path
    info: dict
    stats: PrepStats = field(default_factory=PrepStats)

    @property
    def parts(self) -> list[Path]:
        return [self.folder / name for name in self.info["parts"]]

    @property
    def bytes(self) -> int:
        return sum(p.stat().st_size for p in self.folder.iterdir())

    def dataset(self):
        """The split, memory-mapped, with ``index`` (the row's position) added; its fingerprint is the key."""
        import datasets

        parts = [datasets.Dataset.from_file(str(p)) for p in self.parts]
        ds = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
        return ds.add_column("index", np.arange(len(ds), dtype=np.int64), new_fingerprint=self.info["key"])


def find(folder: Path) -> Optional[Prepared]:
    """The prepared split in ``folder``, if it was finished (its ``info.json`` is written last)."""
    try:
        info = json.loads((folder / INFO).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    if info.get("version") != FORMAT_VERSION:
        return None
    return Prepared(folder, info, PrepStats(**info["stats"]))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True  # running (PermissionError: someone else's process)


def _tmp_name(folder: Path, host: str, pid: int) -> Path:
    return folder.with_name(f".{folder.name}.tmp-{host}-{pid}")


def _remove_stale(root: Path) -> None:
    """Temporary folders that killed preparations on this host left in ``root`` (any key): their process is
    gone. Another host's are left alone (its process ids are not ours to check)."""
    host = socket.gethostname()
    for tmp in root.glob(f".*.tmp-{host}-*"):
        pid = tmp.name.rpartition("-")[2]
        if tmp.name.endswith(f".tmp-{host}-{pid}") and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _durable(folder: Path) -> None:
    """Every file of ``folder`` on disk before the folder is renamed into place (a node that crashes right
    after the rename must not leave a finished-looking folder with missing data)."""
    for path in folder.iterdir():
        with open(path, "rb") as f:
            os.fsync(f.fileno())


def prepare(files: Sequence[tuple[str, list[Path]]], spec: RowSpec, tokenizer, folder: Path, key: str,
            num_proc: int = 1, log: Callable[[str], None] = print, where: str = "") -> Prepared:
    """Prepare one split into ``folder`` (or return it, finished already). Raises ``ComPreDDataError`` for bad
    input or a split emptied by its filters (naming ``where`` the rows come from: the files, or the Hub
    config); nothing is left under ``folder``'s name then."""
    found = find(folder)
    if found is not None:
        return found
    folder.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(folder.parent)
    tmp = _tmp_name(folder, socket.gethostname(), os.getpid())
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    progress = Progress(spec.split, log)
    stats = PrepStats()
    where = where or planning.files_named(files)
    try:
        plan = planning.plan_split(files, spec, stats, progress, where)
        plain = plain_tokenizer(tokenizer)
        id_type = "uint16" if plain.vocab_size <= np.iinfo(np.uint16).max + 1 else "int32"
        work = tasks.tasks_of(plan, spec, id_type, tmp)
        procs = min(num_proc, len(work)) if plan.kept >= PARALLEL_MIN_ROWS else 1
        if procs > 1 and plain.backend is None:
            log(f"[personalm] {spec.split}: a tokenizer without a fast (Rust) backend: one process")
            procs = 1
        results = tasks.run_tasks(work, plain, procs, progress)
        done = sum(results, tasks.TaskResult())
        stats.post_shortened, stats.response_cut, stats.shortened, stats.dropped, stats.rows_out = (
            done.post_shortened, done.response_cut, done.shortened, done.dropped, done.rows)
        if stats.rows_out == 0:
            budget = prompt_budget(spec.max_length, spec.max_prompt_length)
            raise planning.empty_split(where, spec, stats, f"the length limits (markers, community and title of "
                                       f"every row exceed the prompt budget of {budget} tokens; raise "
                                       f"max_prompt_length/max_length)")
        parts = [Path(t.out).name for t, r in zip(work, results) if r.rows]
        info = {"version": FORMAT_VERSION, "key": key, "split": spec.split, "rows": stats.rows_out, "parts": parts,
                "columns": spec.columns, "id_type": id_type, "spec": asdict(spec), "stats": asdict(stats),
                "source": [[s, [str(p) for p in paths]] for s, paths in files], "seconds": progress.seconds}
        (tmp / INFO).write_text(json.dumps(info, indent=2))
        _durable(tmp)
        try:
            tmp.rename(folder)
        except OSError:  # another process finished the same key first: theirs is the same split
            if find(folder) is None:
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return find(folder)  # type: ignore[return-value]
