"""Peak memory (RSS) of preparing a large ComPreD-format train split, against importing the stack alone.

    python benchmarks/prepare_rss.py --rows 1000000 [--dir /tmp/compred-1m]

Writes synthetic rows (every schema field) as parquet shards in the Hub layout, then, in fresh
processes: (a) imports personalm and its stack only; (b) runs the train-split preparation
(load -> validate -> A/B pairs -> score-ratio filter -> <=5 pairs per post -> tokenize). Prints each
process's peak RSS and the difference, which is what preparation itself costs.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path


def write(root: Path, rows: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from personalm.data import synthetic

    folder = root / "finance"
    folder.mkdir(parents=True, exist_ok=True)
    per_post = 5 * 4  # at most 6 rows per post; overshoot and stop at `rows`
    gen = synthetic.preference_rows("finance", "train_pref", int(rows / per_post) + 1, seed=1)
    shard, written, buf = 0, 0, []
    for row in gen:
        buf.append(row)
        written += 1
        if len(buf) == 200_000 or written == rows:
            pq.write_table(pa.Table.from_pylist(buf), folder / f"train_pref-{shard:05d}.parquet")
            shard, buf = shard + 1, []
        if written == rows:
            break
    for split in ("validation_pref", "test_pref"):
        pq.write_table(pa.Table.from_pylist(list(synthetic.preference_rows("finance", split, 2))),
                       folder / f"{split}.parquet")
    print(f"wrote {written} rows in {shard} parquet shards under {folder}")


CHILD = """
import resource, sys, time
t = time.perf_counter()
from personalm.data.datamodule import ComPreDDataModule
import datasets
datasets.disable_progress_bars()
if sys.argv[1] == "prepare":
    dm = ComPreDDataModule(dataset=sys.argv[2], subset="finance", max_length=128, cache_dir=sys.argv[3])
    ds = dm.prepare_split("train_pref")
    print("rows_out", ds.num_rows, "stats", dm.stats["train_pref"])
print("seconds", round(time.perf_counter() - t, 1))
print("peak_rss_mb", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def child(*args: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True, check=True).stdout
    print(out.strip())
    vals = dict(line.split(" ", 1) for line in out.strip().splitlines())
    return {"rss": float(vals["peak_rss_mb"]), "seconds": float(vals["seconds"])}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--dir", default=f"/tmp/personalm-bench-{os.getpid()}")
    opts = ap.parse_args()
    root = Path(opts.dir)
    if not (root / "finance").exists():
        t = time.perf_counter()
        write(root, opts.rows)
        print(f"(writing took {time.perf_counter() - t:.0f} s)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    cache = str(root / "hf-cache")
    base = child("import")
    prep = child("prepare", str(root), cache)
    print(f"\nimport only : peak RSS {base['rss']:.0f} MB")
    print(f"prepare {opts.rows:,} rows: peak RSS {prep['rss']:.0f} MB, {prep['seconds']:.0f} s "
          f"(+{prep['rss'] - base['rss']:.0f} MB over import only, ratio {prep['rss'] / base['rss']:.2f})")


if __name__ == "__main__":
    main()
