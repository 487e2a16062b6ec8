"""The JSONL writer: whole lines per process, merged once per post, nothing half-written."""

import json
from types import SimpleNamespace

from personalm.evaluation.predict_writer import JsonlPredictionWriter


def fake_trainer(tmp_path, rank, world):
    return SimpleNamespace(global_rank=rank, world_size=world, is_global_zero=rank == 0, log_dir=str(tmp_path),
                           strategy=SimpleNamespace(barrier=lambda *a: None))


def pred(i):
    return {"index": i, "post_id": f"p{i}", "community": "r/a", "prompt_community": "r/a", "title": "t",
            "post": "b", "prompt": "x", "response": f"r{i}"}


def test_two_ranks_merge_in_order_with_each_post_once(tmp_path):
    out = tmp_path / "preds.jsonl"
    w1, w0 = JsonlPredictionWriter(str(out)), JsonlPredictionWriter(str(out))
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
    w = JsonlPredictionWriter(str(out))
    t = fake_trainer(tmp_path, 0, 1)
    w.on_predict_start(t, None)
    w.write_on_batch_end(t, None, [pred(0), pred(1)], None, None, 0, 0)
    # ... the process dies here: no on_predict_end
    part = tmp_path / "preds.jsonl.rank0.part"
    lines = part.read_text().split("\n")
    assert lines[-1] == "" and all(json.loads(x) for x in lines[:-1])
    assert out.read_text() == '{"post_id": "old"}\n'  # untouched until a run completes
