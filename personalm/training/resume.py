"""What a checkpoint needs beyond Lightning's own for a resumed run to be the run that was never killed.

- every RNG (torch, CUDA, numpy, Python) of every process: Lightning checkpoints carry none, and dropout,
  LoRA dropout and the next epoch's shuffle draw from them; restored when training starts, after setup;
- a LoRA run's checkpoint holds the trainable weights (and optimizer state) only, not a second copy of the
  frozen base, which on resume is taken from the base model loaded as at the start;
- the schedule's length counted from the data, not ``trainer.estimated_stepping_batches``: read in
  ``configure_optimizers`` while ``max_epochs`` is set, it silently drops the data loader's saved position
  (Lightning issue 20550).
The position in the data is the training loader's own (a ``StatefulDataLoader``, whose state Lightning saves,
over a sampler seeded by (seed, epoch) alone: ``ComPreDDataModule.train_dataloader``).
"""

from __future__ import annotations

import math
import random

import numpy as np
import torch

from personalm.training.sharding import is_sharded

RNG = "personalm_rng"  # per process, in rank order
FROZEN_OMITTED = "personalm_frozen_omitted"


def planned_steps(trainer) -> int:
    """Optimizer steps the run will take: ``max_steps``, else epochs x steps per epoch from the training split."""
    if trainer.max_steps and trainer.max_steps > 0:
        return trainer.max_steps
    dm = trainer.datamodule
    splits = getattr(dm, "splits", {})
    if "train_pref" not in splits or not trainer.max_epochs or trainer.max_epochs < 0:
        return max(int(trainer.estimated_stepping_batches), 1)  # not our DataModule: Lightning's estimate
    per_process = math.ceil(len(splits["train_pref"]) / max(trainer.world_size, 1))
    batches = math.ceil(per_process / dm.hparams.batch_size)
    limit = trainer.limit_train_batches
    if isinstance(limit, float):
        batches = int(batches * limit) if limit < 1.0 else batches
    elif limit is not None:
        batches = min(batches, int(limit))
    return max(math.ceil(batches / trainer.accumulate_grad_batches) * trainer.max_epochs, 1)


def rng_states() -> dict:
    """Every RNG's state as tensors, ints and strings only, so ``torch.load(weights_only=True)`` reads it."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    states = {"torch": torch.get_rng_state(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos,
                                                          has_gauss, cached], "python": list(random.getstate())}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_state(module, checkpoint: dict) -> None:
    """Add every process's RNG states; keep only the trainable weights of a model with frozen ones."""
    states = rng_states()
    if torch.distributed.is_available() and torch.distributed.is_initialized() and module.trainer.world_size > 1:
        gathered = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, states)  # every process saves (dumps) the checkpoint
    else:
        gathered = [states]
    checkpoint[RNG] = gathered
    frozen = [n for n, p in module.model.named_parameters() if not p.requires_grad]
    if frozen and not is_sharded(module.model):  # a sharded checkpoint keeps every process's shard of all
        trainable = {f"model.{n}" for n, p in module.model.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        checkpoint[FROZEN_OMITTED] = True


def restore_state(module, checkpoint: dict) -> None:
    """Before the weights load: put the frozen weights (as loaded from the base) back in; keep the RNG
    states for ``restore_rng`` at the start of training."""
    if checkpoint.get(FROZEN_OMITTED):
        checkpoint["state_dict"] = {**module.state_dict(), **checkpoint["state_dict"]}
    states = checkpoint.get(RNG)
    if states:
        rank = module.trainer.global_rank if module._trainer is not None else 0
        module._rng_to_restore = states[rank] if rank < len(states) else states[0]


def restore_rng(module) -> None:
    """Restore the RNG states kept from the checkpoint (at the start of training: after setup and the
    sanity check, which draw their own)."""
    states = getattr(module, "_rng_to_restore", None)
    if states is not None:
        set_rng_states(states)
        module._rng_to_restore = None
