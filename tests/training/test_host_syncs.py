"""No host synchronisation inside a training step between logging steps.

On a GPU a host sync (``.item()``, ``float()`` of a tensor, ``nonzero``, ``bincount``, a copy to the CPU, an object
broadcast) stalls the CPU until the GPU's queue drains. On a CPU nothing stalls, but the ops that would are still
called: ``HostSyncs`` records them (a ``TorchDispatchMode`` for the aten ops, wrappers for ``Tensor.cpu``/``tolist``/
``numpy`` and the strategy's object collectives) during each training batch that is not a logging step.
"""

from __future__ import annotations

import traceback
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils._python_dispatch import TorchDispatchMode

from personalm.cli import main
from tests.helpers import DEMO_DPO, quiet

aten = torch.ops.aten
SYNCING = {aten.lift_fresh.default,  # torch.tensor(host data): a copy to the device
           aten._local_scalar_dense.default, aten.nonzero.default, aten.bincount.default, aten.masked_select.default,
           aten._unique2.default, aten.unique_consecutive.default, aten.repeat_interleave.Tensor,
           aten.unique_dim.default}


REPO = str(Path(__file__).resolve().parents[2]) + "/"
LOADING = ("torch/utils/data/", "torchdata/")  # the DataLoader making the next batch on the host (its collate)
SKIP = ("torch/utils/_python_dispatch", "torch/_dynamo/", "torch/_compile", "test_host_syncs")


def _where() -> str | None:
    """Where the op was called (innermost first), or None when it is the DataLoader making the next batch."""
    stack = traceback.extract_stack()
    if any(part in f.filename for f in stack for part in LOADING):
        return None
    frames = [f for f in stack if not any(part in f.filename for part in SKIP)]
    return " <- ".join(f"{f.filename.rsplit('site-packages/', 1)[-1].replace(REPO, '')}:{f.lineno}"
                       for f in frames[-4:][::-1])


class HostSyncs(TorchDispatchMode):
    def __init__(self, found: list):
        super().__init__()
        self.found = found

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        bool_index = func is aten.index.Tensor and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else ()))
        if func in SYNCING or bool_index:
            where = _where()
            if where is not None:
                self.found.append(f"{func} at {where}")
        return func(*args, **kwargs)


RECORDS: list["RecordSyncs"] = []  # the callbacks the CLI made (it builds them from their class path)


class RecordSyncs(Callback):
    """Records host syncs of every training batch that is not a logging step (nor the first)."""

    def __init__(self):
        self.found: list[str] = []
        self.batches = 0
        RECORDS.append(self)
        self._mode = None
        self._patched = []

    def _logging(self, trainer) -> bool:
        return (trainer.fit_loop.epoch_loop._batches_that_stepped + 1) % trainer.log_every_n_steps == 0

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self._stop()  # the previous batch's window ends: its step, callbacks, checkpoints and the next batch's fetch
        if batch_idx == 0 or self._logging(trainer):
            return
        self.batches += 1
        here = f"batch {batch_idx}"
        found = self.found

        def wrap(owner, name):
            original = getattr(owner, name)

            def recorded(*a, **k):
                where = _where()
                if where is not None:
                    found.append(f"{here}: {owner.__name__ if isinstance(owner, type) else type(owner).__name__}."
                                 f"{name} at {where}")
                return original(*a, **k)
            setattr(owner, name, recorded)
            self._patched.append((owner, name, original))

        for name in ("cpu", "tolist", "numpy"):
            wrap(torch.Tensor, name)
        wrap(trainer.strategy, "broadcast")
        wrap(trainer.strategy, "barrier")
        self._mode = HostSyncs(found)
        self._mode.__enter__()

    def on_train_end(self, trainer, module):
        self._stop()

    def _stop(self):
        if self._mode is not None:
            self._mode.__exit__(None, None, None)
            self._mode = None
        for owner, name, original in reversed(self._patched):
            if isinstance(owner, type):
                setattr(owner, name, original)
            else:
                delattr(owner, name)  # back to the class's method
        self._patched = []


@pytest.mark.parametrize("how", [[], ["--model.init_args.precompute_reference=true"],
                                 ["--data.pair_packing=none"],
                                 ["--model.init_args.precompute_reference=true", "--data.pair_packing=none"]],
                         ids=["live-packed", "precomputed-packed", "live-padded", "precomputed-padded"])
def test_dpo_steps_between_logging_steps_do_not_sync_the_host(how, sft_run, train_compred, tmp_path):
    """8 optimizer steps of 2 micro-batches, logging every 4 steps, a checkpoint every 4 steps (with the log) and a
    time trigger that is always due: the micro-batches of steps that do not log call no syncing op."""
    sft, _ = sft_run
    RECORDS.clear()
    main(["fit", *DEMO_DPO, *quiet(tmp_path), f"--data.dataset={train_compred}",
          f"--model.init_args.model_name_or_path={sft.model.export_path}", "--trainer.max_steps=8",
          "--trainer.log_every_n_steps=4", "--trainer.accumulate_grad_batches=2", "--trainer.limit_val_batches=0",
          "--checkpoints.every_n_steps=4", "--checkpoints.every_minutes=0.00001",
          '--trainer.callbacks+={"class_path": "tests.training.test_host_syncs.RecordSyncs"}', *how])
    (record,) = RECORDS
    assert record.batches >= 8
    assert not record.found, "\n".join(sorted(set(f.split(": ", 1)[-1] for f in record.found)))
