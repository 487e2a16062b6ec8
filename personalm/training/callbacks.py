"""What every personalm module trains with (``CausalLMModule.configure_callbacks``): a tokens/s log and the
non-finite guard. Neither waits for the device inside a training step, except at logging steps."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import torch
from lightning.pytorch.callbacks import Callback, TQDMProgressBar


class NonFiniteError(RuntimeError):
    """A loss or gradient that is NaN or infinite: its update was never applied, and training stopped."""


def logging_step(trainer) -> bool:
    """This batch ended an optimizer step whose figures are written to the loggers (Lightning's rule: every
    ``log_every_n_steps`` optimizer steps, and when it stops; with gradient accumulation, its last micro-batch
    only): the one point of a training step where reading a tensor on the host is allowed."""
    return trainer._logger_connector.should_update_logs and not trainer.fit_loop.epoch_loop._should_accumulate()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def batch_tokens(batch: dict, packed: bool) -> float:
    """Tokens a batch runs through the model (no padding; packed rows: each prompt once per pair), as the collate
    function counted them on the host."""
    if packed and batch.get("packed") is not None:
        return batch["packed"]["tokens"]
    if "tokens" in batch:
        return batch["tokens"]
    return float(batch["attention_mask"].sum())  # a batch made by hand


class TokensPerSecond(Callback):
    """``train/tokens_per_sec`` of this process, at logging steps: the tokens run through the model since the
    previous logging step over the time between the two, the device synchronized at both ends (so it measures the
    kernels, not their launches; between logging steps nothing waits for the device)."""

    def __init__(self):
        self._start, self._tokens = None, 0.0

    def on_train_start(self, trainer, module) -> None:
        self._start, self._tokens = None, 0.0

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if self._start is None:
            synchronize(module.device)
            self._start = time.perf_counter()

    def on_validation_end(self, trainer, module) -> None:
        if trainer.state.fn == "fit" and self._start is not None:  # validation's time is not training's
            synchronize(module.device)
            self._start, self._tokens = time.perf_counter(), 0.0

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self._tokens += batch_tokens(batch, getattr(module, "packs", False))
        if logging_step(trainer):
            synchronize(module.device)
            now = time.perf_counter()
            module.log("train/tokens_per_sec", self._tokens / max(now - self._start, 1e-9), on_step=True,
                       on_epoch=False)
            self._start, self._tokens = now, 0.0


@dataclass
class _Step:
    """What the guard keeps of an optimizer step until it next reads its flags on the host."""

    step: int
    epoch: int
    batches: list[int]
    posts: list
    loss_flags: torch.Tensor  # [micro-batches] bool, on the device: this process's loss was non-finite
    grad_flag: torch.Tensor  # bool, on the device: this process's gradient norm was non-finite
    any_flag: torch.Tensor  # bool, on the device: some process had a non-finite loss or gradient (all-reduced)


class NonFiniteGuard(Callback):
    """A non-finite loss or gradient never reaches the weights, and training stops soon after, on every process.

    Each backward records whether its loss was finite (a flag on the device). Before the update
    (``before_update``, from ``configure_gradient_clipping``) the step's loss flags and its gradient norm (the one
    clipping computed) give one flag, summed over processes (an all-reduce of a device tensor, no wait on the host),
    and the fused AdamW skips the update on the device where it is set (``found_inf``, as a GradScaler does: weights,
    moments and the step count unchanged). The flags are read on the host only at logging steps, before a
    checkpoint is written and at the end of training; if a step was skipped, training stops there with an error
    naming the step, the batch and the post ids of the step's batches; nothing is exported and no checkpoint is
    written after it (those before it stay). Under fp16 (``16-mixed``) the GradScaler skips a step with non-finite
    gradients itself (overflows are normal there); a non-finite loss still stops training. An optimizer that cannot
    skip on the device (not fused) has its flags read at every step instead.
    """

    def __init__(self):
        self._batches: list[int] = []  # this optimizer step's batch indices (gradient accumulation: several)
        self._posts: list = []
        self._loss_flags: list[torch.Tensor] = []  # per batch of this step, on the device: was its loss non-finite?
        self._steps: list[_Step] = []  # the steps since the flags were last read on the host
        self.skip_on_device: Optional[bool] = None  # found on the first step: the optimizer takes ``found_inf``

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self._batches.append(batch_idx)
        self._posts.extend(batch.get("post_id", ()) if isinstance(batch, dict) else ())

    def on_before_backward(self, trainer, module, loss: torch.Tensor) -> None:
        self._loss_flags.append(~torch.isfinite(loss.detach()).all())

    def before_update(self, trainer, module, optimizer, grad_norm: Optional[torch.Tensor]) -> None:
        """The step's flag, summed over processes, and the update skipped on the device where it is set.
        ``grad_norm``: the norm of all gradients (None: this process's gradients are checked here)."""
        device = module.device
        loss_flags = torch.stack(self._loss_flags) if self._loss_flags else torch.zeros(1, dtype=torch.bool)
        fp16 = str(trainer.precision) == "16-mixed"  # the GradScaler checks (and skips) gradients itself
        if fp16:
            grad_flag = torch.zeros((), dtype=torch.bool, device=device)
        elif grad_norm is not None:
            grad_flag = ~torch.isfinite(grad_norm.to(device))
        else:  # FSDP1, DeepSpeed: this process's gradients (sharded ones as they are)
            grads = [p.grad for p in module.parameters() if p.grad is not None]
            grads = [g.to_local() if hasattr(g, "to_local") else g for g in grads]
            grad_flag = ~torch.isfinite(torch.stack(torch._foreach_norm(grads)).sum()).to(device) if grads else \
                torch.zeros((), dtype=torch.bool, device=device)
        flags = torch.stack([loss_flags.any().to(device), grad_flag]).float()
        total = trainer.strategy.reduce(flags.clone(), reduce_op="sum")  # DDP reduces in place
        bad = total.sum() > 0
        if not fp16:
            if self.skip_on_device is None:  # a plain fused torch optimizer reads found_inf (DeepSpeed's does not)
                self.skip_on_device = isinstance(optimizer, torch.optim.Optimizer) and \
                    bool(getattr(optimizer, "defaults", {}).get("fused"))
            if self.skip_on_device:
                optimizer.found_inf = bad.float()
        self._steps.append(_Step(trainer.global_step, trainer.current_epoch, self._batches, self._posts,
                                 loss_flags.to(device), grad_flag, bad))
        self._batches, self._posts, self._loss_flags = [], [], []
        if not self.skip_on_device and not fp16:  # an optimizer that cannot skip on the device: decide here
            self.check()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if logging_step(trainer):
            self.check()

    def on_save_checkpoint(self, trainer, module, checkpoint: dict) -> None:
        self.check()  # never a checkpoint written after a skipped step

    def on_train_end(self, trainer, module) -> None:
        self.check()  # before the module's export

    def check(self) -> None:
        """Read the flags of the steps since the last check (one host sync); raise at the first bad step."""
        steps, self._steps = self._steps, []
        if not steps:
            return
        any_bad = torch.stack([s.any_flag for s in steps])
        if not bool(any_bad.any()):
            return
        s = steps[int(any_bad.float().argmax())]
        loss_bad = s.loss_flags.cpu().tolist()
        mine = "loss" if any(loss_bad) else "gradient" if bool(s.grad_flag) else None
        what = f"a non-finite {mine} on this process" if mine else "a non-finite loss or gradient on another process"
        where = f"epoch {s.epoch}"
        if mine == "loss":
            where += f", batch {[b for b, bad in zip(s.batches, loss_bad) if bad]}"
        shown = ", ".join(str(p) for p in s.posts[:32]) + (f", ... ({len(s.posts)} in all)" if len(s.posts) > 32
                                                           else "")
        later = f"; {len(steps) - 1 - steps.index(s)} later steps ran before this check" if s is not steps[-1] else ""
        raise NonFiniteError(
            f"{what} at step {s.step} ({where}); post ids of this step's batches {s.batches} on this process: "
            f"[{shown}]. Its update was skipped on every process and training stopped{later}: nothing was exported "
            "and the checkpoints written before it are kept.")


class LoggingStepProgressBar(TQDMProgressBar):
    """Lightning's progress bar, its figures refreshed at logging steps only (the count moves every
    ``refresh_rate`` batches as before), with ``train/loss`` as ``loss``. The modules log nothing with
    ``prog_bar=True`` in training: Lightning reads every such figure on the host after every batch."""

    def get_metrics(self, trainer, pl_module) -> dict:
        items = super().get_metrics(trainer, pl_module)
        loss = trainer.callback_metrics.get("train/loss")
        if loss is not None:
            items["loss"] = f"{float(loss):.4g}"
        return items

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        bar = self.train_progress_bar
        n = batch_idx + 1
        if bar is not None and self._should_update(n, bar.total):
            bar.n = n
            bar.refresh()
            if logging_step(trainer):
                bar.set_postfix(self.get_metrics(trainer, pl_module))
