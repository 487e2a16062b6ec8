"""What SFT and DPO share: the causal LM, optimizer and schedule, throughput, generation, export."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import lightning.pytorch as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from personalm.models import LoraSettings, export_hf, load_causal_lm, load_tokenizer, upcast_trainable

HALF = ("bfloat16", "float16")


class NonFiniteError(RuntimeError):
    """A loss or gradient that is NaN or infinite: training stops on every process before the update."""


@dataclass
class GenerationSettings:
    """Generation for ``predict``; defaults are the paper's (greedy, repetition penalty 1.1)."""

    max_new_tokens: int = 1024
    do_sample: bool = False
    repetition_penalty: float = 1.1
    temperature: float = 1.0
    top_p: float = 1.0


class CausalLMModule(L.LightningModule):
    """Base for SFTModule and DPOModule (use those; this one only predicts).

    Args:
        model_name_or_path: any causal LM: Hub id, local folder (e.g. an SFT export), or
            ``embedded:tiny-llama`` (the tiny offline default).
        lr: AdamW learning rate (paper: SFT 1e-5, DPO 2e-7).
        weight_decay: AdamW weight decay.
        warmup_ratio: linear warmup as a fraction of all optimizer steps (paper SFT: 0.03)...
        warmup_steps: ...or as a number of steps (paper DPO: 1000); takes precedence when set.
        dtype: dtype of the weights training starts from (``bfloat16`` halves a frozen base's memory;
            None: as saved). Trainable weights are always held in fp32 (full fine-tuning upcasts them and
            says what that costs); ``trainer.precision: bf16-mixed`` then computes in bf16.
        eval_dtype: dtype for ``validate``/``test``/``predict`` (None: as saved, so a careful fp32 export
            is not rounded on load).
        export_dtype: dtype of the exported weights (default fp32: keeps every update; ``bfloat16`` halves
            the files but rounds small updates away; null: as held).
        lora: LoRA settings (peft); None trains all weights.
        gradient_checkpointing: trade compute for memory on large models.
        export_dir: where ``fit`` saves the trained model in Hugging Face format
            (default ``<log_dir>/hf_model``; ``""`` disables the export).
        generation: decoding settings for ``predict``.
    """

    def __init__(
        self,
        model_name_or_path: str = "embedded:tiny-llama",
        lr: float = 1e-5,
        weight_decay: float = 0.0,
        warmup_ratio: float = 0.03,
        warmup_steps: Optional[int] = None,
        dtype: Optional[str] = None,
        eval_dtype: Optional[str] = None,
        export_dtype: Optional[str] = "float32",
        lora: Optional[LoraSettings] = None,
        gradient_checkpointing: bool = False,
        export_dir: Optional[str] = None,
        generation: GenerationSettings = GenerationSettings(),
    ):
        super().__init__()
        self.save_hyperparameters()
        for key, settings in (("lora", LoraSettings), ("generation", GenerationSettings)):
            value = self.hparams[key]  # through a subclass's **kwargs a config gives a dict or Namespace
            if value is not None and not isinstance(value, settings):
                self.hparams[key] = settings(**(value if isinstance(value, dict) else vars(value)))
        self.model = None
        self.tokenizer = None
        self._step_start: Optional[float] = None
        self._bad_step: Optional[torch.Tensor] = None  # non-finite loss seen since the last optimizer step
        self._step_posts: list = []  # posts of this optimizer step's batches (named if the step goes wrong)

    def _fn(self) -> Optional[str]:
        """``fit``, ``validate``, ``test``, ``predict``, or None outside a Trainer."""
        return self._trainer.state.fn if self._trainer is not None else None

    @property
    def training_run(self) -> bool:
        return self._fn() in (None, "fit")

    @property
    def load_dtype(self) -> Optional[str]:
        """The weights' dtype on load: ``dtype`` to train, ``eval_dtype`` otherwise (None: as saved)."""
        return self.hparams.dtype if self.training_run else self.hparams.eval_dtype

    @property
    def load_lora(self) -> Optional[LoraSettings]:
        """New LoRA adapters only to train: an export evaluated or generating is used as it was saved."""
        return self.hparams.lora if self.training_run else None

    def setup(self, stage: str) -> None:
        """Refuse, before any weights load, precision settings under which training would not train."""
        if stage != "fit" or self._trainer is None:
            return
        precision, hp = str(self.trainer.precision), self.hparams
        if precision in ("bf16-true", "16-true", "bf16", "16", "half"):
            raise ValueError(f"trainer.precision {precision} casts the trainable weights to 16 bits, where AdamW's "
                             f"updates (about lr={hp.lr:g}) round away. Use trainer.precision: bf16-mixed (fp32 "
                             "trainable weights, bf16 compute), as configs/paper/*.yaml do.")
        if hp.dtype in HALF and "mixed" not in precision:
            raise ValueError(f"dtype {hp.dtype} with trainer.precision {precision}: the trainable weights are held "
                             f"in fp32 beside {hp.dtype} frozen ones, which needs autocast. Use trainer.precision: "
                             "bf16-mixed (configs/paper/*.yaml), or dtype: float32.")

    def configure_model(self) -> None:
        """Load here, not in __init__, so sharded strategies (FSDP, DeepSpeed) can wrap it."""
        if self.model is None:
            hp = self.hparams
            self.tokenizer = load_tokenizer(hp.model_name_or_path)
            self.model = self.load_model()
            if self.training_run:
                self._hold_trainable_in_fp32()
            else:
                self.model.requires_grad_(False)

    def load_model(self):
        hp = self.hparams
        return load_causal_lm(hp.model_name_or_path, self.load_dtype, self.load_lora,
                              hp.gradient_checkpointing and self.training_run)

    def _hold_trainable_in_fp32(self) -> None:
        upcast = upcast_trainable(self.model)
        if upcast:
            trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
            rank_zero_info(
                f"[personalm] {upcast / 1e6:.1f}M trainable weights loaded as {self.hparams.dtype} are held in "
                f"float32 so that small updates are not rounded away: +{upcast * 2 / 2**30:.2f} GiB for the "
                f"weights, and AdamW keeps two fp32 moments ({trainable * 8 / 2**30:.2f} GiB); the frozen "
                "weights (and a DPO reference) stay in their dtype")

    # -- optimization -----------------------------------------------------------------------------

    def configure_optimizers(self):
        from transformers import get_cosine_schedule_with_warmup

        hp = self.hparams
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=hp.lr, weight_decay=hp.weight_decay)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        warmup = hp.warmup_steps if hp.warmup_steps is not None else int(hp.warmup_ratio * total)
        scheduler = get_cosine_schedule_with_warmup(optimizer, min(warmup, total), total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_train_batch_start(self, batch, batch_idx) -> None:
        self._step_start = time.perf_counter()
        self._step_posts.extend(batch.get("post_id", ()) if isinstance(batch, dict) else ())

    # -- NaN guard ----------------------------------------------------------------------------------

    def on_before_backward(self, loss: torch.Tensor) -> None:
        bad = ~torch.isfinite(loss.detach()).all()  # a flag on the device: no synchronisation here
        self._bad_step = bad if self._bad_step is None else self._bad_step | bad

    def on_before_optimizer_step(self, optimizer) -> None:
        """Stop before a non-finite loss or gradient reaches the weights, on every process together: the
        flags are summed across processes (one small all-reduce per optimizer step), so no process is
        left waiting in a collective while the others stop."""
        loss_bad = self._bad_step if self._bad_step is not None else torch.zeros((), dtype=torch.bool)
        grad_bad = torch.zeros((), dtype=torch.bool, device=loss_bad.device)
        if str(self.trainer.precision) != "16-mixed":  # fp16's GradScaler skips overflowing steps by design
            grads = [p.grad for p in self.parameters() if p.grad is not None]
            grads = [g.to_local() if hasattr(g, "to_local") else g for g in grads]  # sharded (DTensor) grads
            if grads:
                grad_bad = ~torch.isfinite(torch.stack(torch._foreach_norm(grads)).sum()).to(loss_bad.device)
        flags = torch.stack([loss_bad, grad_bad]).float().to(self.device)
        total = self.trainer.strategy.reduce(flags.clone(), reduce_op="sum")  # DDP reduces in place
        posts, self._step_posts, self._bad_step = self._step_posts, [], None
        if float(total.sum()) > 0:
            mine = "loss" if bool(flags[0]) else "gradient" if bool(flags[1]) else None
            what = f"a non-finite {mine} on this process" if mine else "a non-finite loss or gradient on another process"
            shown = ", ".join(str(p) for p in posts[:32]) + (f", ... ({len(posts)} in all)" if len(posts) > 32 else "")
            raise NonFiniteError(
                f"{what} at step {self.trainer.global_step} (epoch {self.current_epoch}); post ids of this step's "
                f"batches on this process: [{shown}]. Training stopped on every process before the update: nothing "
                "was exported and the checkpoints written so far are kept.")

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        """Tokens per second of this process (non-padding tokens, forward + backward + step)."""
        if self._step_start is not None:
            seconds = time.perf_counter() - self._step_start
            tokens = float(batch["attention_mask"].sum())
            self.log("train/tokens_per_sec", tokens / max(seconds, 1e-9), on_step=True, on_epoch=False)

    # -- generation -------------------------------------------------------------------------------

    def predict_step(self, batch, batch_idx):
        """One response per prompt; the prompt is removed by tokens (left padding: all end together)."""
        gen = self.hparams.generation
        sampling = {"temperature": gen.temperature, "top_p": gen.top_p} if gen.do_sample else {}
        out = self.model.generate(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
            max_new_tokens=gen.max_new_tokens, do_sample=gen.do_sample,
            repetition_penalty=gen.repetition_penalty, eos_token_id=self.tokenizer.eos_token_id,
            pad_token_id=self.tokenizer.pad_token_id, **sampling)
        new_tokens = out[:, batch["input_ids"].size(1):]
        responses = self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        prompts = self.tokenizer.batch_decode(
            [ids[mask.bool()] for ids, mask in zip(batch["input_ids"], batch["attention_mask"])],
            skip_special_tokens=True)
        return [
            {"index": int(batch["index"][i]), "post_id": batch["post_id"][i],
             "community": f"r/{batch['community'][i]}", "prompt_community": batch["prompt_community"][i],
             "title": batch["title"][i], "post": batch["post"][i], "prompt": prompts[i], "response": responses[i]}
            for i in range(len(responses))
        ]

    # -- export -----------------------------------------------------------------------------------

    def on_fit_end(self) -> None:
        """Save the trained model with ``save_pretrained`` so DPO (or plain transformers) can load it."""
        if self.hparams.export_dir == "":
            return
        strategy = type(self.trainer.strategy).__name__
        if "FSDP" in strategy or "DeepSpeed" in strategy:
            rank_zero_warn(f"no Hugging Face export under {strategy}: the weights are sharded. Consolidate the "
                           "checkpoint (FSDP: state_dict_type 'full'; DeepSpeed: zero_to_fp32.py), load it into "
                           "this module on one process and call personalm.models.export_hf.")
            return
        out = self.hparams.export_dir or str(Path(self.trainer.log_dir or ".") / "hf_model")
        if self.trainer.is_global_zero:
            lora = self.hparams.lora
            self.model = export_hf(self.model, self.tokenizer, out, merge_lora=lora is None or lora.merge_on_export,
                                   dtype=self.hparams.export_dtype)
            self.on_export(Path(out))
            rank_zero_info(f"[personalm] exported the trained model (Hugging Face format) to {out}")
        self.export_path = out
        self.trainer.strategy.barrier()

    def on_export(self, folder: Path) -> None:
        """Write anything else that belongs with the exported weights (first process, before the barrier)."""
