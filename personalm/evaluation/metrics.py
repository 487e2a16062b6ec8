"""Preference metrics per community, as a torchmetrics Metric (summed across processes under DDP)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torchmetrics import Metric

from personalm.data.compred import SPLIT_OF_PHASE
from personalm.data.pairs import communities
from personalm.paths import write_text

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


def add_phase_metrics(metrics: nn.ModuleDict, splits: dict, variants: Sequence[str] = (),
                      with_logps: bool = True) -> None:
    """One ``PreferenceMetrics`` per prepared split, keyed ``<phase>_true`` (train, val, test); for val/test
    splits that carry conditioning variants, also ``<phase>_<variant>`` (e.g. ``val_none``)."""
    for phase in ("train", "val", "test"):
        split = SPLIT_OF_PHASE[phase]
        if split in splits and f"{phase}_true" not in metrics:
            names = communities(splits[split])
            metrics[f"{phase}_true"] = PreferenceMetrics(names, with_logps)
            if phase != "train" and "none_prompt_ids" in splits[split].column_names:
                for variant in variants:
                    metrics[f"{phase}_{variant}"] = PreferenceMetrics(names, with_logps)


def log_phase_metrics(module, phase: str, skip_overall: bool = False) -> dict:
    """Compute (synced across processes by torchmetrics), log and reset a phase's metrics; returns
    variant -> figures.

    Names: ``val/rewards/accuracies``, ``val/rewards/accuracies/r_<community>``, ``.../macro``,
    ``.../worst``; for the variants ``val/none/...`` and ``val/random/...``. ``skip_overall`` keeps the
    per-community, macro and worst figures only (for figures already logged every step).
    """
    results = {}
    for key, metric in module.metrics.items():
        if not key.startswith(f"{phase}_"):
            continue
        variant = key[len(phase) + 1:]
        values = metric.compute()
        metric.reset()
        if skip_overall:
            values = {k: v for k, v in values.items() if "/r_" in k or k.endswith(("/macro", "/worst"))}
        prefix = phase if variant == "true" else f"{phase}/{variant}"
        if not module.trainer.sanity_checking:
            module.log_dict({f"{prefix}/{k}": v for k, v in values.items()})
        results[variant] = values
    return results


def write_test_metrics(trainer, model_name: str, results: dict) -> None:
    """``<log_dir>/test_metrics.json``: ``{"model", "conditioning": {variant: {metric: value}}}``, written
    atomically by the first process (the figures are already synced across processes)."""
    log_dir = trainer.log_dir  # a broadcast under DDP/FSDP: every process asks, or the first one waits forever
    if not trainer.is_global_zero or not log_dir:
        return
    path = Path(log_dir) / "test_metrics.json"
    write_text(path, json.dumps({"model": model_name, "conditioning": results}, indent=2))
    rank_zero_info(f"[personalm] per-community test metrics written to {path}")
