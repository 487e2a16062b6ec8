"""Preparing a real-size ComPreD split: each step's time at num_proc 1 and 2 against a floor, the cache hit, peak
memory, and what the preparation leaves on disk against the source.

    python benchmarks/prepare_scale.py --dir /tmp/compred-finance [--rows 2245068] [--procs 1 2]

Writes (once) a finance-sized local copy in the Hub layout (``benchmarks/compred_scale.py``: 2,245,068 rows in 9
parquet shards by default), then, each in a fresh process with ``TOKENIZERS_PARALLELISM=false``, the Mistral-7B
SentencePiece tokenizer (from the mistral-common wheel) and the paper DPO recipe's data settings
(``configs/paper/dpo.yaml``):

- the first preparation of ``train_pref`` at each ``num_proc`` (an empty cache each time);
- the floor: one process reading the same parquet columns and tokenizing, in batches of 1,000 with the
  tokenizer's own batched call, the prompt template text and both comments of exactly the rows the subsample
  keeps (which rows is taken from the plan beforehand, untimed);
- the second preparation (a cache hit), a new process;
- peak RSS of each process, and of it and its workers added up (sampled every 0.1 s with psutil, so a
  spawned process does not report its parent's high-water mark as ``getrusage`` would), the bytes under the
  cache folder and the datasets cache.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, threading, time
import psutil
t0 = time.perf_counter()
peak = {"self": 0, "all": 0}


def sample():  # peak RSS of this process, and of it plus its workers added up (sampled every 0.1 s)
    me = psutil.Process()
    while True:
        try:
            own = me.memory_info().rss
            peak["self"] = max(peak["self"], own)
            peak["all"] = max(peak["all"], own + sum(c.memory_info().rss for c in me.children(recursive=True)))
        except psutil.Error:
            pass
        time.sleep(0.1)


threading.Thread(target=sample, daemon=True).start()
mode, data, tok, cache, procs = sys.argv[1:6]
import yaml
from personalm.data import prepare
from personalm.data.datamodule import ComPreDDataModule
prepare.tasks.TASK_ROWS, prepare.PARALLEL_MIN_ROWS = int(sys.argv[7]), int(sys.argv[8])
settings = yaml.safe_load(open(sys.argv[6]))["data"]
settings.update(dataset=data, tokenizer=tok, cache_dir=cache, num_proc=int(procs))
dm = ComPreDDataModule(**settings)
t1 = time.perf_counter()
out = {}
if mode == "prepare":
    found = dm.prepared("train_pref")
    ds = found.dataset()
    out.update(rows=len(ds), steps=found.info["seconds"], stats=found.info["stats"], columns=ds.column_names,
               id_type=found.info["id_type"])
elif mode == "floor":
    from personalm.data import compred
    from personalm.data.prompt import format_prompt, normalize_domain
    import numpy as np, pyarrow.parquet as pq
    spec = prepare.RowSpec.of("train_pref", dm.hparams)
    plan = prepare.planning.plan_split(dm.files("train_pref"), spec, compred.PrepStats(),
                                       prepare.Progress("", lambda _: 0))
    tokenizer = dm.tokenizer
    t1 = time.perf_counter()  # the floor's clock starts here: reading and tokenizing
    rows = 0
    cols = ["domain", "title", "history", "human_ref_A", "human_ref_B", "labels"]
    for unit in plan.units:
        table = pq.ParquetFile(unit.file).read_row_group(unit.row_group, columns=cols).take(unit.rows)
        d = table.to_pydict()
        for s in range(0, table.num_rows, 1000):
            e = s + 1000
            dom, title, post = d["domain"][s:e], d["title"][s:e], d["history"][s:e]
            a, b, won = d["human_ref_A"][s:e], d["human_ref_B"][s:e], d["labels"][s:e]
            prompts = [format_prompt("r/" + normalize_domain(c), t, p) for c, t, p in zip(dom, title, post)]
            chosen = [x if w == 1 else y for x, y, w in zip(a, b, won)]
            rejected = [y if w == 1 else x for x, y, w in zip(a, b, won)]
            tokenizer(prompts); tokenizer(chosen); tokenizer(rejected)
            rows += len(prompts)
    out.update(rows=rows)
out["seconds"] = time.perf_counter() - t1
out["seconds_with_imports"] = time.perf_counter() - t0
time.sleep(0.2)
out["peak_rss_mb"] = peak["self"] / 2**20
out["all_peak_rss_mb"] = peak["all"] / 2**20
print("RESULT " + json.dumps(out))
"""


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def child(mode: str, data: Path, tok: Path, cache: Path, procs: int, env: dict, opts) -> dict:
    cmd = [sys.executable, "-c", CHILD, mode, str(data), str(tok), str(cache), str(procs),
           str(ROOT / "configs" / "paper" / "dpo.yaml"), str(opts.task_rows), str(opts.parallel_min_rows)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode:
        sys.exit(f"{mode} failed:\n{proc.stderr[-4000:]}")
    for line in proc.stderr.splitlines():
        if line.startswith("[personalm]"):
            print("   ", line)
    return json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])


def mistral_folder(folder: Path) -> Path:
    import mistral_common

    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1", folder / "tokenizer.model")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False, "legacy": False, "model_max_length": 4096}))
    return folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", required=True, help="where the data, the tokenizer and the caches go")
    ap.add_argument("--rows", type=int, default=2_245_068)
    ap.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--row_group_rows", type=int, default=50_000, help="rows per parquet row group written")
    ap.add_argument("--task_rows", type=int, default=None, help="kept rows per task (default: the library's)")
    ap.add_argument("--parallel_min_rows", type=int, default=None, help="(default: the library's)")
    opts = ap.parse_args()
    sys.path.insert(0, str(ROOT))  # the repository's personalm, installed or not (the children get PYTHONPATH)
    from personalm.data import prepare

    opts.task_rows = prepare.tasks.TASK_ROWS if opts.task_rows is None else opts.task_rows
    opts.parallel_min_rows = prepare.PARALLEL_MIN_ROWS if opts.parallel_min_rows is None else opts.parallel_min_rows
    work = Path(opts.dir)
    data, tok = work / "compred", mistral_folder(work / "mistral")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import compred_scale

    if not (data / "finance").exists():
        t = time.perf_counter()
        shards = max(1, round(9 * opts.rows / 2_245_068))
        print(compred_scale.write(data, compred_scale.Shape(rows=opts.rows, shards=shards,
                                                            row_group_rows=opts.row_group_rows),
                                  str(tok / "tokenizer.model")), f"written in {time.perf_counter() - t:.0f} s")
    source = du(data / "finance")
    train_source = sum(p.stat().st_size for p in (data / "finance").glob("train_pref-*.parquet"))
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(work / "hf-datasets-cache"), "PYTHONPATH": str(ROOT)}
    print(f"source: {len(list((data / 'finance').glob('train_pref-*.parquet')))} train shards, "
          f"{train_source / 1e9:.2f} GB (finance folder {source / 1e9:.2f} GB)")
    first = {}
    for procs in opts.procs:
        cache = work / f"cache-np{procs}"
        shutil.rmtree(cache, ignore_errors=True)
        shutil.rmtree(work / "hf-datasets-cache", ignore_errors=True)
        print(f"first preparation, num_proc {procs}:")
        first[procs] = child("prepare", data, tok, cache, procs, env, opts)
        first[procs]["disk"] = du(cache) + du(work / "hf-datasets-cache")
    print("floor (one process, tokenizer(...) in batches of 1,000, reading included):")
    floor = child("floor", data, tok, work / f"cache-np{opts.procs[0]}", 1, env, opts)
    print("second preparation (cache hit), a new process:")
    hit = child("prepare", data, tok, work / f"cache-np{opts.procs[0]}", opts.procs[0], env, opts)
    parts = {procs: _digest(work / f"cache-np{procs}") for procs in opts.procs}
    same = len(set(parts.values())) == 1
    one = first[opts.procs[0]]
    print()
    print("| what | seconds | rows | rows/s | peak RSS MB (with workers) | on disk |")
    print("|---|---:|---:|---:|---:|---:|")
    print(f"| floor | {floor['seconds']:.0f} | {floor['rows']:,} | {floor['rows'] / floor['seconds']:,.0f} | "
          f"{floor['peak_rss_mb']:,.0f} | |")
    for procs, r in first.items():
        steps = ", ".join(f"{k} {v:.0f} s" for k, v in r["steps"].items())
        print(f"| first, num_proc {procs} ({steps}) | {r['seconds']:.0f} | {r['rows']:,} | "
              f"{r['rows'] / r['seconds']:,.0f} | {r['peak_rss_mb']:,.0f} ({r['all_peak_rss_mb']:,.0f}) | "
              f"{r['disk'] / 1e9:.2f} GB ({r['disk'] / train_source:.2f}x source) |")
    print(f"| cache hit | {hit['seconds']:.1f} ({hit['seconds_with_imports']:.1f} with imports) | {hit['rows']:,} | | "
          f"{hit['peak_rss_mb']:,.0f} | |")
    print()
    if 1 in first:
        print(f"num_proc 1 / floor: x{first[1]['seconds'] / floor['seconds']:.2f}")
    if 1 in first and 2 in first:
        print(f"num_proc 1 / num_proc 2: x{first[1]['seconds'] / first[2]['seconds']:.2f}")
    print(f"same prepared files for every num_proc: {same}; columns {one['columns']}, ids {one['id_type']}")
    print(f"stats: {one['stats']}")


def _digest(cache: Path) -> str:
    """The prepared rows' content in order, whatever the part files' boundaries: one running hash per column
    of its values' lengths and one of its values."""
    import hashlib

    import pyarrow as pa
    import pyarrow.compute as pc

    hashes: dict = {}
    for info in sorted(cache.glob("*/info.json")):
        meta = json.loads(info.read_text())
        for part in meta["parts"]:
            with pa.memory_map(str(info.parent / part)) as source:
                for batch in pa.ipc.open_stream(source):
                    for name, column in zip(batch.schema.names, batch.columns):
                        lengths, values = hashes.setdefault(name, (hashlib.sha256(), hashlib.sha256()))
                        if pa.types.is_list(column.type):
                            lengths.update(pc.list_value_length(column).to_numpy().astype("int64").tobytes())
                            values.update(pc.list_flatten(column).to_numpy().tobytes())
                        else:
                            values.update("\x00".join(column.to_pylist()).encode() + b"\x00")
    return hashlib.sha256(b"".join(h.digest() for pair in hashes.values() for h in pair)).hexdigest()


if __name__ == "__main__":
    main()
