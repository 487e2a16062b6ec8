"""Checkpoints that make a kill cheap, and resuming into the run that was killed.

``Checkpoints`` writes ``step=<N>.ckpt`` every ``every_n_steps`` optimizer steps and every ``every_minutes``
minutes (whichever comes first; the clock is read at logging steps, so with ``log_every_n_steps`` 10 a time
checkpoint comes at most 10 steps late), at the end of training, and on SIGTERM or SIGUSR1 (pre-emption, SLURM's
warning) before the process exits; ``last.ckpt`` is a link to the newest, and the newest ``keep`` are kept.
The best by validation (``monitor``, default ``val/loss``) is kept as ``best-step=<N>.ckpt``. Every
checkpoint is written under a temporary name and renamed into place, so a kill never leaves half a file
under a name a resume reads. Under SLURM with auto-requeue, Lightning handles SIGUSR1 itself (a checkpoint,
then ``scontrol requeue``), as its documentation describes.

Unless given a ``dirpath``, the checkpoints go to ``checkpoints/`` in the run's own folder
(``personalm.paths.run_folder``: ``lightning_logs/version_<N>``, whatever the logger), not Lightning's
``<save_dir>/<name>/<version>`` of the first logger. ``last_checkpoint`` finds what ``--ckpt_path last``
resumes: the newest ``last.ckpt`` of the run folders.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from pathlib import Path
from typing import Optional
from weakref import proxy

from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

from personalm.paths import replace_dir, run_folder, runs, version, write_atomically
from personalm.training.callbacks import logging_step

LAST = "last.ckpt"


def last_checkpoint(root: Path) -> Optional[tuple[Path, int]]:
    """The newest ``lightning_logs/version_<N>/checkpoints/last.ckpt`` under a run's root, with its N."""
    for folder in reversed(runs(root)):
        link = folder / "checkpoints" / LAST
        if link.exists():  # a link whose checkpoint is gone does not count
            return link, version(folder)
    return None


class Checkpoints(ModelCheckpoint):
    """Step and time checkpoints with ``last.ckpt``, written atomically; the best by validation; one before
    a SIGTERM/SIGUSR1 exit.

    Args:
        every_n_steps: a checkpoint every this many optimizer steps (None: not by steps).
        every_minutes: a checkpoint when this many minutes passed since the last one (None: not by time).
        keep: how many step checkpoints to keep (the newest; ``last.ckpt`` always points at one of them).
        monitor: the validation metric of the best checkpoint (None: none kept).
        mode: ``min`` or ``max`` for ``monitor``.
    """

    def __init__(self, every_n_steps: Optional[int] = 500, every_minutes: Optional[float] = 30.0, keep: int = 2,
                 monitor: Optional[str] = "val/loss", mode: str = "min", dirpath: Optional[str] = None):
        if keep < 1:
            raise ValueError(f"keep must be at least 1 (the checkpoint last.ckpt points at), got {keep}")
        super().__init__(dirpath=dirpath, filename="best-step={step}", monitor=monitor, mode=mode,
                         save_top_k=1 if monitor else 0, auto_insert_metric_name=False, save_on_train_epoch_end=False,
                         enable_version_counter=False)
        self.every_n_steps, self.every_minutes, self.keep = every_n_steps, every_minutes, keep
        self._since = time.monotonic()
        self._saved_step: Optional[int] = None
        self._pending = False  # due on an epoch's last batch, saved after the next step

    # -- when ---------------------------------------------------------------------------------------

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.dirpath is None:  # the run's folder, whatever the logger (every process asks: a broadcast)
            self.dirpath = str(run_folder(trainer) / "checkpoints")
        super().setup(trainer, pl_module, stage)
        env = trainer._accelerator_connector.cluster_environment
        if stage == "fit" and hasattr(signal, "SIGUSR1") and not (
                isinstance(env, SLURMEnvironment) and env.auto_requeue):
            # outside SLURM's auto-requeue SIGUSR1 would end the process at once: make it a SIGTERM, which
            # Lightning turns into a clean stop on every process (and ``on_exception`` saves first)
            signal.signal(signal.SIGUSR1, lambda signum, frame: os.kill(os.getpid(), signal.SIGTERM))

    def on_train_start(self, trainer, pl_module) -> None:
        self._since = time.monotonic()
        self._saved_step = trainer.global_step  # a resumed run starts at a checkpoint it does not rewrite
        self._seen_step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        stepped, self._seen_step = step != self._seen_step, step
        if not stepped or step == self._saved_step or not self._may_save(trainer):
            return  # inside a gradient accumulation, or nothing to save in this phase
        due = self._pending or (bool(self.every_n_steps) and step % self.every_n_steps == 0)
        if self.every_minutes and not due and logging_step(trainer):
            # the clock is read at logging steps only: the first process's decides for all (an object broadcast,
            # which waits for every process), so the steps between logging steps wait for nothing
            late = time.monotonic() - self._since >= 60 * self.every_minutes
            due = trainer.strategy.broadcast(late)
        if due and trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            # a checkpoint on an epoch's last batch resumes into the next epoch with the loader's position of
            # this one (and skips it): take it one step later, in the next epoch
            self._pending = True
        elif due:
            self.save_step(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.global_step != self._saved_step and self._may_save(trainer):
            self.save_step(trainer)

    @staticmethod
    def _may_save(trainer) -> bool:
        return trainer.state.fn == "fit" and not trainer.sanity_checking and not trainer.fast_dev_run

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        """A SIGTERM (or SIGUSR1) stop: save where training stands, on every process together (Lightning
        raised the stop on all of them at the same batch)."""
        if isinstance(exception, SIGTERMException) and trainer.global_step != self._saved_step \
                and self._may_save(trainer):
            self.save_step(trainer)
            rank_zero_info(f"[personalm] stopped by a signal at step {trainer.global_step}: checkpoint saved, "
                           "resume with --ckpt_path last")

    # -- how ----------------------------------------------------------------------------------------

    def save_step(self, trainer) -> None:
        """``step=<N>.ckpt``, then ``last.ckpt`` pointing at it, then the oldest step checkpoints pruned."""
        path = os.path.join(self.dirpath, f"step={trainer.global_step}.ckpt")
        self._save_checkpoint(trainer, path)
        if trainer.is_global_zero:
            # the link moves in one step: a resume never finds it missing
            write_atomically(Path(self.dirpath) / LAST, lambda tmp: os.symlink(Path(path).name, tmp))
            self._prune(Path(path))
        trainer.strategy.barrier()
        self._saved_step, self._since, self._pending = trainer.global_step, time.monotonic(), False

    def _prune(self, newest: Path) -> None:
        steps = sorted(Path(self.dirpath).glob("step=*.ckpt"), key=lambda p: int(p.stem.split("=")[1]))
        for old in steps[:-self.keep]:
            if old != newest and str(old) != self.best_model_path:
                _remove(old)

    def _save_checkpoint(self, trainer, filepath: str) -> None:
        """Write under a temporary name, then rename into place (a file, or an FSDP2 checkpoint folder)."""
        final = Path(filepath)
        tmp = final.with_name(f".{final.name}.partial")
        trainer.save_checkpoint(tmp, self.save_weights_only)
        trainer.strategy.barrier()  # every process's shard is written
        if trainer.is_global_zero:
            if tmp.is_dir():
                replace_dir(tmp, final)
            else:
                os.replace(tmp, final)
        trainer.strategy.barrier()
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
