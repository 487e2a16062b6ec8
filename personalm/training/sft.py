"""Supervised fine-tuning on the preferred response: the loss covers response tokens only."""

from __future__ import annotations

import torch

from personalm.training.base import CausalLMModule
from personalm.training.generation import Generates
from personalm.training.logprobs import sequence_logps


class SFTModule(Generates, CausalLMModule):
    """Completion-only cross-entropy on the chosen response (prompt and padding are labelled -100).

    Takes ``ComPreDDataModule(rows="sft")`` batches. Arguments: see ``CausalLMModule``.
    """

    def model_step(self, batch) -> torch.Tensor:
        """The mean over the batch's response tokens of -log p (fp32): from packed rows and a chunked head
        (``personalm.training.logprobs.sequence_logps``), or, with neither, transformers' own loss."""
        if "packed" not in batch and not self.hparams.logprob_chunk:
            return self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              labels=batch["labels"]).loss
        out = sequence_logps(self.model, batch, self.hparams.logprob_chunk)
        return -out.sum.sum() / out.tokens.sum().clamp(min=1)

    def training_step(self, batch, batch_idx):
        loss = self.model_step(batch)
        self.log("train/loss", loss, batch_size=batch["input_ids"].size(0))
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self.model_step(batch), prog_bar=True, sync_dist=True,
                 batch_size=batch["input_ids"].size(0))

    def test_step(self, batch, batch_idx):
        self.log("test/loss", self.model_step(batch), sync_dist=True, batch_size=batch["input_ids"].size(0))
