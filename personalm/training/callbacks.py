"""What every personalm module trains with (``CausalLMModule.configure_callbacks``): a tokens/s log and the
NaN guard."""

from __future__ import annotations

import time

import torch
from lightning.pytorch.callbacks import Callback


class NonFiniteError(RuntimeError):
    """A loss or gradient that is NaN or infinite: training stops on every process before the update."""


class TokensPerSecond(Callback):
    """``train/tokens_per_sec`` of this process: the tokens a batch runs through the model (no padding; with
    packed rows each prompt once per pair) over the wall time of its forward, backward and optimizer step."""

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        seconds = time.perf_counter() - self._start
        packed = batch.get("packed") if getattr(module, "packs", False) else None
        tokens = packed["tokens"] if packed is not None else float(batch["attention_mask"].sum())
        module.log("train/tokens_per_sec", tokens / max(seconds, 1e-9), on_step=True, on_epoch=False)


class NonFiniteGuard(Callback):
    """Stop before a non-finite loss or gradient reaches the weights, on every process together.

    Each backward records whether its loss was finite (a flag on the device: no synchronisation); before
    the optimizer step the gradients are checked too, and the two flags are summed across processes in
    one small all-reduce, so no process is left waiting in a collective while the others stop. The error
    names the step, the batch and the post ids of the step's batches; nothing is exported (``fit`` ends
    in the error) and the checkpoints already written stay.
    """

    def __init__(self):
        self._loss_flags: list[torch.Tensor] = []  # per batch of this optimizer step: was its loss non-finite?
        self._batches: list[int] = []  # this optimizer step's batch indices (gradient accumulation: several)
        self._posts: list = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self._batches.append(batch_idx)
        self._posts.extend(batch.get("post_id", ()) if isinstance(batch, dict) else ())

    def on_before_backward(self, trainer, module, loss: torch.Tensor) -> None:
        self._loss_flags.append(~torch.isfinite(loss.detach()).all())

    def on_before_optimizer_step(self, trainer, module, optimizer) -> None:
        per_batch = torch.stack(self._loss_flags) if self._loss_flags else torch.zeros(1, dtype=torch.bool)
        loss_bad = per_batch.any()
        grad_bad = torch.zeros((), dtype=torch.bool, device=loss_bad.device)
        if str(trainer.precision) != "16-mixed":  # fp16's GradScaler skips overflowing steps by design
            grads = [p.grad for p in module.parameters() if p.grad is not None]
            grads = [g.to_local() if hasattr(g, "to_local") else g for g in grads]  # sharded (DTensor) grads
            if grads:
                grad_bad = ~torch.isfinite(torch.stack(torch._foreach_norm(grads)).sum()).to(loss_bad.device)
        flags = torch.stack([loss_bad, grad_bad]).float().to(module.device)
        total = trainer.strategy.reduce(flags.clone(), reduce_op="sum")  # DDP reduces in place
        posts, batches = self._posts, self._batches
        self._posts, self._batches, self._loss_flags = [], [], []
        if float(total.sum()) > 0:
            mine = "loss" if bool(flags[0]) else "gradient" if bool(flags[1]) else None
            what = f"a non-finite {mine} on this process" if mine else \
                "a non-finite loss or gradient on another process"
            where = f"epoch {trainer.current_epoch}"
            if mine == "loss":
                where += f", batch {[b for b, bad in zip(batches, per_batch.tolist()) if bad]}"
            shown = ", ".join(str(p) for p in posts[:32]) + (f", ... ({len(posts)} in all)" if len(posts) > 32 else "")
            raise NonFiniteError(
                f"{what} at step {trainer.global_step} ({where}); post ids of this step's batches {batches} on this "
                f"process: [{shown}]. Training stopped on every process before the update: nothing was exported and "
                "the checkpoints written so far are kept.")
