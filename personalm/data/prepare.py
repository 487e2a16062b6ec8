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

Parallelism: processes (spawned; a task carries the tokenizer's definition, not the DataModule). Each worker
sets ``TOKENIZERS_PARALLELISM=false``, so the Rust tokenizer does not also thread inside a batch; with one
process the variable is left as the user set it.

The folder ``<root>/<split>-<key>`` is written under a temporary name and renamed when complete
(``info.json`` inside it records what was done), so a killed preparation leaves nothing a rerun takes as
finished, and every later process or run with the same key opens it without recomputing anything.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import socket
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import pyarrow as pa

from personalm.data import compred, pairs
from personalm.data.compred import PROMPT_SPLIT, ComPreDDataError, PrepStats
from personalm.data.encoding import PlainTokenizer, encode_batch, plain_tokenizer, prompt_budget
from personalm.data.prompt import community_string, normalize_domain, random_other_community

FORMAT_VERSION = 1
INFO = "info.json"
ENCODE_ROWS = 1_000  # rows tokenized per call (texts repeated among them, a post's pairs, are tokenized once)
TASK_ROWS = 40_000  # kept rows per task (units are grouped up to this); progress is reported per task
PARALLEL_MIN_ROWS = 20_000  # fewer kept rows than this: one process (starting workers would cost more)
MAX_PROC = 16
# what the text pass reads of each kind of split
TEXT_COLUMNS = {"preference": ["domain", "post_id", "title", "history", "human_ref_A", "human_ref_B", "labels"],
                "prompts": ["domain", "post_id", "title", "history"]}


def default_num_proc() -> int:
    """The cores this process may use, at most ``MAX_PROC``."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, MAX_PROC))


@dataclass(frozen=True)
class RowSpec:
    """What shapes a prepared split's rows (all of it part of the key)."""

    split: str
    rows: str  # "sft" | "preference" (prompts: "prompts")
    mode: str  # the prompt's community: "true" | "none" | "random"
    variants: tuple  # extra prompts scored on the same pairs: ("none", "random") or ()
    max_length: int
    max_prompt_length: Optional[int]
    seed: int
    min_score_ratio: Optional[float] = None
    max_pairs_per_post: Optional[int] = None
    max_pairs: Optional[int] = None  # the seeded cap (max_train_pairs or max_eval_pairs)

    @classmethod
    def of(cls, split: str, hp) -> "RowSpec":
        """From the DataModule's settings, keeping only those that act on ``split`` (so a change to a training
        setting does not invalidate the evaluation splits)."""
        mode = "random" if hp["random_community"] else ("true" if hp["contextualize"] else "none")
        common = dict(split=split, mode=mode, max_length=hp["max_length"], max_prompt_length=hp["max_prompt_length"],
                      seed=hp["seed"])
        if split == PROMPT_SPLIT:
            return cls(rows="prompts", variants=(), **common)
        variants = ("none", "random") if (hp["rows"] == "preference" and hp["conditioning_variants"]
                                          and split != "train_pref") else ()
        if split == "train_pref":
            return cls(rows=hp["rows"], variants=variants, min_score_ratio=hp["min_score_ratio"],
                       max_pairs_per_post=hp["max_pairs_per_post"], max_pairs=hp["max_train_pairs"], **common)
        return cls(rows=hp["rows"], variants=variants, max_pairs=hp["max_eval_pairs"], **common)

    @property
    def columns(self) -> list[str]:
        """The columns the prepared split holds (``index`` is added when it is opened)."""
        if self.rows == "prompts":
            return ["community", "post_id", "prompt_community", "title", "post", "prompt_ids"]
        ids = ["prompt_ids", "chosen_ids"] + (["rejected_ids"] if self.rows == "preference" else [])
        return ["community", "post_id", *ids, *(f"{v}_prompt_ids" for v in self.variants)]


# ----------------------------------------------------------------------------------------------------
# Pass 1: the plan


@dataclass
class Unit:
    """A piece of one source file that a task reads: a parquet row group (``row_group``) or a whole
    JSON-lines file (None); ``rows``: the kept rows, as positions within the unit."""

    file: str
    row_group: Optional[int]
    rows: np.ndarray


@dataclass
class Plan:
    units: list[Unit]
    communities: list[str]  # of the rows kept (the random-community draws pick among them)
    kept: int


class _Codes:
    """Strings to dense integer codes, chunk by chunk (a dictionary per chunk, then its few distinct values)."""

    def __init__(self):
        self.codes: dict = {}

    def __call__(self, column, prefix=None) -> np.ndarray:
        import pyarrow.compute as pc

        encoded = pc.dictionary_encode(column).combine_chunks()
        values = encoded.dictionary.to_pylist()
        mapping = np.array([self.codes.setdefault((prefix, v), len(self.codes)) for v in values], dtype=np.int64)
        return mapping[encoded.indices.to_numpy(zero_copy_only=False)] if len(values) else np.zeros(0, np.int64)


def plan_split(files: Sequence[tuple[str, list[Path]]], spec: RowSpec, stats: PrepStats,
               progress: "Progress") -> Plan:
    """Pass 1 over ``files`` ((subset, its files) in order): validation, documented skips, the selection."""
    prompts = spec.rows == "prompts"
    schema = compred.schema_of(spec.split)
    post_codes, community_codes, names = _Codes(), _Codes(), {}
    units, unit_rows, codes, communities, ratios = [], [], [], [], []
    with progress.step("read and check", unit="rows") as step:
        for subset, paths in files:
            for path in paths:
                groups = [g for g in range(len(compred.parquet_row_groups(path)))] if path.suffix == ".parquet" \
                    else [None]
                for g in groups:
                    start, kept = None, []
                    for offset, chunk in compred.read_chunks(path, schema, row_groups=None if g is None else [g]):
                        start = offset if start is None else start
                        stats.rows += chunk.num_rows
                        problems = pairs.content_problems(chunk, prompts_only=prompts)
                        bad = np.zeros(chunk.num_rows, dtype=bool)
                        for reason, mask in problems.items():
                            stats.skip(reason, int(mask.sum()))
                            bad |= mask
                        ok = np.flatnonzero(~bad)
                        kept.append(offset - start + ok)
                        chunk = chunk.take(ok)
                        # prompts: one per post within a subset; pairs: a post's pairs across subsets
                        codes.append(post_codes(chunk.column("post_id"), prefix=subset if prompts else None))
                        comm = community_codes(chunk.column("domain"))
                        communities.append(comm)
                        if not prompts:
                            ratios.append(chunk.column("score_ratio").to_numpy())
                        step.update(chunk.num_rows)
                    units.append(Unit(str(path), g, np.zeros(0, np.int64)))
                    unit_rows.append(np.concatenate(kept) if kept else np.zeros(0, np.int64))
    for (_, value), code in community_codes.codes.items():
        names[code] = value
    codes_all = np.concatenate(codes) if codes else np.zeros(0, np.int64)
    n = len(codes_all)
    if n == 0:
        raise _empty(files, spec, stats, f"the documented skips ({stats.skipped})")
    if prompts:
        keep = pairs.first_per_post(codes_all)
    elif spec.split == "train_pref":
        keep = pairs.subsample(np.concatenate(ratios), codes_all, spec.min_score_ratio, spec.max_pairs_per_post,
                               spec.seed)
        stats.subsampled_out = n - len(keep)
        if len(keep) == 0:
            raise _empty(files, spec, stats, f"the paper's subsample (the score-ratio threshold, min_score_ratio: "
                         f"{spec.min_score_ratio}, then max_pairs_per_post: {spec.max_pairs_per_post}; none of "
                         f"the {n} pairs passes)")
        keep = keep[pairs.seeded_limit(len(keep), spec.max_pairs, spec.seed)]
    else:
        keep = pairs.seeded_limit(n, spec.max_pairs, spec.seed)
    stats.capped_out = n - stats.subsampled_out - len(keep) if not prompts else 0
    # the kept positions back to their units
    bounds = np.cumsum([0] + [len(r) for r in unit_rows])
    for i, unit in enumerate(units):
        lo, hi = np.searchsorted(keep, [bounds[i], bounds[i + 1]])
        unit.rows = unit_rows[i][keep[lo:hi] - bounds[i]]
    kept_communities = np.unique(np.concatenate(communities)[keep])
    return Plan(units=[u for u in units if len(u.rows)], kept=len(keep),
                communities=sorted({normalize_domain(names[c]) for c in kept_communities}))


def _empty(files, spec: RowSpec, stats: PrepStats, after: str) -> ComPreDDataError:
    source = ", ".join(str(p) for _, paths in files for p in paths)
    return ComPreDDataError(f"{spec.split} of {source}: no rows left after {after}; {stats.rows} rows read")


# ----------------------------------------------------------------------------------------------------
# Pass 2: tokenization tasks (run in worker processes: everything they hold is plain data)


@dataclass
class Task:
    units: list[Unit]
    spec: RowSpec
    communities: list[str]
    id_type: str  # "uint16" | "int32"
    out: str


@dataclass
class TaskResult:
    rows: int = 0
    post_shortened: int = 0
    response_cut: int = 0
    shortened: int = 0
    dropped: int = 0


def _ids(seqs: Sequence[Sequence[int]], id_type: str) -> pa.Array:
    """Lists of ids as one Arrow list array of ``id_type`` (numpy does the conversion, not Arrow's Python path)."""
    lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
    offsets = np.zeros(len(seqs) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.fromiter(itertools.chain.from_iterable(seqs), dtype=np.dtype(id_type), count=int(offsets[-1]))
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat))


def encode_rows(plain: PlainTokenizer, spec: RowSpec, communities: list[str], rows: dict) -> tuple[dict, TaskResult]:
    """One batch of rows (``community``, ``post_id``, ``title``, ``post`` and, for pairs, ``chosen`` and
    ``rejected`` as lists) -> the prepared columns of the rows kept (as Python lists) and what was done."""
    def shown(community: str, post_id: str, mode: str) -> str:
        if mode == "random":
            return "r/" + random_other_community(community, post_id, communities, spec.seed)
        return community_string(community, mode == "true")

    keys = list(zip(rows["community"], rows["post_id"]))
    shown_as = [shown(c, p, spec.mode) for c, p in keys]
    responses = [] if spec.rows == "prompts" else \
        [rows["chosen"]] + ([rows["rejected"]] if spec.rows == "preference" else [])
    alternatives = [[shown(c, p, name) for c, p in keys] for name in spec.variants]  # same post, same responses
    enc = encode_batch(plain, shown_as, rows["title"], rows["post"], responses, spec.max_length,
                       spec.max_prompt_length, variants=alternatives)
    done = TaskResult(post_shortened=sum(e.post_shortened for e in enc), response_cut=sum(e.response_cut for e in enc),
                      shortened=sum(e.shortened for e in enc), dropped=sum(e.dropped for e in enc))
    keep = [i for i, e in enumerate(enc) if not e.dropped]
    done.rows = len(keep)
    out = {"community": [rows["community"][i] for i in keep], "post_id": [rows["post_id"][i] for i in keep]}
    if spec.rows == "prompts":
        out.update(prompt_community=[shown_as[i] for i in keep], title=[rows["title"][i] for i in keep],
                   post=[rows["post"][i] for i in keep])
    out["prompt_ids"] = [enc[i].prompt_ids for i in keep]
    for r, name in enumerate(["chosen_ids", "rejected_ids"][:len(responses)]):
        out[name] = [enc[i].response_ids[r] for i in keep]
    for v, name in enumerate(spec.variants):  # the same pairs, prompt without community / with a wrong one
        out[f"{name}_prompt_ids"] = [enc[i].variant_prompt_ids[v] for i in keep]
    return out, done


_WORKER_TOKENIZER: Optional[PlainTokenizer] = None  # a worker's tokenizer, given once when it starts


def _start_worker(tokenizer: PlainTokenizer) -> None:
    global _WORKER_TOKENIZER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # processes are the parallelism; no threads inside a batch
    _WORKER_TOKENIZER = tokenizer


def run_task(task: Task, tokenizer: Optional[PlainTokenizer] = None) -> TaskResult:
    """Read the task's kept rows, tokenize them (with ``tokenizer``, or the worker's), write them to ``task.out``
    (Arrow stream)."""
    tokenizer = tokenizer or _WORKER_TOKENIZER
    spec = task.spec
    prompts = spec.rows == "prompts"
    schema = compred.schema_of(spec.split)
    columns = TEXT_COLUMNS["prompts" if prompts else "preference"]
    total = TaskResult()
    writer = None
    try:
        for unit in task.units:
            path = Path(unit.file)
            groups = None if unit.row_group is None else [unit.row_group]
            first = 0 if unit.row_group is None else compred.parquet_row_groups(path)[unit.row_group][0]
            for offset, chunk in compred.read_chunks(path, schema, columns=columns, row_groups=groups):
                offset -= first  # rows counted within the unit, as the plan counts them
                lo, hi = np.searchsorted(unit.rows, [offset, offset + chunk.num_rows])
                if lo == hi:
                    continue
                table = chunk.take(unit.rows[lo:hi] - offset)
                table = pairs.to_prompts(table) if prompts else pairs.to_pairs(table)
                for start in range(0, table.num_rows, ENCODE_ROWS):
                    part = table.slice(start, ENCODE_ROWS)
                    rows = {name: part.column(name).to_pylist() for name in
                            ("community", "post_id", "title", "post", *(() if prompts else ("chosen", "rejected")))}
                    out, done = encode_rows(tokenizer, spec, task.communities, rows)
                    for name in asdict(total):
                        setattr(total, name, getattr(total, name) + getattr(done, name))
                    if not done.rows:
                        continue
                    batch = pa.record_batch({name: _ids(out[name], task.id_type) if name.endswith("_ids")
                                             else pa.array(out[name], type=pa.string()) for name in spec.columns})
                    if writer is None:
                        writer = pa.ipc.new_stream(task.out, batch.schema)
                    writer.write_batch(batch)
    finally:
        if writer is not None:
            writer.close()
    return total


def tasks_of(plan: Plan, spec: RowSpec, id_type: str, folder: Path) -> list[Task]:
    """Consecutive units grouped up to ``TASK_ROWS`` kept rows a task (a larger unit is a task of its own)."""
    groups, current, rows = [], [], 0
    for unit in plan.units:
        if current and rows + len(unit.rows) > TASK_ROWS:
            groups.append(current)
            current, rows = [], 0
        current.append(unit)
        rows += len(unit.rows)
    if current:
        groups.append(current)
    return [Task(g, spec, plan.communities, id_type, str(folder / f"part-{i:05d}.arrow"))
            for i, g in enumerate(groups)]


def run_tasks(tasks: list[Task], tokenizer: PlainTokenizer, num_proc: int, progress: "Progress") -> list[TaskResult]:
    """The tasks in this process, or in ``num_proc`` spawned workers (each given the tokenizer once)."""
    results: list[Optional[TaskResult]] = [None] * len(tasks)
    with progress.step(f"tokenize ({num_proc} process{'es' if num_proc > 1 else ''})", unit="rows") as step:
        if num_proc <= 1:
            for i, task in enumerate(tasks):
                results[i] = run_task(task, tokenizer)
                step.update(sum(len(u.rows) for u in task.units))
        else:
            with ProcessPoolExecutor(num_proc, mp_context=get_context("spawn"), initializer=_start_worker,
                                     initargs=(tokenizer,)) as pool:
                futures = {pool.submit(run_task, task): i for i, task in enumerate(tasks)}
                for future in as_completed(futures):
                    i = futures[future]
                    results[i] = future.result()
                    step.update(sum(len(u.rows) for u in tasks[i].units))
    return results  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------------
# The prepared folder


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
    except PermissionError:
        return True
    return True


def _remove_stale(folder: Path) -> None:
    """Temporary folders of killed preparations of the same key on this host."""
    host = socket.gethostname()
    for tmp in folder.parent.glob(f".{folder.name}.tmp-*"):
        owner_host, _, pid = tmp.name.rpartition("-")
        if owner_host.endswith(host) and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def prepare(files: Sequence[tuple[str, list[Path]]], spec: RowSpec, tokenizer, folder: Path, key: str,
            num_proc: int = 1, log: Callable[[str], None] = print) -> Prepared:
    """Prepare one split into ``folder`` (or return it, finished already). Raises ``ComPreDDataError`` for bad
    input or a split emptied by its filters; nothing is left under ``folder``'s name then."""
    found = find(folder)
    if found is not None:
        return found
    folder.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(folder)
    tmp = folder.with_name(f".{folder.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    progress = Progress(spec.split, log)
    stats = PrepStats()
    try:
        plan = plan_split(files, spec, stats, progress)
        plain = plain_tokenizer(tokenizer)
        id_type = "uint16" if plain.vocab_size <= np.iinfo(np.uint16).max + 1 else "int32"
        tasks = tasks_of(plan, spec, id_type, tmp)
        procs = min(num_proc, len(tasks)) if plan.kept >= PARALLEL_MIN_ROWS else 1
        if procs > 1 and plain.backend is None:
            log(f"[personalm] {spec.split}: a tokenizer without a fast (Rust) backend: one process")
            procs = 1
        results = run_tasks(tasks, plain, procs, progress)
        for r in results:
            stats.post_shortened += r.post_shortened
            stats.response_cut += r.response_cut
            stats.shortened += r.shortened
            stats.dropped += r.dropped
            stats.rows_out += r.rows
        if stats.rows_out == 0:
            budget = prompt_budget(spec.max_length, spec.max_prompt_length)
            raise _empty(files, spec, stats, f"the length limits (markers, community and title of every row "
                         f"exceed the prompt budget of {budget} tokens; raise max_prompt_length/max_length)")
        parts = [Path(t.out).name for t, r in zip(tasks, results) if r.rows]
        info = {"version": FORMAT_VERSION, "key": key, "split": spec.split, "rows": stats.rows_out, "parts": parts,
                "columns": spec.columns, "id_type": id_type, "spec": asdict(spec), "stats": asdict(stats),
                "source": [[s, [str(p) for p in paths]] for s, paths in files], "seconds": progress.seconds}
        (tmp / INFO).write_text(json.dumps(info, indent=2))
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


# ----------------------------------------------------------------------------------------------------
# Progress a person can read: a bar in a terminal, one line per step in a log file


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
