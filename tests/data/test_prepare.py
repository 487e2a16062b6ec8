"""Preparing a split once (``personalm.data.prepare``): any ``num_proc`` gives the same rows, ids and order; the
prepared split holds what the loaders read and nothing else; a second process or run opens it without
recomputing; a killed preparation leaves nothing a rerun takes as finished; ``python -m personalm prepare``."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pytest

from personalm.data import compred, encoding, pairs, prepare, sources, synthetic
from personalm.data.datamodule import ComPreDDataModule
from personalm.data.prompt import format_prompt
from tests.helpers import CONFIGS, CPU, pref_rows, write_parquet

SUBSETS = ["finance", "history"]
MARKER = "\n<|assistant|>\n"  # the template's assistant marker: a response's ids are those after it


def dm(path, cache, **kw):
    kw = {"dataset": str(path), "subset": SUBSETS, "max_length": 96, "max_prompt_length": 48, "batch_size": 4,
          "cache_dir": str(cache), **kw}
    return ComPreDDataModule(**kw)


def rows_of(d: ComPreDDataModule) -> dict:
    """Every split's rows as served, in order."""
    d.setup(None)
    return {split: ds.to_list() for split, ds in d.splits.items()}


@pytest.fixture
def parallel(monkeypatch):
    """Worker processes even for the small test data: many small tasks, no minimum size."""
    monkeypatch.setattr(prepare, "PARALLEL_MIN_ROWS", 0)
    monkeypatch.setattr(prepare.tasks, "TASK_ROWS", 60)


@pytest.mark.parametrize("settings", [
    {"rows": "preference", "conditioning_variants": True},
    {"rows": "sft", "random_community": True, "max_train_pairs": 150},
], ids=["preference+variants", "sft+random-community"])
def test_two_processes_prepare_what_one_does(small_compred, mistral_tokenizer, tmp_path, parallel, settings, caplog):
    caplog.set_level("INFO")
    tok = mistral_tokenizer.name_or_path
    one = dm(small_compred, tmp_path / "one", tokenizer=tok, num_proc=1, **settings)
    two = dm(small_compred, tmp_path / "two", tokenizer=tok, num_proc=2, **settings)
    a, b = rows_of(one), rows_of(two)
    assert set(a) == {"train_pref", "validation_pref", "test_pref", "test_prompts"}
    for split in a:
        assert len(a[split]) > 0 and a[split] == b[split], split
        assert one.stats[split] == two.stats[split], split
    assert one.stats["test_prompts"].post_shortened > 0  # shortening ran, and ran alike
    tasks = [json.loads(p.read_text())["parts"] for p in (tmp_path / "two").glob("*/info.json")]
    assert max(len(t) for t in tasks) == 2  # a task per subset's file
    assert "train_pref: tokenize (2 processes)" in caplog.text  # and two worker processes took them


def write_mixed_shards(root: Path) -> Path:
    """A subset whose train shards Arrow typed differently (a float field stored as int64 in one, text as
    large_string in another), each shard with several row groups, a post across two shards."""
    rows = pref_rows(12, subset="finance")
    rows[3]["human_ref_A"] += " </s> typed in a comment <s>"  # text, never control tokens, in every process
    folder = root / "finance"
    cut1, cut2 = len(rows) // 3 + 1, 2 * len(rows) // 3
    first = pa.Table.from_pylist([dict(r, created_at_utc_A=int(r["created_at_utc_A"])) for r in rows[:cut1]])
    assert first.schema.field("created_at_utc_A").type == pa.int64()
    second = pa.Table.from_pylist(rows[cut1:cut2])
    second = second.cast(pa.schema([pa.field(f.name, pa.large_string()) if f.type == pa.string() else f
                                    for f in second.schema]))
    import pyarrow.parquet as pq

    folder.mkdir(parents=True)
    pq.write_table(first, folder / "train_pref-00000-of-00003.parquet", row_group_size=7)
    pq.write_table(second, folder / "train_pref-00001-of-00003.parquet", row_group_size=9)
    write_parquet(folder / "train_pref-00002-of-00003.parquet", rows[cut2:])
    for split in ("validation_pref", "test_pref"):
        write_parquet(folder / f"{split}.parquet", pref_rows(2, subset="finance", split=split))
    return root


def test_shards_of_different_arrow_types_prepare_alike_in_two_processes(tmp_path, tokenizer, parallel, monkeypatch,
                                                                         caplog):
    caplog.set_level("INFO")
    monkeypatch.setattr(compred, "CHUNK_ROWS", 4)  # a row group read in several chunks (in the workers too:
    root = write_mixed_shards(tmp_path / "data")  # they read whole row groups, so this checks the plan's offsets)
    kw = {"subset": "finance", "rows": "preference", "min_score_ratio": None, "max_pairs_per_post": None}
    one, two = (dm(root, tmp_path / f"c{n}", num_proc=n, **kw) for n in (1, 2))
    one.setup("fit")
    two.setup("fit")
    a, b = one.splits["train_pref"], two.splits["train_pref"]
    assert a.to_list() == b.to_list() and len(a) == len(pref_rows(12, subset="finance"))  # every row, in order
    assert "train_pref: tokenize (2 processes)" in caplog.text
    source = pref_rows(12, subset="finance")
    source[3]["human_ref_A"] += " </s> typed in a comment <s>"
    assert a["post_id"] == [r["post_id"] for r in source]
    plain = encoding.plain_tokenizer(one.tokenizer)
    for row, src in zip(b, source):  # each row holds its own source row's responses (not a neighbour's)
        chosen, rejected = (src["human_ref_A"], src["human_ref_B"])[::1 if src["labels"] == 1 else -1]
        assert row["chosen_ids"] == encoding.response_ids(plain, [chosen], MARKER)[0], src["post_id"]
        assert row["rejected_ids"] == encoding.response_ids(plain, [rejected], MARKER)[0], src["post_id"]
    eos = one.tokenizer.eos_token_id
    assert sum(ids.count(eos) for ids in [*b["chosen_ids"], *b["rejected_ids"]]) == 2 * len(b)  # one EOS a response
    units = prepare.planning.plan_split(one.files("train_pref"), prepare.RowSpec.of("train_pref", one.hparams),
                               compred.PrepStats(), prepare.Progress("t", lambda _: None)).units
    assert len(units) >= 5 and len({u.file for u in units}) == 3


@pytest.mark.parametrize("settings, split, columns", [
    ({"rows": "preference"}, "train_pref", {"index", "community", "post_id", "prompt_ids", "chosen_ids",
                                            "rejected_ids"}),
    ({"rows": "preference", "conditioning_variants": True}, "test_pref",
     {"index", "community", "post_id", "prompt_ids", "chosen_ids", "rejected_ids", "none_prompt_ids",
      "random_prompt_ids"}),
    ({"rows": "sft"}, "validation_pref", {"index", "community", "post_id", "prompt_ids", "chosen_ids"}),
    ({"rows": "sft"}, "test_prompts", {"index", "community", "post_id", "prompt_community", "title", "post",
                                       "prompt_ids"}),
])
def test_the_prepared_split_holds_what_the_loaders_read(small_compred, tmp_path, settings, split, columns):
    d = dm(small_compred, tmp_path, **settings)
    d.setup(None)
    ds = d.splits[split]
    assert set(ds.column_names) == columns
    for name in columns:
        if name.endswith("_ids"):
            assert ds.features[name].feature.dtype == "uint16", name  # a 1k vocabulary: 2 bytes an id
    loader = {"train_pref": d.train_dataloader, "validation_pref": d.val_dataloader, "test_pref": d.test_dataloader,
              "test_prompts": d.predict_dataloader}[split]()
    assert next(iter(loader))  # the collate functions find everything they read
    folder = next(p for p in tmp_path.iterdir() if p.name.startswith(split + "-"))
    assert sorted(p.name for p in folder.iterdir()) == ["info.json"] + sorted(
        json.loads((folder / "info.json").read_text())["parts"])  # nothing else is left behind
    assert not list(tmp_path.glob(".*"))  # no temporary folder either


def forbid_preparing(monkeypatch):
    def refuse(*_, **__):
        raise AssertionError("a prepared split was computed again")

    for owner, name in ((prepare.planning, "plan_split"), (prepare.tasks, "run_task"), (pairs, "subsample"),
                        (encoding.PlainTokenizer, "encode")):
        monkeypatch.setattr(owner, name, refuse)


def test_a_later_run_opens_the_prepared_split_and_recomputes_nothing(small_compred, tmp_path, monkeypatch):
    first = dm(small_compred, tmp_path, rows="preference", conditioning_variants=True)
    expected = rows_of(first)
    forbid_preparing(monkeypatch)
    again = dm(small_compred, tmp_path, rows="preference", conditioning_variants=True)
    assert rows_of(again) == expected
    assert again.stats == first.stats
    with pytest.raises(AssertionError, match="computed again"):  # the guard does bite: other settings prepare
        rows_of(dm(small_compred, tmp_path, rows="preference", max_length=80))


def test_the_key_follows_the_source_files_and_only_the_settings_of_that_split(tmp_path, tokenizer):
    root = synthetic.write_dataset(tmp_path / "data", subsets=("finance",), n_posts={"train_pref": 3})
    d = dm(root, tmp_path / "cache", subset="finance")
    folders = {s: d.prepared(s).folder for s in ("train_pref", "validation_pref")}
    fewer = dm(root, tmp_path / "cache", subset="finance", max_pairs_per_post=1)
    assert fewer.prepared("validation_pref").folder == folders["validation_pref"]  # a training setting
    assert fewer.prepared("train_pref").folder != folders["train_pref"]
    other_seed = dm(root, tmp_path / "cache", subset="finance", seed=7)
    assert other_seed.prepared("validation_pref").folder == folders["validation_pref"]  # no draw acts on it
    assert other_seed.prepared("train_pref").folder != folders["train_pref"]  # the per-post draw does
    assert dm(root, tmp_path / "cache", subset="finance", seed=7, max_eval_pairs=5).prepared(
        "validation_pref").folder != dm(root, tmp_path / "cache", subset="finance", max_eval_pairs=5).prepared(
        "validation_pref").folder  # a seeded cap does
    path = root / "finance" / "validation_pref.jsonl"
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))  # the file changed (its time)
    assert dm(root, tmp_path / "cache", subset="finance").prepared("validation_pref").folder != \
        folders["validation_pref"]


def test_prepared_ids_are_the_ids_of_the_whole_text(small_compred, mistral_tokenizer, tmp_path):
    """Through preparation, with Mistral's SentencePiece: each test pair's prompt ids (the true community's and
    "Reddit"'s) followed by its response ids are the tokenizer's ids of prompt + response text, EOS aside."""
    tok = mistral_tokenizer
    d = dm(small_compred, tmp_path, tokenizer=tok.name_or_path, subset="finance", rows="preference",
           conditioning_variants=True, max_length=1024, max_prompt_length=512)
    d.setup("test")
    source = pairs.to_pairs(sources.load_split(str(small_compred), "finance", "test_pref")).to_pylist()
    rows = d.splits["test_pref"].to_list()
    assert len(rows) == len(source) > 0  # nothing left out or shortened, in the source's order
    for row, src in zip(rows, source):
        for community, prompt_ids in (("r/" + src["community"], row["prompt_ids"]), ("Reddit", row["none_prompt_ids"])):
            prompt = format_prompt(community, src["title"], src["post"])
            for text, ids in ((src["chosen"], row["chosen_ids"]), (src["rejected"], row["rejected_ids"])):
                whole = tok(prompt + text, split_special_tokens=True)["input_ids"]
                assert prompt_ids + ids == whole + [tok.eos_token_id]


def test_a_stale_temporary_folder_is_removed_and_a_live_one_kept(small_compred, tmp_path):
    d = dm(small_compred, tmp_path, rows="sft")
    folder = d.prepared("validation_pref").folder
    import shutil
    import socket

    shutil.rmtree(folder)
    host = socket.gethostname()
    dead = folder.with_name(f".{folder.name}.tmp-{host}-999999999")
    other_key = folder.with_name(f".validation_pref-0123.tmp-{host}-999999998")  # another key, killed too
    live = folder.with_name(f".{folder.name}.tmp-{host}-{os.getppid()}")
    elsewhere = folder.with_name(f".{folder.name}.tmp-gpu-{host}-999999999")  # host "gpu-<ours>": not ours
    for tmp in (dead, other_key, live, elsewhere):
        tmp.mkdir()
        (tmp / "part-00000.arrow").write_bytes(b"half a file")
    assert dm(small_compred, tmp_path, rows="sft").prepared("validation_pref").folder == folder
    assert not dead.exists() and not other_key.exists() and live.exists() and elsewhere.exists()


def test_log_lines_without_a_terminal_one_per_step(tmp_path):
    rows = pref_rows(3)
    rows[4]["human_ref_A"] = " "  # skipped: counted among the rows read
    rows[2]["title"] = "a very long title " * 20  # dropped after tokenization: counted as tokenized
    write_parquet(tmp_path / "data" / "finance" / "train_pref.parquet", rows)
    lines = []
    d = dm(tmp_path / "data", tmp_path, rows="preference", subset="finance", min_score_ratio=None,
           max_pairs_per_post=None, max_prompt_length=40, max_length=96)
    files = d.files("train_pref")
    spec = prepare.RowSpec.of("train_pref", d.hparams)
    prepare.prepare(files, spec, d.tokenizer, tmp_path / "x", "k", log=lines.append)
    assert len(lines) == 2, lines
    import re

    stats = prepare.find(tmp_path / "x").stats
    assert stats.rows == len(rows) and stats.skipped == {"empty_response": 1} and stats.dropped == 1
    tokenized = stats.rows - 1  # the rows kept, dropped ones included (they were tokenized)
    assert re.fullmatch(rf"\[personalm\] train_pref: read and check: {len(rows)} rows in [0-9.]+ s "
                        rf"\([0-9,]+ rows/s\)", lines[0]), lines
    assert re.fullmatch(rf"\[personalm\] train_pref: tokenize \(1 process\): {tokenized} rows in [0-9.]+ s "
                        rf"\([0-9,]+ rows/s\)", lines[1]), lines


def test_bad_input_is_named_and_leaves_no_prepared_split(tmp_path, tokenizer, monkeypatch):
    import pyarrow.parquet as pq

    monkeypatch.setattr(compred, "CHUNK_ROWS", 2)  # row 7: the second row group's second chunk
    rows = pref_rows(3)
    rows[7]["score_A"] = None
    (tmp_path / "data" / "finance").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "data" / "finance" / "train_pref-00001-of-00002.parquet",
                   row_group_size=4)
    write_parquet(tmp_path / "data" / "finance" / "train_pref-00000-of-00002.parquet", pref_rows(2))
    d = dm(tmp_path / "data", tmp_path / "cache", subset="finance")
    with pytest.raises(compred.ComPreDDataError, match=r"train_pref-00001-of-00002\.parquet: row 7, field 'score_A'"):
        d.setup("fit")
    assert not list((tmp_path / "cache").iterdir())


def digest(ds) -> str:
    return hashlib.sha256(json.dumps(ds.to_dict(), sort_keys=True).encode()).hexdigest()


KILLED = """
import sys
from personalm.data import prepare
from personalm.data.datamodule import ComPreDDataModule
from personalm.data.prompt import format_prompt
prepare.PARALLEL_MIN_ROWS, prepare.tasks.TASK_ROWS = 0, 200
dm = ComPreDDataModule(dataset=sys.argv[1], subset="finance", rows="preference", cache_dir=sys.argv[2], num_proc=2,
                       max_length=256, min_score_ratio=None)
dm.prepared("train_pref")
print("finished")
"""


@pytest.mark.slow
def test_a_preparation_killed_part_way_is_redone_and_gives_the_same_split(tmp_path):
    root = synthetic.write_dataset(tmp_path / "data", subsets=("finance",), n_posts={"train_pref": 400},
                                   lengths=synthetic.LengthModel())
    cache = tmp_path / "cache"
    proc = subprocess.Popen([sys.executable, "-c", KILLED, str(root), str(cache)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 120
    while not list(cache.glob(".*/part-*.arrow")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    os.killpg(proc.pid, signal.SIGKILL)  # the parent and its workers, mid-way
    proc.wait()
    assert list(cache.glob(".*")) and not [p for p in cache.iterdir() if not p.name.startswith(".")]
    kw = {"subset": "finance", "rows": "preference", "max_length": 256, "min_score_ratio": None}
    rerun = ComPreDDataModule(dataset=str(root), cache_dir=str(cache), **kw)
    rerun.setup("fit")
    clean = ComPreDDataModule(dataset=str(root), cache_dir=str(tmp_path / "clean"), num_proc=1, **kw)
    clean.setup("fit")
    assert len(rerun.splits["train_pref"]) > 1000
    assert digest(rerun.splits["train_pref"]) == digest(clean.splits["train_pref"])
    assert not list(cache.glob(".*"))  # the killed run's temporary folder was cleaned up


def test_the_prepare_command_prepares_every_split_a_config_reads(small_compred, tmp_path, capsys, monkeypatch):
    from personalm.data import prepare_command

    args = ["--config", CPU, "--config", str(CONFIGS / "demo" / "dpo.yaml"), f"--data.dataset={small_compred}",
            f"--data.cache_dir={tmp_path}", "--data.conditioning_variants=true"]
    found = prepare_command.main(args)
    out = capsys.readouterr().out
    assert set(found) == {"train_pref", "validation_pref", "test_pref", "test_prompts"}
    for split, prepared in found.items():
        row = next(line for line in out.splitlines() if line.startswith(f"| {split} |"))
        assert f"| {prepared.stats.rows_out:,} |" in row and str(prepared.folder) in row and "MiB" in row
    assert "none_prompt_ids" in found["test_pref"].info["columns"]
    forbid_preparing(monkeypatch)  # the CLI, with the same arguments, opens them
    from personalm.cli import PersonalmCLI

    cli = PersonalmCLI(args=[*args, f"--trainer.default_root_dir={tmp_path / 'run'}"], run=False)
    cli.datamodule.setup(None)
    assert {s: len(ds) for s, ds in cli.datamodule.splits.items()} == {s: p.stats.rows_out for s, p in found.items()}


DDP_SCRIPT = '''
import json, sys
import lightning.pytorch as L
import torch
from personalm.data import encoding, pairs, prepare
from personalm.data.datamodule import ComPreDDataModule
from personalm.data.prompt import format_prompt

data, cache, out = sys.argv[1:4]
calls = []


class Watched(ComPreDDataModule):
    def setup(self, stage=None):
        if self.trainer.global_rank != 0:  # this process must only open what rank 0 prepared
            for owner, name in ((prepare.planning, "plan_split"), (prepare.tasks, "run_task"),
                                (pairs, "subsample"), (encoding.PlainTokenizer, "encode")):
                def refuse(*a, _name=name, **k):
                    calls.append(_name)
                    raise AssertionError(f"{_name} called on rank 1")
                setattr(owner, name, refuse)
        super().setup(stage)
        record = {"calls": calls, "rows": {s: len(d) for s, d in self.splits.items()},
                  "first_ids": self.splits["train_pref"][0]["prompt_ids"]}
        with open(f"{out}/rank{self.trainer.global_rank}.json", "w") as f:
            json.dump(record, f)


class Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def training_step(self, batch, i):
        return (self.w - float(len(batch["community"]))).pow(2).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


if __name__ == "__main__":
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=2, limit_val_batches=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(Tiny(), datamodule=Watched(dataset=data, subset=["finance", "history"], rows="preference",
                                           cache_dir=cache, max_length=128, batch_size=4))
'''


@pytest.mark.slow
def test_under_ddp_rank_0_prepares_and_rank_1_only_opens(small_compred, tmp_path):
    script = tmp_path / "ddp_prepare.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.run([sys.executable, str(script), str(small_compred), str(tmp_path / "cache"), str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert rank1["calls"] == [] and rank0["rows"] == rank1["rows"] and rank0["first_ids"] == rank1["first_ids"]
    assert set(rank1["rows"]) == {"train_pref", "validation_pref"} and rank1["rows"]["train_pref"] > 100
    prepared = [p for p in (tmp_path / "cache").iterdir()]
    assert len(prepared) == 2 and not [p for p in prepared if p.name.startswith(".")]  # once, by one process
