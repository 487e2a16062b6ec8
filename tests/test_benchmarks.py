"""The benchmark scripts' small settings run on CPU (the figures themselves are read, never asserted)."""

import ast
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_tiny_setting_runs_on_cpu(tmp_path):
    """``benchmarks/gpu_check.py --size tiny``: every run trains (DPO starts at ln 2, weights change) and the
    table and JSON come out; trl's run is there when trl is importable; the generation comparison runs its HF side
    and says that vLLM is skipped (not installed in the test venv, as on the lent GPU machines)."""
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--size", "tiny", "--steps", "4",
                           "--warmup", "1", "--sft-batch", "2", "--dpo-batch", "2", "--max-length", "256",
                           "--posts", "3", "--generation-prompts", "4",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"}, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| personalm DPO, full fine-tuning, FSDP2 |" in proc.stdout
    assert "vLLM is not installed here: the HF side runs alone" in proc.stdout  # as in the lent GPU's environment
    assert "| sft_export | 4 (" in proc.stdout and "| bfloat16 |" in proc.stdout
    results = json.loads((tmp_path / "gpu_check.json").read_text())["results"]
    generation = results.pop("generation")
    assert results.pop("attention") == {"skipped": True} and "attention: skipped (no CUDA" in proc.stdout
    assert generation["sft_export bfloat16 hf"]["new_tokens"] > 0
    syncs = results.pop("host syncs")  # counted on CUDA only; here the run and its logging-step labels
    assert syncs == {"observed": False, "steps": 8, "other_steps_max": 0, "other_steps_total": 0, "logging_steps": 2,
                     "logging_steps_mean": 0.0}
    expected = {"personalm SFT, LoRA", "personalm DPO, LoRA, adapters off", "personalm DPO, full fine-tuning, FSDP2",
                "personalm DPO, full fine-tuning, FSDP2, reference not resharded"}
    assert expected <= set(results)
    for name, r in results.items():
        assert r["steps"] == 4 and r["tokens_per_s"] > 0 and r["changed"] > 0.3, (name, r)
        if "DPO" in name:
            assert abs(r["first_loss"] - 0.6931) < 2e-3, (name, r)


@pytest.mark.slow
def test_epoch_benchmark_small_setting_trains_the_same_curve_as_trl(tmp_path):
    """``benchmarks/epoch_vs_trl.py`` on a few demo pairs: both sides run the epoch, and their per-step DPO losses
    agree (the same work is compared), and the two-span layout's losses agree with prefix sharing's. trl is in the
    dev extra (.ci/run installs it): without it this test fails, it does not skip."""
    import trl  # noqa: F401
    out = tmp_path / "epoch.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "epoch_vs_trl.py"), "--models", "embedded",
                           "--shapes", "demo", "--pairs", "8", "--batch", "4",
                           "--runs", "personalm DPO,personalm DPO two spans,trl DPO",
                           "--out", str(out)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"}, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| personalm DPO |" in proc.stdout and "epoch x" in proc.stdout
    runs = json.loads(out.read_text())["embedded/demo"]
    ours, theirs = runs["personalm DPO"], runs["trl DPO"]
    assert ours["steps"] == theirs["steps"] == 2 and ours["pairs"] == 8
    assert abs(ours["losses"][0] - 0.6931) < 1e-3
    assert max(abs(a - b) for a, b in zip(ours["losses"], theirs["losses"])) < 1e-4
    apart = runs["personalm DPO two spans"]  # the peer layout: the same losses, every prompt forwarded twice
    assert max(abs(a - b) for a, b in zip(ours["losses"], apart["losses"])) < 1e-4
    assert ours["tokens"] < apart["tokens"] and "prefix-shared vs two spans per pair" in proc.stdout


@pytest.mark.slow
def test_prepare_scale_small_setting_runs(tmp_path):
    """``benchmarks/prepare_scale.py`` on 20,000 rows in row groups of 2,000, tasks of 3,000 rows and no minimum for
    workers: the data is written, num_proc 1 and 2 (really two processes) run, the floor and the cache hit come
    out, and both runs prepared the same rows."""
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "prepare_scale.py"), "--dir", str(tmp_path),
                           "--rows", "20000", "--row_group_rows", "2000", "--task_rows", "3000",
                           "--parallel_min_rows", "0"], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"}, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    for row in ("| floor |", "| first, num_proc 1 (", "| first, num_proc 2 (", "| cache hit |"):
        assert row in out, out
    assert "same prepared files for every num_proc: True" in out, out
    assert "train_pref: tokenize (2 processes): " in out, out
    stats = ast.literal_eval(out.split("stats: ", 1)[1].splitlines()[0])
    assert stats["rows"] == 20000 and 8000 < stats["rows_out"] < 15000, stats  # every row read, about 57% kept


@pytest.mark.slow
def test_generation_speed_small_setting_runs_both_backends_to_the_same_ids(tmp_path):
    """``benchmarks/generation_speed.py`` in the vLLM environment on 16 demo prompts: both backends run, the table
    comes out, and in fp32 every prompt got the same ids from both."""
    from tests.helpers import vllm_python

    proc = subprocess.run([vllm_python(), str(REPO / "benchmarks" / "generation_speed.py"), "--models", "embedded",
                           "--dtypes", "float32", "--prompts", "16", "--new-tokens", "8"], capture_output=True,
                          text=True, timeout=600, env={**os.environ, "PYTHONWARNINGS": "ignore"}, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    row = next(line for line in proc.stdout.splitlines() if line.startswith("| embedded |"))
    assert row.endswith("| 16 of 16 |") and "| float32 |" in row, row


def _load_benchmark(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_minority_eta_rule_takes_the_largest_eta_no_community_pays_for():
    """``benchmarks/minority_eta.py``'s summary (on made-up validation figures): the change against plain DPO on
    every pair is averaged over seeds per community, and the default is the largest eta whose every community stays
    within the tolerance; the table shows each eta."""
    minority_eta = _load_benchmark("minority_eta")

    def run(small, large, drop=0.0):
        return {"r_financialindependence": small, "r_Frugal": large, "r_investing": large - drop,
                "macro": (small + 2 * large - drop) / 3, "worst": min(small, large - drop)}
    seeds = {seed: {"uniform cap": run(30, 70), ("cap", 0.0): run(60, 70), ("every", 0.0): run(80, 80),
                    ("cap", 1.0): run(70, 72), ("every", 1.0): run(85, 80, drop=1.0 + seed),   # mean drop 1.5
                    ("cap", 2.0): run(75, 72), ("every", 2.0): run(88, 80, drop=2.0 + 2 * seed),  # mean drop 3.0
                    ("cap", 5.0): run(80, 70), ("every", 5.0): run(90, 80, drop=6.0)}
             for seed in (0, 1)}
    text = minority_eta.summarize(seeds, [0.0, 1.0, 2.0, 5.0], tolerance=3.0)
    assert "| 2 | 75.0 / 73.0 / 72.0 | +0.0, +8.0, -3.0; +1.7 |" in text, text
    assert text.endswith("no community by more than 3 points on every pair: 2"), text
    assert minority_eta.summarize(seeds, [0.0, 1.0, 2.0, 5.0], tolerance=2.0).endswith(": 1")


def test_minority_study_summary_has_the_runs_every_seed_has_and_the_every_pair_changes():
    """``benchmarks/minority_study.py``'s summary (on made-up reports): seeds 0 and 1 ran the whole study, seed 2 only
    the runs on every pair (``--study-args='--dpo_variants=...'``): the table keeps the runs all three have, and the
    change of ``every_pair_shipped`` against ``every_pair`` is per community, per seed, averaged with a t interval."""
    study = _load_benchmark("minority_study")

    def variant(name, small, large):
        accuracy = {"r/Frugal": [large, 360], study.SMALL: [small, 360], "macro": [(small + large) / 2, None],
                    "worst": [min(small, large), None]}
        return {"name": name, "accuracy": accuracy, "win_rates": {"all": [0.5, 0.4, 0.6, 200],
                                                                   study.SMALL: [small, 0.0, 1.0, 40]}}

    def report(seed, *names):
        runs = {"context": (0.3, 0.7), "shipped": (0.7, 0.7), "every_pair": (0.85, 0.8),
                "every_pair_shipped": (0.9, 0.8 - 0.01 * seed)}  # r/Frugal 0, 1 and 2 points lower with the weights
        return {"variants": [variant(n, *runs[n]) for n in names]}
    everything = ("context", "shipped", "every_pair", "every_pair_shipped")
    reports = {0: report(0, *everything), 1: report(1, *everything),
               2: report(2, "context", "every_pair", "every_pair_shipped")}
    text = study.summarize(reports)
    assert "| shipped |" not in text and "| every_pair_shipped | 90.0 (90.0 to 90.0)" in text, text
    assert "| 80.0 | 0.500 (0.500 to 0.500) | 0.850 (0.850 to 0.850) |" in text, text  # every_pair: worst, win rates
    assert "| r/Frugal | -1.0 (-3.5 to +1.5) | +0.0, -1.0, -2.0 |" in text, text
    assert f"| {study.SMALL} | +5.0 (+5.0 to +5.0) | +5.0, +5.0, +5.0 |" in text, text
    assert "| shipped |" in study.summarize({0: reports[0], 1: reports[1]})


def test_judge_agreement_counts_where_a_judge_and_the_truth_agree(tmp_path):
    """``benchmarks/judge_agreement.py`` (on made-up predictions, a judge that always says A): each finished run
    against the model without context, stale and unfinished folders left out; the agreement counts and both win
    rates by hand."""
    agreement = _load_benchmark("judge_agreement")
    from personalm.evaluation.synthetic_judge import SyntheticJudge

    careful = "Keep it boring: broad index funds, automatic contributions, and no panic selling."
    bold = "YOLO it on GME before earnings, diamond hands, we are going to the moon."
    posts = [("p1", careful, bold), ("p2", bold, careful), ("p3", bold, bold)]  # r/investing: careful > bold

    def write(folder, column, done=True):
        folder.mkdir(parents=True)
        rows = [{"post_id": p, "community": "r/investing", "prompt_community": "r/investing", "title": "t",
                 "post": "b", "prompt": "x", "response": texts[column]} for p, *texts in posts]
        (folder / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        if done:
            (folder / "done.json").write_text("{}")
    write(tmp_path / "predict_no_context", 1)
    write(tmp_path / "predict_context", 0)
    write(tmp_path / "predict_context.stale-20261207-000000", 1)
    write(tmp_path / "predict_random", 1)  # the context model given a wrong community: not a run
    write(tmp_path / "predict_half", 0, done=False)
    runs = agreement.runs(tmp_path)
    assert list(runs) == ["context"]

    class SaysA:
        def judge(self, items):
            return ["A"] * len(items)
    result = agreement.compare(runs["context"], SaysA(), SyntheticJudge(["minority"]))
    assert result == {"posts": 3, "agree": 1, "decided": 2, "agree_decided": 1, "win_judge": 1.0, "win_truth": 0.5}
    rows = [("0", "context", result), ("1", "context", result)]
    assert "| 0 | context | 3 | 1/3 (33%) | 1/2 (50%) | 1.000 | 0.500 |" in agreement.table(rows)
    pooled = agreement.table(agreement.pooled(rows))
    assert "| 2 seeds | context | 6 | 2/6 (33%) | 2/4 (50%) | 1.000 | 0.500 |" in pooled


def test_minority_study_intervals_use_t_quantiles_at_every_number_of_seeds():
    """The 95% t interval over 20 seeds uses t(19), not the normal's 1.96 (values from a t table)."""
    study = _load_benchmark("minority_study")
    assert study.t975(9) == 2.262 and study.t975(19) == 2.093
    for df, t in [(30, 2.0423), (40, 2.0211), (60, 2.0003), (120, 1.9799)]:
        assert abs(study.t975(df) - t) < 5e-4, df
    values = [0.0, 1.0] * 10  # sd 0.513, 20 seeds
    mean, low, high = study.interval(values)
    assert abs((high - mean) - 2.093 * 0.51299 / 20 ** 0.5) < 1e-4
