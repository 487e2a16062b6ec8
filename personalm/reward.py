"""A reward model (causal LM backbone + scalar head) trained with the Bradley-Terry loss, and a judge
that uses it to say which of two responses the true community would upvote more.

Bradley-Terry: P(chosen preferred) = sigmoid(r_chosen - r_rejected), so the loss of a pair is
``-log sigmoid(r_chosen - r_rejected)`` (ln 2 when both rewards are equal). The community is in the
reward model's input through the same prompt template as SFT and DPO, so one model can hold every
community's taste.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from personalm.dpo import write_test_metrics
from personalm.encoding import encode_batch, sequences
from personalm.judge import Comparison, Verdict
from personalm.lm_module import CausalLMModule
from personalm.metrics import add_stage_metrics, log_stage_metrics
from personalm.models import load_reward_model, load_tokenizer, resolve


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Per-pair ``-log sigmoid(r_chosen - r_rejected)``, computed in fp32 (``logsigmoid`` is stable)."""
    return -F.logsigmoid(chosen.float() - rejected.float())


class RewardModule(CausalLMModule):
    """Bradley-Terry reward model on ``ComPreDDataModule(rows="preference")`` batches.

    ``model_name_or_path`` is a causal LM (its head is replaced by a new scalar head; starting from
    the SFT export is usual) or a saved reward model. Logs ``loss`` and ``rewards/accuracies`` (pair
    accuracy) overall, per community, macro and worst; ``test`` also writes ``test_metrics.json``.
    Other arguments: see ``CausalLMModule``.
    """

    model_kind = "reward"

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.metrics = nn.ModuleDict()

    def load_model(self):
        hp = self.hparams
        return load_reward_model(hp.model_name_or_path, self.load_dtype, self.load_lora,
                                 hp.gradient_checkpointing and self.training_run,
                                 pad_token_id=self.tokenizer.pad_token_id)

    def rewards(self, seqs: dict) -> torch.Tensor:
        """One scalar per sequence (the head reads the last non-padding token)."""
        return self.model(input_ids=seqs["input_ids"], attention_mask=seqs["attention_mask"]).logits[:, 0].float()

    def setup(self, stage: str) -> None:
        super().setup(stage)
        dm = self.trainer.datamodule if self.trainer is not None else None
        if dm is not None and hasattr(dm, "splits"):
            add_stage_metrics(self.metrics, dm.splits, with_logps=False)

    def _step(self, batch: dict, stage: str) -> torch.Tensor:
        r = self.rewards(batch)
        n = len(batch["community"])
        losses = bradley_terry_loss(r[:n], r[n:])
        if f"{stage}_true" in self.metrics:
            self.metrics[f"{stage}_true"].update(batch["community"], losses, r[:n].detach(), r[n:].detach())
        return losses

    def training_step(self, batch, batch_idx):
        loss = self._step(batch, "train").mean()
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["community"]))
        return loss

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._step(batch, "test")

    def predict_step(self, batch, batch_idx):
        raise NotImplementedError("a reward model does not generate; use personalm.judge with RewardJudge")

    def on_train_epoch_end(self) -> None:
        log_stage_metrics(self, "train")

    def on_validation_epoch_end(self) -> None:
        log_stage_metrics(self, "val")

    def on_test_epoch_end(self) -> None:
        write_test_metrics(self.trainer, self.hparams.model_name_or_path, log_stage_metrics(self, "test"))

class RewardJudge:
    """``personalm.judge.Judge`` backed by a trained reward model: both responses are scored in the
    prompt of the true community, the higher reward wins; within ``tie_margin`` it is a tie (the same
    text scored in two batch positions differs by float noise, ~1e-7).

    The order of A and B does not matter to a reward model (each response is scored alone), so none
    is randomised. A post whose title and template leave no room for a response gets ``None``.
    """

    def __init__(self, model_name_or_path: str, max_length: int = 1024, batch_size: int = 16,
                 tie_margin: float = 1e-4, device: Optional[str] = None,
                 tokenizer_name_or_path: Optional[str] = None):
        self.tokenizer = load_tokenizer(model_name_or_path)
        if tokenizer_name_or_path is not None:
            other = load_tokenizer(tokenizer_name_or_path)
            if other.get_vocab() != self.tokenizer.get_vocab():
                raise ValueError(f"reward model {model_name_or_path} was trained with another tokenizer than "
                                 f"{tokenizer_name_or_path}: its scores of that tokenization mean nothing")
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(resolve(model_name_or_path))
        if not any(a.endswith("ForSequenceClassification") for a in config.architectures or []) or \
                getattr(config, "num_labels", None) != 1:
            raise ValueError(f"{model_name_or_path} is not a reward model (architectures {config.architectures}, "
                             f"{config.num_labels} labels): its scalar head would be untrained")
        self.model = load_reward_model(model_name_or_path, pad_token_id=self.tokenizer.pad_token_id).eval()
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model.to(self.device)
        self.max_length, self.batch_size, self.tie_margin = max_length, batch_size, tie_margin

    @torch.no_grad()
    def scores(self, items: Sequence[Comparison]) -> list[Optional[tuple[float, float]]]:
        """(reward of A, reward of B) per item, or None when the item could not be encoded."""
        out: list[Optional[tuple[float, float]]] = []
        for start in range(0, len(items), self.batch_size):
            chunk = items[start:start + self.batch_size]
            encoded = encode_batch(self.tokenizer, [c.community for c in chunk], [c.title for c in chunk],
                                   [c.post for c in chunk], [[c.response_a for c in chunk],
                                                             [c.response_b for c in chunk]], self.max_length)
            kept = [e for e in encoded if not e.dropped]
            rewards = iter([])
            if kept:
                seqs = sequences([e.prompt_ids for e in kept] * 2,
                                 [e.response_ids[0] for e in kept] + [e.response_ids[1] for e in kept],
                                 self.tokenizer.pad_token_id)
                logits = self.model(input_ids=seqs["input_ids"].to(self.device),
                                    attention_mask=seqs["attention_mask"].to(self.device)).logits[:, 0].float().cpu()
                rewards = iter(zip(logits[:len(kept)].tolist(), logits[len(kept):].tolist()))
            out += [None if e.dropped else next(rewards) for e in encoded]
        return out

    def judge(self, items: Sequence[Comparison]) -> list[Verdict]:
        verdicts: list[Verdict] = []
        for pair in self.scores(items):
            if pair is None:
                verdicts.append(None)
            elif abs(pair[0] - pair[1]) <= self.tie_margin:
                verdicts.append("tie")
            else:
                verdicts.append("A" if pair[0] > pair[1] else "B")
        return verdicts
