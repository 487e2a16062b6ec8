"""``Checkpoints``: step and time checkpoints with ``last.ckpt``, pruned, written atomically; ``--ckpt_path
last`` finds the newest run's and logs on in its folder. (A kill and an exact resume: ``test_resume.py``.)"""

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from personalm.cli import main
from personalm.training.checkpoints import LAST, Checkpoints, last_checkpoint
from tests.helpers import DEMO, quiet


def _steps(folder: Path) -> list[int]:
    return sorted(int(p.stem.split("=")[1]) for p in folder.glob("step=*.ckpt"))


def test_time_checkpoints_are_pruned_and_last_follows_the_newest(small_compred, tmp_path):
    """every_minutes so short that every step is due, no step interval, keep 3, logging every step (the clock is
    read at logging steps): steps 3, 4, 5 remain (1 and 2 pruned), ``last.ckpt`` links to step 5; no temporary
    file is left."""
    cli = main(["fit", *DEMO, *quiet(tmp_path), f"--data.dataset={small_compred}", "--trainer.max_steps=5",
                "--trainer.limit_val_batches=0", "--checkpoints.every_n_steps=null", "--trainer.log_every_n_steps=1",
                "--checkpoints.every_minutes=1e-6", "--checkpoints.keep=3", "--model.init_args.export_dir="])
    folder = Path(cli.trainer.log_dir) / "checkpoints"
    assert _steps(folder) == [3, 4, 5]
    assert os.readlink(folder / LAST) == "step=5.ckpt"
    assert sorted(p.name for p in folder.iterdir()) == [LAST, "step=3.ckpt", "step=4.ckpt", "step=5.ckpt"]
    assert torch.load(folder / LAST, weights_only=True, map_location="cpu")["global_step"] == 5


def test_the_clock_is_read_at_logging_steps_and_never_inside_an_accumulation(small_compred, tmp_path):
    """Every step due by time, logging every 2 steps, 2 micro-batches per step: checkpoints at steps 2 and 4 (the
    logging steps) and 5 (the end), each after a whole step, so each resumes exactly."""
    cli = main(["fit", *DEMO, *quiet(tmp_path), f"--data.dataset={small_compred}", "--trainer.max_steps=5",
                "--trainer.limit_val_batches=0", "--checkpoints.every_n_steps=null", "--trainer.log_every_n_steps=2",
                "--trainer.accumulate_grad_batches=2", "--checkpoints.every_minutes=1e-6", "--checkpoints.keep=5",
                "--model.init_args.export_dir="])
    folder = Path(cli.trainer.log_dir) / "checkpoints"
    assert _steps(folder) == [2, 4, 5]
    for step in (2, 4):
        loops = torch.load(folder / f"step={step}.ckpt", weights_only=False, map_location="cpu")["loops"]
        done = loops["fit_loop"]["epoch_loop.batch_progress"]["total"]["processed"]
        assert done == 2 * step, (step, done)  # both micro-batches of each step, none of the next


def test_ckpt_path_last_goes_on_in_the_run_it_finds(small_compred, tmp_path, capsys):
    """A run of 4 steps, then ``--ckpt_path last`` with 6: it resumes at step 4 and logs into the same
    version folder (no version_1); with nothing to resume from it says so and starts at step 0. (A run that
    finished counts its epoch as done: extended, it goes on with the next epoch, so max_epochs is raised.)"""
    common = [*DEMO, *quiet(tmp_path), f"--data.dataset={small_compred}", "--trainer.limit_val_batches=0",
              "--model.init_args.export_dir=", "--trainer.max_epochs=3"]
    main(["fit", *common, "--trainer.max_steps=4"])
    capsys.readouterr()
    resumed = main(["fit", *common, "--trainer.max_steps=6", "--ckpt_path=last"])
    assert "resuming from" in capsys.readouterr().out
    assert resumed.trainer.global_step == 6 and Path(resumed.trainer.log_dir).name == "version_0"
    assert [p.name for p in (tmp_path / "lightning_logs").iterdir()] == ["version_0"]
    assert _steps(Path(resumed.trainer.log_dir) / "checkpoints") == [4, 6]

    fresh = main(["fit", *DEMO, *quiet(tmp_path / "new"), f"--data.dataset={small_compred}", "--ckpt_path=last",
                  "--trainer.max_steps=1", "--trainer.limit_val_batches=0", "--model.init_args.export_dir="])
    assert "no checkpoint under" in capsys.readouterr().out and fresh.trainer.global_step == 1


def test_last_checkpoint_takes_the_newest_version_with_a_live_link(tmp_path):
    for version, target in ((0, "step=8.ckpt"), (1, "step=2.ckpt"), (2, "step=9.ckpt")):
        folder = tmp_path / "lightning_logs" / f"version_{version}" / "checkpoints"
        folder.mkdir(parents=True)
        if version != 2:  # version 2's link points at a checkpoint that is gone
            (folder / target).write_bytes(b"x")
        os.symlink(target, folder / LAST)
    link, version = last_checkpoint(tmp_path)
    assert version == 1 and link.resolve().name == "step=2.ckpt"
    assert last_checkpoint(tmp_path / "nothing") is None


def test_a_save_that_dies_half_way_leaves_the_previous_checkpoint_in_place(tmp_path):
    """The write fails after half a file: nothing appears under the checkpoint's name, ``last.ckpt`` still
    links to the previous one, which is unchanged."""
    (tmp_path / "step=2.ckpt").write_bytes(b"good")
    os.symlink("step=2.ckpt", tmp_path / LAST)

    def dies_half_way(path, weights_only=False):
        Path(path).write_bytes(b"ha")
        raise OSError("disk full")
    trainer = SimpleNamespace(save_checkpoint=dies_half_way, global_step=4, is_global_zero=True, loggers=[],
                              strategy=SimpleNamespace(barrier=lambda *a: None))
    callback = Checkpoints(dirpath=str(tmp_path))
    with pytest.raises(OSError, match="disk full"):
        callback.save_step(trainer)
    assert not (tmp_path / "step=4.ckpt").exists()
    assert (tmp_path / LAST).read_bytes() == b"good"


def test_keep_must_leave_the_newest():
    with pytest.raises(ValueError, match="keep must be at least 1"):
        Checkpoints(keep=0)
