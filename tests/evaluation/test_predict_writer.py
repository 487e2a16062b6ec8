"""The JSONL writer: whole lines per process, merged once per post, nothing half-written."""

import json
import logging
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from personalm.evaluation.predict_writer import JsonlPredictionWriter
from tests.helpers import DEMO, quiet, read_jsonl


def fake_trainer(tmp_path, rank, world):
    return SimpleNamespace(global_rank=rank, world_size=world, is_global_zero=rank == 0, log_dir=str(tmp_path),
                           strategy=SimpleNamespace(barrier=lambda *a: None))


def writer(out):
    """A writer as ``setup`` leaves it (the output path decided; ``setup`` needs a real trainer)."""
    w = JsonlPredictionWriter(str(out))
    w.path = out
    return w


def pred(i):
    return {"index": i, "post_id": f"p{i}", "community": "r/a", "prompt_community": "r/a", "title": "t",
            "post": "b", "prompt": "x", "response": f"r{i}"}


def test_two_ranks_merge_in_order_with_each_post_once(tmp_path):
    out = tmp_path / "preds.jsonl"
    w1, w0 = writer(out), writer(out)
    t0, t1 = fake_trainer(tmp_path, 0, 2), fake_trainer(tmp_path, 1, 2)
    w0.on_predict_start(t0, None)
    w1.on_predict_start(t1, None)
    # the distributed sampler pads rank 1 with a repeat of sample 0
    w0.write_on_batch_end(t0, None, [pred(0), pred(2)], None, None, 0, 0)
    w1.write_on_batch_end(t1, None, [pred(1), pred(0)], None, None, 0, 0)
    w0.write_on_batch_end(t0, None, [pred(4)], None, None, 1, 0)
    w1.write_on_batch_end(t1, None, [pred(3)], None, None, 1, 0)
    w1.on_predict_end(t1, None)
    assert not out.exists()  # only rank 0 merges
    w0.on_predict_end(t0, None)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["post_id"] for r in rows] == ["p0", "p1", "p2", "p3", "p4"]
    assert "index" not in rows[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["preds.jsonl"]


def test_interrupted_run_leaves_whole_lines_and_keeps_an_earlier_file(tmp_path):
    out = tmp_path / "preds.jsonl"
    out.write_text('{"post_id": "old"}\n')  # a finished earlier run
    w = writer(out)
    t = fake_trainer(tmp_path, 0, 1)
    w.on_predict_start(t, None)
    w.write_on_batch_end(t, None, [pred(0), pred(1)], None, None, 0, 0)
    # ... the process dies here: no on_predict_end
    part = tmp_path / "preds.jsonl.rank0.part"
    lines = part.read_text().split("\n")
    assert lines[-1] == "" and all(json.loads(x) for x in lines[:-1])
    assert out.read_text() == '{"post_id": "old"}\n'  # untouched until a run completes


def _settings(model="m1"):
    return {"model": model, "model_files": [], "dtype": None, "generation": {"max_new_tokens": 8},
            "data": {"dataset": "d"}}


def _interrupted_parts(tmp_path, out):
    """What a killed 2-process run leaves: its settings, two part files, one ending in half a line."""
    (tmp_path / "preds.jsonl.meta.json").write_text(json.dumps(_settings()))
    (tmp_path / "preds.jsonl.rank0.part").write_text(json.dumps(pred(0)) + "\n" + json.dumps(pred(2)) + "\n")
    (tmp_path / "preds.jsonl.rank1.part").write_text(json.dumps(pred(1)) + "\n" + '{"index": 3, "post_id": "p')


def test_a_rerun_keeps_whole_lines_of_every_earlier_process(tmp_path):
    """Same settings, now one process: the whole lines of both earlier parts are kept (posts 0, 1, 2), the
    unfinished line is not; the new process appends after it, and the merge has each post once."""
    out = tmp_path / "preds.jsonl"
    _interrupted_parts(tmp_path, out)
    w = writer(out)
    assert w._keep_or_start_over(_settings()) == [0, 1, 2]
    t = fake_trainer(tmp_path, 0, 1)
    w.on_predict_start(t, None)  # rank 0's part
    w.write_on_batch_end(t, None, [pred(3), pred(4)], None, None, 0, 0)
    w.on_predict_end(t, None)
    assert [json.loads(line)["post_id"] for line in out.read_text().splitlines()] == ["p0", "p1", "p2", "p3", "p4"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["preds.jsonl"]


def test_a_rerun_with_another_model_starts_over_and_says_why(tmp_path, caplog):
    out = tmp_path / "preds.jsonl"
    _interrupted_parts(tmp_path, out)
    w = writer(out)
    with caplog.at_level(logging.INFO):
        assert w._keep_or_start_over(_settings(model="m2")) == []
    assert "starting over" in caplog.text and "(model differ)" in caplog.text
    assert not list(tmp_path.glob("*.part"))
    assert json.loads((tmp_path / "preds.jsonl.meta.json").read_text())["model"] == "m2"


@pytest.mark.slow
def test_predict_killed_and_rerun_with_two_processes_writes_each_post_once(sft_run, small_compred, tmp_path):
    """Two processes, both killed (SIGKILL) when their third batch starts; the rerun keeps the lines written
    (byte for byte), predicts the rest, and the file has every test post exactly once."""
    sft, _ = sft_run
    out = tmp_path / "predictions.jsonl"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "personalm", "predict", *DEMO, f"--data.dataset={small_compred}", *quiet(tmp_path),
           f"--model.init_args.model_name_or_path={sft.model.export_path}", f"--predictions.output_path={out}",
           "--model.init_args.generation.max_new_tokens=4", "--data.eval_batch_size=2",
           "--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp"]
    kill = '--trainer.callbacks+={"class_path": "tests.helpers.KillAtPredictBatch", "init_args": {"batch": 2}}'
    killed = subprocess.run([*cmd, kill], env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode != 0 and not out.exists(), killed.stderr[-2000:]
    written = {json.loads(line)["post_id"]: line for part in tmp_path.glob("predictions.jsonl.rank*.part")
               for line in part.read_text().splitlines(keepends=True) if line.endswith("\n")}
    assert 0 < len(written) < 16, len(written)

    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    log = rerun.stdout + rerun.stderr
    assert rerun.returncode == 0, log[-3000:]
    assert f"kept the {len(written)} predictions" in log, log[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    posts = [r["post_id"] for r in rows]
    test_posts = {r["post_id"] for subset in ("finance", "history")
                  for r in read_jsonl(small_compred / f"{subset}_test_prompts" / "test_prompts.jsonl")}
    assert len(posts) == len(set(posts)) and set(posts) == test_posts
    for row in rows:  # the lines kept were not predicted again
        if row["post_id"] in written:
            assert json.loads(written[row["post_id"]])["response"] == row["response"]
    assert not list(tmp_path.glob("predictions.jsonl.*"))
