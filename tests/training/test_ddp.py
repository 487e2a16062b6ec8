"""Two CPU processes (gloo) with ``strategy: ddp``, launched the way a user launches them."""

import os
import re
import subprocess
import sys

import pytest

from tests.helpers import DEMO, DEMO_REWARD, quiet, scalars

pytestmark = pytest.mark.slow


def test_sft_fit_with_ddp_on_two_cpu_processes(small_compred, tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "personalm", "fit", *DEMO, f"--data.dataset={small_compred}",
           "--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp",
           f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_progress_bar=false",
           "--trainer.max_steps=12", "--trainer.val_check_interval=6", "--trainer.max_epochs=5",
           "--data.batch_size=4", "--trainer.log_every_n_steps=2"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "world_size: 2" in proc.stdout + proc.stderr or "MEMBER: 2/2" in proc.stdout + proc.stderr
    versions = list((tmp_path / "lightning_logs").iterdir())
    assert len(versions) == 1, versions  # one logger (rank 0), not one per process
    log_dir = versions[0]
    assert (log_dir / "checkpoints" / "last.ckpt").resolve().name == "step=12.ckpt"  # one set, not one per process
    assert len(list((log_dir / "checkpoints").glob("step=*.ckpt"))) == 1
    found = scalars(log_dir)
    assert len(found["val/loss"]) == 2 and len(found["train/loss"]) >= 3, found.keys()
    assert (log_dir / "hf_model" / "config.json").is_file()


def test_nan_on_one_process_stops_both_without_hanging(small_compred, tmp_path):
    """A NaN loss on rank 1 only: both processes stop before the update with an error (no rank left waiting
    in a collective), and nothing is exported. Rank 0's own loss is finite; DDP's gradient averaging
    carries rank 1's NaN into its gradients."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "personalm", "fit", *DEMO, f"--data.dataset={small_compred}",
           "--model.class_path=tests.helpers.NaNAtStep", "--model.init_args.nan_at_step=2",
           "--model.init_args.nan_rank=1", "--trainer.accelerator=cpu", "--trainer.devices=2",
           "--trainer.strategy=ddp", f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_progress_bar=false",
           "--trainer.max_steps=6", "--trainer.limit_val_batches=0", "--data.batch_size=4"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert re.search(r"\[rank1\]: \S*NonFiniteError: a non-finite loss on this process at step 2", out), out[-3000:]
    assert re.search(r"\[rank0\]: \S*NonFiniteError: a non-finite gradient on this process at step 2", out), out[-3000:]
    assert not list(tmp_path.rglob("hf_model"))


def test_validation_counts_each_row_once_with_two_processes(reward_run, train_compred, tmp_path):
    """13 validation pairs on 2 processes: the sampler gives each 7, repeating one pair. The per-community
    figures (reward accuracy, loss, margins) equal a one-process run's: the repeat is not counted."""
    from personalm.cli import main

    fit, _ = reward_run
    common = [*DEMO_REWARD, f"--model.init_args.model_name_or_path={fit.model.export_path}",
              f"--data.dataset={train_compred}", "--data.max_eval_pairs=13", "--data.eval_batch_size=4"]
    one = main(["validate", *common, *quiet(tmp_path / "one")])
    assert len(one.datamodule.splits["validation_pref"]) == 13
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "personalm", "validate", *common, *quiet(tmp_path / "two"),
           "--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    single, double = (scalars(next((tmp_path / run / "lightning_logs").iterdir())) for run in ("one", "two"))
    per_community = sorted(k for k in single if "/r_" in k)
    assert len(per_community) >= 10 and set(single) == set(double), (sorted(single), sorted(double))
    for key in single:
        assert double[key] == pytest.approx(single[key], abs=1e-5), key
