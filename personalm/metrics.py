"""Preference metrics per community, as a torchmetrics Metric (summed across processes under DDP)."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn
from torchmetrics import Metric

STAGE_SPLIT = {"train": "train_pref", "val": "validation_pref", "test": "test_pref"}

# the figures logged for every pair, in this order (rows of the metric's state)
PAIR_METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                "logps/chosen", "logps/rejected")


class PreferenceMetrics(Metric):
    """Means of ``PAIR_METRICS`` overall and per community, plus the macro average and the worst
    community for the reward accuracy.

    State: per-community sums [M, C] and pair counts [C], reduced with ``sum`` across processes, so
    the figures are exact under DDP (not a mean of per-rank means).
    """

    full_state_update = False

    def __init__(self, communities: Sequence[str], with_logps: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.communities = list(communities)
        self.names = PAIR_METRICS if with_logps else PAIR_METRICS[:5]  # a reward model has no log-probs
        self._index = {c: i for i, c in enumerate(self.communities)}
        self.add_state("sums", torch.zeros(len(PAIR_METRICS), len(self.communities), dtype=torch.float64),
                       dist_reduce_fx="sum")
        self.add_state("counts", torch.zeros(len(self.communities), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, communities: Sequence[str], losses: torch.Tensor, chosen_rewards: torch.Tensor,
               rejected_rewards: torch.Tensor, chosen_logps: Optional[torch.Tensor] = None,
               rejected_logps: Optional[torch.Tensor] = None) -> None:
        try:
            groups = torch.tensor([self._index[c] for c in communities], dtype=torch.long, device=self.counts.device)
        except KeyError as err:
            raise ValueError(f"community {err.args[0]!r} is not among this metric's {self.communities}") from err
        if chosen_logps is None or rejected_logps is None:
            chosen_logps = rejected_logps = torch.zeros_like(losses)
        values = torch.stack([losses, chosen_rewards, rejected_rewards, chosen_rewards - rejected_rewards,
                              (chosen_rewards > rejected_rewards).to(losses.dtype), chosen_logps, rejected_logps])
        self.sums.index_add_(1, groups, values.detach().to(self.sums.dtype))
        self.counts.index_add_(0, groups, torch.ones_like(groups, dtype=self.counts.dtype))

    def compute(self) -> dict[str, float]:
        """``{"rewards/accuracies": .., "rewards/accuracies/r_<community>": .., ".../macro", ".../worst"}``.

        Communities with no pair in this run are left out (not counted as 0).
        """
        seen = self.counts > 0
        out = {}
        total = self.counts.sum().clamp(min=1)
        for m, name in enumerate(self.names):
            out[name] = float(self.sums[m].sum() / total)
            for c, community in enumerate(self.communities):
                if seen[c]:
                    out[f"{name}/r_{community}"] = float(self.sums[m, c] / self.counts[c])
        acc = PAIR_METRICS.index("rewards/accuracies")
        per = self.sums[acc][seen] / self.counts[seen]
        if len(per):
            out["rewards/accuracies/macro"] = float(per.mean())
            out["rewards/accuracies/worst"] = float(per.min())
        return out


def add_stage_metrics(metrics: nn.ModuleDict, splits: dict, variants: Sequence[str] = (),
                      with_logps: bool = True) -> None:
    """One ``PreferenceMetrics`` per prepared split, keyed ``<stage>_true``; for val/test splits that carry
    conditioning variants, also ``<stage>_<variant>`` (e.g. ``val_none``)."""
    from personalm.compred import communities

    for stage, split in STAGE_SPLIT.items():
        if split in splits and f"{stage}_true" not in metrics:
            names = communities(splits[split])
            metrics[f"{stage}_true"] = PreferenceMetrics(names, with_logps)
            if stage != "train" and "none_prompt_ids" in splits[split].column_names:
                for variant in variants:
                    metrics[f"{stage}_{variant}"] = PreferenceMetrics(names, with_logps)


def log_stage_metrics(module, stage: str, skip_overall: bool = False) -> dict:
    """Compute (synced across processes by torchmetrics), log and reset a stage's metrics; returns
    variant -> figures.

    Names: ``val/rewards/accuracies``, ``val/rewards/accuracies/r_<community>``, ``.../macro``,
    ``.../worst``; for the variants ``val/none/...`` and ``val/random/...``. ``skip_overall`` keeps the
    per-community, macro and worst figures only (for figures already logged every step).
    """
    results = {}
    for key, metric in module.metrics.items():
        if not key.startswith(f"{stage}_"):
            continue
        variant = key[len(stage) + 1:]
        values = metric.compute()
        metric.reset()
        if skip_overall:
            values = {k: v for k, v in values.items() if "/r_" in k or k.endswith(("/macro", "/worst"))}
        prefix = stage if variant == "true" else f"{stage}/{variant}"
        if not module.trainer.sanity_checking:
            module.log_dict({f"{prefix}/{k}": v for k, v in values.items()})
        results[variant] = values
    return results
