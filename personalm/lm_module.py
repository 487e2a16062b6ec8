"""What SFT and DPO share: the causal LM, optimizer and schedule, throughput, generation, export."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import lightning.pytorch as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from personalm.models import LoraSettings, export_hf, load_causal_lm, load_tokenizer


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
        dtype: weights dtype on load (``bfloat16``, ``float32``; None: as saved). For mixed precision
            use ``trainer.precision`` instead.
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
        lora: Optional[LoraSettings] = None,
        gradient_checkpointing: bool = False,
        export_dir: Optional[str] = None,
        generation: GenerationSettings = GenerationSettings(),
    ):
        super().__init__()
        self.save_hyperparameters()
        self.model = None
        self.tokenizer = None
        self._step_start: Optional[float] = None

    def configure_model(self) -> None:
        """Load here, not in __init__, so sharded strategies (FSDP, DeepSpeed) can wrap it."""
        if self.model is None:
            hp = self.hparams
            self.tokenizer = load_tokenizer(hp.model_name_or_path)
            self.model = self.load_model()

    def load_model(self):
        hp = self.hparams
        return load_causal_lm(hp.model_name_or_path, hp.dtype, hp.lora, hp.gradient_checkpointing)

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
        gen = gen if isinstance(gen, GenerationSettings) else GenerationSettings(**gen)
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
            self.model = export_hf(self.model, self.tokenizer, out, merge_lora=lora is None or lora.merge_on_export)
            self.on_export(Path(out))
            rank_zero_info(f"[personalm] exported the trained model (Hugging Face format) to {out}")
        self.export_path = out
        self.trainer.strategy.barrier()

    def on_export(self, folder: Path) -> None:
        """Write anything else that belongs with the exported weights (first process, before the barrier)."""
