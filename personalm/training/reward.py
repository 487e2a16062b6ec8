"""A reward model (causal LM backbone + scalar head) trained with the Bradley-Terry loss (the judge that
uses it is ``personalm.evaluation.reward_judge.RewardJudge``).

Bradley-Terry: P(chosen preferred) = sigmoid(r_chosen - r_rejected), so the loss of a pair is
``-log sigmoid(r_chosen - r_rejected)`` (ln 2 when both rewards are equal). The community is in the
reward model's input through the same prompt template as SFT and DPO, so one model can hold every
community's taste.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from personalm.models import load_reward_model
from personalm.training.base import CausalLMModule
from personalm.training.group_robust import GroupRobustHooks, GroupRobustSettings
from personalm.training.phase_metrics import PhaseMetricsHooks


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Per-pair ``-log sigmoid(r_chosen - r_rejected)``, computed in fp32 (``logsigmoid`` is stable)."""
    return -F.logsigmoid(chosen.float() - rejected.float())


class RewardModule(GroupRobustHooks, PhaseMetricsHooks, CausalLMModule):
    """Bradley-Terry reward model on ``ComPreDDataModule(rows="preference")`` batches.

    ``model_name_or_path`` is a causal LM (its head is replaced by a new scalar head; starting from
    the SFT export is usual) or a saved reward model. Logs ``loss`` and ``rewards/accuracies`` (pair
    accuracy) overall, per community, macro and worst; ``test`` also writes ``test_metrics.json``.
    ``group_robust``: weights over communities for the Bradley-Terry loss, as DPO's
    (``personalm.training.group_robust``). Other arguments: see ``CausalLMModule``.
    """

    model_kind = "reward"
    metric_logps = False

    def __init__(self, group_robust: Optional[GroupRobustSettings] = None, **kwargs):
        super().__init__(**kwargs)
        self.metrics = nn.ModuleDict()

    @property
    def packs(self) -> bool:
        return False  # rewards come from two padded rows per pair (the packed layout is for log-probs)

    def load_model(self):
        hp = self.hparams
        return load_reward_model(hp.model_name_or_path, self.load_dtype, self.load_lora,
                                 hp.gradient_checkpointing and self.training_run,
                                 pad_token_id=self.tokenizer.pad_token_id)

    def rewards(self, seqs: dict) -> torch.Tensor:
        """One scalar per sequence (the head reads the last non-padding token)."""
        return self.model(input_ids=seqs["input_ids"], attention_mask=seqs["attention_mask"]).logits[:, 0].float()

    def _step(self, batch: dict, phase: str) -> torch.Tensor:
        r = self.rewards(batch)
        n = len(batch["community"])
        losses = bradley_terry_loss(r[:n], r[n:])
        if f"{phase}_true" in self.metrics:
            self.metrics[f"{phase}_true"].update(batch["community"], losses, r[:n].detach(), r[n:].detach(),
                                                indices=batch["index"])
        return losses

    def training_step(self, batch, batch_idx):
        losses = self._step(batch, "train")
        self.log("train/loss", losses.mean(), batch_size=len(batch["community"]))
        loss = self.preference_objective(losses, batch)
        if self.group_weights is not None:
            self.log("train/objective", loss, batch_size=len(batch["community"]))
        return loss
