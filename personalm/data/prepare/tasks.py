"""Pass 2 of a preparation: tokenization tasks, in this process or in spawned workers. Each task reads its units'
kept rows (only the text columns), turns A/B into chosen/rejected with Arrow, tokenizes in batches of
``ENCODE_ROWS`` and writes its own Arrow file; the files in task order are the split, the same for any number
of processes, since a row's ids depend on that row alone. Everything a task holds is plain data (never the
DataModule); a worker is given the tokenizer once, when it starts, and sets ``TOKENIZERS_PARALLELISM=false``."""

from __future__ import annotations

import itertools
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import astuple, dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pyarrow as pa

from personalm.data import compred, pairs
from personalm.data.encoding import PlainTokenizer, encode_batch
from personalm.data.prepare.planning import Plan, Unit
from personalm.data.prepare.progress import Progress
from personalm.data.prepare.spec import TEXT_COLUMNS, RowSpec
from personalm.data.prompt import community_string, random_other_community, subreddit

ENCODE_ROWS = 1_000  # rows tokenized per call (texts repeated among them, a post's pairs, are tokenized once)
TASK_ROWS = 40_000  # kept rows per task (units are grouped up to this); progress is reported per task


@dataclass
class Task:
    units: list[Unit]
    spec: RowSpec
    communities: list[str]
    id_type: str  # "uint16" | "int32"
    out: str


@dataclass
class TaskResult:
    """What tokenizing some rows did: rows written, and the counts ``PrepStats`` reports."""

    rows: int = 0
    post_shortened: int = 0
    response_cut: int = 0
    shortened: int = 0
    dropped: int = 0

    def __add__(self, other: "TaskResult") -> "TaskResult":
        return TaskResult(*(a + b for a, b in zip(astuple(self), astuple(other))))


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
            return subreddit(random_other_community(community, post_id, communities, spec.seed))
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
                    total += done
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


def run_tasks(tasks: list[Task], tokenizer: PlainTokenizer, num_proc: int, progress: Progress) -> list[TaskResult]:
    """The tasks in this process, or in ``num_proc`` spawned workers (each given the tokenizer once). A task that
    fails (or an interrupt) cancels the tasks not started yet, so the error comes at once."""
    results: list[Optional[TaskResult]] = [None] * len(tasks)
    with progress.step(f"tokenize ({num_proc} process{'es' if num_proc > 1 else ''})", unit="rows") as step:
        if num_proc <= 1:
            for i, task in enumerate(tasks):
                results[i] = run_task(task, tokenizer)
                step.update(sum(len(u.rows) for u in task.units))
        else:
            pool = ProcessPoolExecutor(num_proc, mp_context=get_context("spawn"), initializer=_start_worker,
                                       initargs=(tokenizer,))
            try:
                futures = {pool.submit(run_task, task): i for i, task in enumerate(tasks)}
                for future in as_completed(futures):
                    i = futures[future]
                    results[i] = future.result()
                    step.update(sum(len(u.rows) for u in tasks[i].units))
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)  # the running tasks end, the others never start
                raise
            pool.shutdown()
    return results  # type: ignore[return-value]

