"""What every personalm module shares: loading (fp32 trainable weights, precision that trains, FSDP2), the
optimizer and schedule, the callbacks (tokens/s, NaN guard) and the Hugging Face export."""

from __future__ import annotations

from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Optional

import lightning.pytorch as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from personalm.models import (
    LoraSettings,
    add_lora,
    export_hf,
    load_causal_lm,
    load_tokenizer,
)
from personalm.paths import run_folder
from personalm.training.attention import use_attention
from personalm.training.callbacks import NonFiniteGuard, TokensPerSecond, logging_step
from personalm.training.decoding import GenerationSettings
from personalm.training.logprobs import runs_packed_rows
from personalm.training.precision import TrainingPrecision
from personalm.training.resume import planned_steps, restore_rng, restore_state, save_state
from personalm.training.sharded_loading import EmptyModel, empty_for_shards, fill_shards
from personalm.training.sharding import data_parallel_mesh, full_state_dict, is_sharded, shard


class CausalLMModule(TrainingPrecision, L.LightningModule):
    """Base of SFTModule, DPOModule and RewardModule (use those).

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
        eval_dtype: dtype of the weights for ``validate``/``test``/``predict`` (and a DPO export's reference there).
            None: the dtype the run computes in: ``bfloat16`` under ``bf16-mixed`` (a 7B model in 13.5 GB instead
            of 27, and no per-op cast of fp32 weights, which autocast caches only for weights that train), as saved
            under ``32-true``. ``float32`` under ``bf16-mixed`` keeps fp32 weights and casts each op's to bf16.
        export_dtype: dtype of the exported weights (default fp32: keeps every update; ``bfloat16`` halves
            the files but rounds small updates away; null: as held).
        lora: LoRA settings (peft); None trains all weights.
        gradient_checkpointing: trade compute for memory on large models.
        export_dir: where ``fit`` saves the trained model in Hugging Face format
            (default ``hf_model`` in the run's folder, ``personalm.paths.run_folder``; ``""`` disables the export).
        generation: decoding settings for ``predict``.
        logprob_chunk: response positions per chunk of the LM head when scoring log-probs (SFT and DPO):
            the logits of one chunk at a time, recomputed in backward, never ``[tokens, vocab]`` at once.
            None: the head over all positions at once (the old path, also for packed rows).
        attention: the model's attention implementation: None keeps the loaded one (``sdpa``; packed rows then run
            a fused SDPA kernel on CUDA, a fallback to math is warned); ``flex_attention``: packed rows under a
            BlockMask (personalm/training/attention.py); it trains on CUDA only (no backward on a CPU in torch 2.13).
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
        logprob_chunk: Optional[int] = 1024,
        attention: Optional[str] = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        for key in ("lora", "generation", "group_robust"):  # plain data in checkpoints and hparams.yaml (a
            value = self.hparams.get(key)  # config, or a subclass's **kwargs, may also give a dict or Namespace)
            if value is not None and not isinstance(value, dict):
                self.hparams[key] = asdict(value) if is_dataclass(value) else dict(vars(value))
        self.model = None
        self.tokenizer = None

    @property
    def packs(self) -> bool:
        """Packed rows of a batch (``batch["packed"]``) are what this model runs (a plain head, a 4D mask)."""
        return self.model is not None and runs_packed_rows(self.model)

    @property
    def lora_settings(self) -> Optional[LoraSettings]:
        return None if self.hparams.lora is None else LoraSettings(**self.hparams.lora)

    @property
    def generation_settings(self) -> GenerationSettings:
        return GenerationSettings(**(self.hparams.generation or {}))

    def _fn(self) -> Optional[str]:
        """``fit``, ``validate``, ``test``, ``predict``, or None outside a Trainer."""
        return self._trainer.state.fn if self._trainer is not None else None

    @property
    def training_run(self) -> bool:
        return self._fn() in (None, "fit")

    @property
    def load_dtype(self) -> Optional[str]:
        """The weights' dtype on load: ``dtype`` to train; ``eval_dtype`` otherwise, by default the compute dtype
        (None: as saved)."""
        if self.training_run:
            return self.hparams.dtype
        return self.hparams.eval_dtype or self.compute_dtype

    @property
    def load_lora(self) -> Optional[LoraSettings]:
        """New LoRA adapters only to train: an export evaluated or generating is used as it was saved (a
        LoRA run's checkpoint gets its adapters back in ``on_load_checkpoint``)."""
        return self.lora_settings if self.training_run else None

    model_kind = "causal"  # what add_lora wraps: a causal LM (the reward model: "reward")

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """``validate``/``test``/``predict --ckpt_path`` of a LoRA run: the checkpoint holds adapter weights the
        model was loaded without (outside ``fit`` no adapters are added): add them before the weights load.
        Then the frozen weights a LoRA checkpoint leaves out, and the RNG states to restore."""
        lora = self.lora_settings
        if lora is not None and not hasattr(self.model, "peft_config") and any(
                "lora_" in k for k in checkpoint.get("state_dict", {})):
            if is_sharded(self.model):
                raise ValueError("a LoRA run's checkpoint outside fit under FSDP2: export it first "
                                 "(python -m personalm export --ckpt_path ...) and evaluate the export")
            self.model = add_lora(self.model, lora, self.model_kind).to(self.device).requires_grad_(False)
        restore_state(self, checkpoint)

    def setup(self, stage: str) -> None:
        if stage == "fit" and self._trainer is not None:
            self.check_training_precision(str(self.trainer.precision))

    def configure_model(self) -> None:
        """Load here, not in __init__, so sharded strategies (FSDP, DeepSpeed) can wrap it; under FSDP2 shard
        it here (one unit per decoder layer)."""
        if self.model is not None:
            return
        self.tokenizer = load_tokenizer(self.hparams.model_name_or_path)
        mesh = data_parallel_mesh(self)
        empty = self.empty_model() if mesh is not None else None  # FSDP2: only this process's shards in memory
        self.model = empty.model if empty is not None else self.load_model()
        use_attention(self.model, self.hparams.get("attention"))
        if self.training_run:
            self._hold_trainable_in_fp32(self.model, say=True)
            self._check_loaded_precision()
        else:
            self.model.requires_grad_(False)
        self.prepare_model()
        if mesh is not None:
            shard(self.model, mesh, self.bf16_compute)
        if empty is not None:
            fill_shards(self.model, empty.files, self.shard_device)
            rank_zero_info(f"[personalm] {self.hparams.model_name_or_path} loaded straight into the shards (FSDP2)")

    @property
    def shard_device(self) -> torch.device:
        return self.trainer.strategy.root_device if self._trainer is not None else self.device

    def empty_model(self) -> Optional[EmptyModel]:
        """Under FSDP2: the model on the meta device, to be filled shard by shard from its safetensors files
        (``personalm.training.sharded_loading``); None where it loads whole (not a causal LM folder of full
        safetensors weights, or new LoRA adapters to add)."""
        hp = self.hparams
        if self.load_lora is not None or type(self).load_model is not CausalLMModule.load_model:
            return None
        return empty_for_shards(hp.model_name_or_path, self.load_dtype, hp.gradient_checkpointing and self.training_run)

    def prepare_model(self) -> None:
        """What a subclass does to the loaded model before it is sharded (DPO: dropout off)."""

    def load_model(self):
        hp = self.hparams
        return load_causal_lm(hp.model_name_or_path, self.load_dtype, self.load_lora,
                              hp.gradient_checkpointing and self.training_run)

    # -- optimization -----------------------------------------------------------------------------

    def configure_optimizers(self):
        from transformers import get_cosine_schedule_with_warmup

        hp = self.hparams
        params = [p for p in self.parameters() if p.requires_grad]
        # fused: one kernel per step, and it skips a non-finite step on the device (``NonFiniteGuard``); not under
        # fp16, where Lightning would leave the gradients scaled for it and clipping would see them so
        fused = str(self.trainer.precision) != "16-mixed"
        optimizer = torch.optim.AdamW(params, lr=hp.lr, weight_decay=hp.weight_decay, fused=fused)
        total = planned_steps(self.trainer)
        warmup = hp.warmup_steps if hp.warmup_steps is not None else int(hp.warmup_ratio * total)
        scheduler = get_cosine_schedule_with_warmup(optimizer, min(warmup, total), total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_callbacks(self):
        self.guard = NonFiniteGuard()
        return [TokensPerSecond(), self.guard]

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Clip (by norm, or by value as Lightning does), keep the gradient norm that clipping computed (logged
        as ``train/grad_norm``) and hand it to the guard, which skips a non-finite update on the device."""
        from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

        if isinstance(self.trainer.strategy, (FSDPStrategy, DeepSpeedStrategy)):  # they clip their own shards
            if gradient_clip_val:
                self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
            norm = None  # the guard checks this process's gradients itself
        else:
            params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            if gradient_clip_val and gradient_clip_algorithm in (None, "norm"):
                norm = torch.nn.utils.clip_grad_norm_(params, gradient_clip_val, foreach=True)
            else:  # the norm before clipping by value (which would hide an infinite gradient)
                norm = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True) if params else None
                if gradient_clip_val:
                    self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
            if norm is not None and hasattr(norm, "full_tensor"):  # sharded gradients (FSDP2): the norm of them all
                norm = norm.full_tensor()
        self._grad_norm = norm  # logged at the next logging step (``on_train_batch_end``)
        guard = getattr(self, "guard", None)
        if guard is not None:
            guard.before_update(self.trainer, self, optimizer, norm)

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        norm = getattr(self, "_grad_norm", None)
        if norm is not None and logging_step(self.trainer):
            self.log("train/grad_norm", norm, on_step=True, on_epoch=False)  # before clipping

    # -- checkpoints ----------------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        save_state(self, checkpoint)  # every RNG; a LoRA run keeps its trainable weights only

    def on_train_start(self) -> None:
        restore_rng(self)  # a resumed run draws the random numbers the killed run would have drawn next

    # -- export -----------------------------------------------------------------------------------

    def on_train_end(self) -> None:
        """Save the trained model with ``save_pretrained`` so DPO (or plain transformers) can load it: under
        every strategy, the full weights gathered to the first process (FSDP2, FSDP1, DeepSpeed) or taken as
        they are (one device, DDP). Here, not in ``on_fit_end``: that runs after the strategy's teardown. A
        run that ends in an error (a NaN, a kill) exports nothing."""
        if self.hparams.export_dir == "":
            return
        out = Path(self.trainer.strategy.broadcast(
            str(self.hparams.export_dir or run_folder(self.trainer) / "hf_model")))
        state = full_state_dict(self)  # a collective: every process takes part
        error = None
        if self.trainer.is_global_zero:
            try:
                self.export(out, state)
                rank_zero_info(f"[personalm] exported the trained model (Hugging Face format) to {out}")
            except Exception as err:  # noqa: BLE001  (re-raised below, on every process)
                error = err
        if self.trainer.strategy.broadcast(error is not None):  # the others would wait at a barrier forever
            raise error if error is not None else RuntimeError(f"the export to {out} failed on the first process")
        self.export_path = str(out)
        self.trainer.strategy.barrier()

    def export(self, out: Path, state: Optional[dict] = None) -> None:
        """Write the Hugging Face export of ``self.model`` (merging LoRA in place), or, with ``state`` (full
        weights gathered from a sharded run), of a fresh copy of the model loaded with them."""
        lora = self.lora_settings
        if state is None:
            model = self.model.cpu()  # merging upcasts layers to fp32: on the GPU that could run out of memory
        else:
            model = self.load_model()
            self._hold_trainable_in_fp32(model)
            model.load_state_dict(state)
        merged = export_hf(model, self.tokenizer, str(out), merge_lora=lora is None or lora.merge_on_export,
                           dtype=self.hparams.export_dtype, extra_files=self.export_extras())
        if state is None:
            self.model = merged

    def export_extras(self) -> dict:
        """Files (name -> text) that belong with the exported weights (DPO: the reference it was trained
        against); written into the export before it moves into place."""
        return {}
