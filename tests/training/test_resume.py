"""A fit killed between two validations and resumed with ``--ckpt_path last`` is the run that was never
killed: the same weights (fp32 CPU, to 1e-6) and the same logged losses after the resume point. The kill is a
SIGKILL from a callback at a fixed step (``tests.helpers.KillAt``): no handler runs, as when a node dies."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from personalm.cli import STOPPED_BY_SIGNAL
from personalm.training.checkpoints import LAST
from personalm.training.resume import FROZEN_OMITTED, RNG
from tests.helpers import DEMO, DEMO_DPO, DEMO_REWARD, kill_at, quiet, safetensors_diff, step_scalars

pytestmark = pytest.mark.slow

LOGS = Path("lightning_logs") / "version_0"


def _fit(args: list, root: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "personalm", "fit", *args, *quiet(root), *extra], env=env,
                          capture_output=True, text=True, timeout=300)


def _run_killed_and_resumed(args: list, tmp_path: Path, kill: int) -> tuple[Path, Path, str]:
    """The uninterrupted run (in this process), then the killed one and its resume (each its own process)."""
    from personalm.cli import main

    main(["fit", *args, *quiet(tmp_path / "full")])
    killed = _fit(args, tmp_path / "killed", kill_at(kill))
    assert killed.returncode == -9, killed.stdout[-2000:] + killed.stderr[-2000:]
    assert not (tmp_path / "killed" / LOGS / "hf_model").exists()
    resumed = _fit(args, tmp_path / "killed", "--ckpt_path=last")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    return tmp_path / "full" / LOGS, tmp_path / "killed" / LOGS, resumed.stdout + resumed.stderr


def _same_after(full: dict, resumed: dict, tag: str, after: int) -> None:
    later = {s: v for s, v in full[tag].items() if s > after}
    assert later, f"no {tag} after step {after}"
    assert {s: resumed[tag].get(s) for s in later} == pytest.approx(later, abs=1e-6), tag


def test_sft_lora_killed_between_validations_resumes_exactly(small_compred, tmp_path):
    """LoRA SFT with dropout 0.1 (draws from the RNG every step), 6 batches an epoch, validation every 3
    batches, a checkpoint every 4 steps, killed at step 10 (after the checkpoint of step 8, in the middle of
    epoch 2, between the validations of steps 9 and 12), resumed to step 14 (into epoch 3)."""
    args = [*DEMO, f"--data.dataset={small_compred}", "--data.max_train_pairs=96", "--data.batch_size=16",
            "--trainer.max_steps=14", "--trainer.max_epochs=5", "--trainer.val_check_interval=3",
            "--trainer.limit_val_batches=2", "--trainer.log_every_n_steps=1", "--checkpoints.every_n_steps=4",
            '--model.init_args.lora={"r": 4, "alpha": 8, "dropout": 0.1}']
    full, resumed, log = _run_killed_and_resumed(args, tmp_path, kill=10)
    assert "resuming from" in log and "step=8.ckpt (step 8)" in log, log[-2000:]

    assert safetensors_diff(full / "hf_model", resumed / "hf_model") <= 1e-6
    a, b = step_scalars(full), step_scalars(resumed)
    for tag in ("train/loss", "val/loss"):
        _same_after(a, b, tag, after=8)
    assert len(b["val/loss"]) == len(a["val/loss"])  # the run logs on in its own folder: one log, all steps

    checkpoints = resumed / "checkpoints"
    assert (checkpoints / LAST).resolve().name == "step=14.ckpt"
    assert len(list(checkpoints.glob("step=*.ckpt"))) == 2  # keep: 2 (the older ones pruned)
    assert not list(checkpoints.glob(".*"))  # no temporary file left behind
    ckpt = torch.load(checkpoints / LAST, weights_only=True, map_location="cpu")
    assert ckpt[FROZEN_OMITTED] and ckpt["state_dict"] and all("lora_" in k for k in ckpt["state_dict"])
    assert len(ckpt[RNG]) == 1 and "optimizer_states" in ckpt and ckpt["loops"]


def test_dpo_with_precomputed_reference_resumes_exactly(sft_run, small_compred, tmp_path):
    """Full fine-tuning DPO against a precomputed reference (cached log-probs looked up by row index after the
    resume): killed at step 7, between the validations of steps 4 and 8, resumed from the checkpoint of step 6."""
    sft, _ = sft_run
    args = [*DEMO_DPO, f"--data.dataset={small_compred}",
            f"--model.init_args.model_name_or_path={sft.model.export_path}",
            "--model.init_args.precompute_reference=true", f"--model.init_args.reference_cache={tmp_path / 'cache'}",
            "--data.max_train_pairs=64", "--data.batch_size=8", "--data.max_eval_pairs=16",
            "--trainer.max_steps=10", "--trainer.max_epochs=3", "--trainer.val_check_interval=4",
            "--trainer.log_every_n_steps=1", "--checkpoints.every_n_steps=3"]
    full, resumed, log = _run_killed_and_resumed(args, tmp_path, kill=7)
    assert "step=6.ckpt (step 6)" in log, log[-2000:]
    assert safetensors_diff(full / "hf_model", resumed / "hf_model") <= 1e-6
    a, b = step_scalars(full), step_scalars(resumed)
    for tag in ("train/loss", "train/rewards/margins", "val/loss", "val/rewards/accuracies"):
        _same_after(a, b, tag, after=6)


def test_sigusr1_saves_a_checkpoint_before_the_process_ends(small_compred, tmp_path):
    """SLURM's warning (SIGUSR1; outside SLURM's auto-requeue treated as SIGTERM) at step 3 of a run whose
    step checkpoints are far apart: the process stops with a checkpoint of step 3 that --ckpt_path last takes."""
    args = [*DEMO, f"--data.dataset={small_compred}", "--trainer.max_steps=40", "--trainer.limit_val_batches=0",
            "--checkpoints.every_n_steps=100", "--checkpoints.every_minutes=null"]
    stopped = _fit(args, tmp_path, kill_at(3, "SIGUSR1"))
    out = stopped.stdout + stopped.stderr
    assert stopped.returncode == STOPPED_BY_SIGNAL and "stopped by a signal at step 3" in out, out[-3000:]
    assert (tmp_path / LOGS / "checkpoints" / LAST).resolve().name == "step=3.ckpt"
    assert not (tmp_path / LOGS / "hf_model").exists()


def test_reward_model_with_length_grouped_batches_resumes_exactly(small_compred, tmp_path):
    """The reward model's training order grouped by length (``data.train_group_by_length``): killed at step 7,
    resumed from the checkpoint of step 6 into the same batches, so the same weights and losses."""
    args = [*DEMO_REWARD, f"--data.dataset={small_compred}", "--data.train_group_by_length=true",
            "--data.max_train_pairs=64", "--data.batch_size=8", "--trainer.max_steps=12", "--trainer.max_epochs=3",
            "--trainer.val_check_interval=4", "--trainer.limit_val_batches=2", "--trainer.log_every_n_steps=1",
            "--checkpoints.every_n_steps=3"]
    full, resumed, log = _run_killed_and_resumed(args, tmp_path, kill=7)
    assert "step=6.ckpt (step 6)" in log, log[-2000:]
    assert safetensors_diff(full / "hf_model", resumed / "hf_model") <= 1e-6
    # after=7: the reward model also logs train/loss over the epoch at its end (step 7), and after a resume
    # mid-epoch that covers only the rows seen since (a documented limit); every step-level loss after it agrees
    _same_after(step_scalars(full), step_scalars(resumed), "train/loss", after=7)


@pytest.mark.parametrize("logger", ["csv", "mlflow"])
def test_a_run_with_another_logger_resumes_exactly_in_its_own_folder(logger, small_compred, tmp_path, monkeypatch):
    """Under a CSV logger with its own name, or MLflow (a local file store), whose folders are not the run's:
    killed at step 5, ``--ckpt_path last`` finds the checkpoint of step 3 in the run's folder and goes on there
    to the weights of the run that was never killed."""
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks for it to write a local file store
    logs = tmp_path / "logs"
    chosen = {"csv": ["--trainer.logger=CSVLogger", f"--trainer.logger.init_args.save_dir={logs}",
                      "--trainer.logger.init_args.name=csv"],
              "mlflow": ["--trainer.logger=MLFlowLogger", f"--trainer.logger.init_args.tracking_uri=file:{logs}"]}
    args = [*DEMO, f"--data.dataset={small_compred}", "--data.max_train_pairs=96", "--data.batch_size=16",
            "--trainer.max_steps=8", "--trainer.max_epochs=3", "--trainer.limit_val_batches=0",
            "--trainer.log_every_n_steps=1", "--checkpoints.every_n_steps=3",
            '--model.init_args.lora={"r": 4, "alpha": 8, "dropout": 0.1}', *chosen[logger]]
    full, resumed, log = _run_killed_and_resumed(args, tmp_path, kill=5)
    assert "step=3.ckpt (step 3)" in log, log[-2000:]
    assert safetensors_diff(full / "hf_model", resumed / "hf_model") <= 1e-6
    assert (resumed / "checkpoints" / LAST).resolve().name == "step=8.ckpt"
    assert [p.name for p in (tmp_path / "killed" / "lightning_logs").iterdir()] == ["version_0"]
    assert not [p for p in logs.rglob("*") if p.name in ("hf_model", "checkpoints")]
    if logger == "csv":  # its own versions: the full run's, the killed run's, the resumed part's (a new one)
        assert sorted(p.name for p in (logs / "csv").iterdir()) == ["version_0", "version_1", "version_2"]
