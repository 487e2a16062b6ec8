"""The per-community preference metrics hooks DPO and the reward model share: metrics made for the prepared
splits, computed and logged at each epoch's end, ``test_metrics.json`` written after ``test``."""

from __future__ import annotations

from personalm.evaluation.metrics import add_phase_metrics, log_phase_metrics, write_test_metrics


class PhaseMetricsHooks:
    """Mixed into a LightningModule whose ``_step(batch, phase)`` updates ``self.metrics[f"{phase}_<variant>"]``.

    ``metric_variants``: conditioning variants scored in evaluation (DPO: ``none``, ``random``).
    ``metric_logps``: the metrics include policy log-probs. ``train_overall_per_step``: the overall train
    figures are logged every step, so the epoch's end logs only the per-community ones."""

    metric_variants: tuple = ()
    metric_logps: bool = True
    train_overall_per_step: bool = False

    def setup(self, stage: str) -> None:
        super().setup(stage)
        dm = self.trainer.datamodule if self.trainer is not None else None
        if dm is not None and hasattr(dm, "splits"):
            add_phase_metrics(self.metrics, dm.splits, self.metric_variants, with_logps=self.metric_logps)

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._step(batch, "test")

    def on_train_epoch_end(self) -> None:
        log_phase_metrics(self, "train", skip_overall=self.train_overall_per_step)

    def on_validation_epoch_end(self) -> None:
        log_phase_metrics(self, "val")

    def on_test_epoch_end(self) -> None:
        write_test_metrics(self.trainer, self.hparams.model_name_or_path, log_phase_metrics(self, "test"))
