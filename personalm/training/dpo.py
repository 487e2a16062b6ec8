"""DPO against a frozen reference, with per-community preference metrics and conditioning sensitivity."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal, Optional

from torch import nn

from personalm.data.compred import SPLIT_OF_PHASE
from personalm.models import resolve
from personalm.training.base import CausalLMModule
from personalm.training.dpo_loss import PairLogps, PairLosses, check_dpo_args, pair_losses
from personalm.training.generation import Generates
from personalm.training.group_robust import GroupRobustHooks, GroupRobustSettings
from personalm.training.logprobs import sequence_logps
from personalm.training.phase_metrics import PhaseMetricsHooks
from personalm.training.reference import TRAINED_AGAINST, Reference, disable_dropout
from personalm.training.reference_cache import PrecomputedReference

VARIANTS = ("none", "random")  # the same pairs with no community / a wrong one (evaluation only)


class DPOModule(GroupRobustHooks, PhaseMetricsHooks, Generates, CausalLMModule):
    """Direct Preference Optimization on ``ComPreDDataModule(rows="preference")`` batches.

    Args:
        beta: strength of the KL anchor to the reference (paper: 0.1).
        loss_type: ``sigmoid`` (DPO), ``ipo`` or ``hinge``; see ``personalm.training.dpo_loss``.
        label_smoothing: conservative DPO's assumed label-noise rate e in [0, 0.5) (sigmoid only).
        sft_weight: weight of an added NLL term (per-token mean) on the chosen response, as in RPO
            (Pang et al. 2024); 0: pure DPO. It keeps the chosen responses likely, so generations stay
            fluent. ``train/loss`` stays the preference loss alone (comparable across runs); the
            minimised total is logged as ``train/objective``.
        reference: ``copy``: a frozen copy of the starting weights (the paper's). ``adapters_off``: with
            LoRA, the policy with its adapters disabled: no second model in memory; only correct when
            the SFT weights were merged into the base (an adapter-only SFT export is refused).
        reference_name_or_path: reference weights if not the policy's starting point (must share the
            tokenizer and vocabulary).
        precompute_reference: score every pair with the reference once before training, cache the
            log-probs on disk (keyed by data and reference fingerprints) and free the reference.
        reference_cache: folder for those caches (default ``$PERSONALM_CACHE/reference_logps``).
        disable_dropout: dropout off in policy and reference (recommended for DPO).
        group_robust: weights over communities for the preference loss (``personalm.training.group_robust``:
            group-robust DPO, or with ``eta: 0`` and ``start: uniform`` each community weighted by the inverse of
            its share); None: the mean over pairs. The ``sft_weight`` term stays a plain mean.
        Other arguments: see ``CausalLMModule`` (paper's DPO: lr 2e-7, cosine, 1000 warmup steps).
    """

    metric_variants = VARIANTS
    train_overall_per_step = True  # train/loss, rewards and log-probs are logged every step

    def __init__(
        self,
        beta: float = 0.1,
        loss_type: Literal["sigmoid", "ipo", "hinge"] = "sigmoid",
        label_smoothing: float = 0.0,
        sft_weight: float = 0.0,
        reference: Literal["copy", "adapters_off"] = "copy",
        reference_name_or_path: Optional[str] = None,
        precompute_reference: bool = False,
        reference_cache: Optional[str] = None,
        disable_dropout: bool = True,
        group_robust: Optional[GroupRobustSettings] = None,
        **kwargs,
    ):
        check_dpo_args(beta, loss_type, label_smoothing)  # bad settings fail before anything loads
        if reference == "adapters_off" and kwargs.get("lora") is None:
            raise ValueError("reference: adapters_off needs LoRA (the policy's adapters are what it turns off)")
        if reference == "adapters_off" and reference_name_or_path:
            raise ValueError("reference: adapters_off uses the policy's own base weights; reference_name_or_path "
                             "needs reference: copy")
        super().__init__(**kwargs)
        self.reference = Reference(self)
        self.precomputed = PrecomputedReference(reference_cache)
        self.metrics = nn.ModuleDict()

    def configure_model(self) -> None:
        hp = self.hparams
        if self.model is None and hp.reference == "adapters_off" and self.training_run and \
                (Path(resolve(hp.model_name_or_path)) / "adapter_config.json").exists():
            raise ValueError(
                f"reference: adapters_off with an adapter-only SFT export ({hp.model_name_or_path}) would use the "
                "base model before SFT as reference. Export the SFT model merged (lora.merge_on_export: true) "
                "or use reference: copy.")
        super().configure_model()
        if self._fn() != "predict":  # generating needs no reference
            self.reference.check_tokenizer(self.tokenizer)

    def prepare_model(self) -> None:
        if self.hparams.disable_dropout:
            disable_dropout(self.model)
        if self.hparams.precompute_reference:
            self.reference.note_policy(self.model)

    def pair_losses(self, batch: dict, phase: str, variant: Optional[str] = None) -> PairLosses:
        """Preference losses, rewards and policy log-probs of one batch of pairs (chosen rows, then rejected),
        under the true community or a variant's (``none``, ``random``)."""
        hp = self.hparams
        seqs = batch if variant is None else batch[variant]
        n = len(batch["community"])
        policy = PairLogps.from_sequences(sequence_logps(self.model, seqs, hp.logprob_chunk), n)
        ref = self.precomputed.lookup(SPLIT_OF_PHASE[phase], variant or "true", batch["index"], self.device)
        if ref is None:
            ref = PairLogps.from_sequences(self.reference.logprobs(seqs), n)
        return pair_losses(policy, ref, hp.beta, hp.loss_type, hp.label_smoothing)

    # -- Lightning hooks ----------------------------------------------------------------------------

    def _precompute(self, phases) -> None:
        if self.hparams.precompute_reference:
            self.precomputed.prepare(self, phases, VARIANTS)

    def on_fit_start(self) -> None:  # validation's too while the reference is loaded, unless there is none
        self._precompute(["train"] if self.trainer.limit_val_batches == 0 else ["train", "val"])

    def on_validation_start(self) -> None:
        self._precompute(["val"])

    def on_test_start(self) -> None:
        self._precompute(["test"])

    def _step(self, batch: dict, phase: str) -> PairLosses:
        out = self.pair_losses(batch, phase)
        if f"{phase}_true" in self.metrics:
            self.metrics[f"{phase}_true"].update(batch["community"], **out.for_metrics, indices=batch["index"])
        for v in VARIANTS:  # evaluation only: the same pairs with no community / a wrong one
            if phase != "train" and v in batch and f"{phase}_{v}" in self.metrics:
                self.metrics[f"{phase}_{v}"].update(batch["community"], **self.pair_losses(batch, phase, v).for_metrics,
                                                    indices=batch["index"])
        return out

    def training_step(self, batch, batch_idx):
        out = self._step(batch, "train")
        n = len(out.losses)
        self.log("train/loss", out.losses.mean(), batch_size=n)  # the mean preference loss (ln 2
        loss = self.preference_objective(out.losses, batch)  # at the start); group-robust: weighted
        if self.hparams.sft_weight:  # RPO-style: + weight * NLL (per token) of the chosen response
            nll = -out.chosen_mean_logps.mean()
            self.log("train/nll_chosen", nll, batch_size=n)
            loss = loss + self.hparams.sft_weight * nll
        if self.hparams.sft_weight or self.group_weights is not None:
            self.log("train/objective", loss, batch_size=n)
        chosen_r, rejected_r = out.chosen_rewards, out.rejected_rewards
        self.log_dict({"train/rewards/chosen": chosen_r.mean(), "train/rewards/rejected": rejected_r.mean(),
                       "train/rewards/margins": (chosen_r - rejected_r).mean(),
                       "train/rewards/accuracies": (chosen_r > rejected_r).float().mean(),
                       "train/logps/chosen": out.chosen_logps.mean(),
                       "train/logps/rejected": out.rejected_logps.mean()},
                      batch_size=n)
        return loss

    def export_extras(self) -> dict:
        """Record next to the weights which reference they were trained against, so ``validate``/``test``
        of the export measure rewards against that reference."""
        return {**super().export_extras(), TRAINED_AGAINST: json.dumps(self.reference.record(), indent=2)}
