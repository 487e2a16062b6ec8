"""Preference metrics per community, as a torchmetrics Metric (each row once across processes under DDP)."""

from __future__ import annotations

import json
import math
from typing import Optional, Sequence

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from personalm.data.batching import community_codes
from personalm.data.compred import SPLIT_OF_PHASE
from personalm.paths import run_folder, write_text

# the figures logged for every pair, in this order (rows of the metric's state)
PAIR_METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                "logps/chosen", "logps/rejected")


class PreferenceMetrics(Metric):
    """Means of ``PAIR_METRICS`` overall and per community, plus the macro average and the worst
    community for the reward accuracy.

    State: one entry per pair (its row ``index`` in the split, its community, its figures), gathered from
    every process at ``compute``, where a row seen more than once counts once: a distributed sampler repeats
    rows to give every process as many, and those repeats must not weigh in. The figures are exact under
    DDP (not a mean of per-rank means). Without ``indices`` every pair counts.
    """

    full_state_update = False

    def __init__(self, communities: Sequence[str], with_logps: bool = True, row_groups: Optional[torch.Tensor] = None,
                 **kwargs):
        super().__init__(**kwargs)
        self.communities = list(communities)
        # each row's community number (rows of the split), moved once to the batches' device: an update given the
        # rows' indices finds their communities there, without a tensor made from host data at every step. Not a
        # buffer: DDP would broadcast it at every forward.
        self.row_groups = row_groups
        self.names = PAIR_METRICS if with_logps else tuple(n for n in PAIR_METRICS if not n.startswith("logps/"))
        self._index = {c: i for i, c in enumerate(self.communities)}
        self.add_state("rows", default=[], dist_reduce_fx="cat")  # row index in the split (-1: none given)
        self.add_state("groups", default=[], dist_reduce_fx="cat")  # community number
        self.add_state("values", default=[], dist_reduce_fx="cat")  # [n, len(PAIR_METRICS)]

    def update(self, communities: Sequence[str], losses: torch.Tensor, chosen_rewards: torch.Tensor,
               rejected_rewards: torch.Tensor, chosen_logps: Optional[torch.Tensor] = None,
               rejected_logps: Optional[torch.Tensor] = None, indices: Optional[torch.Tensor] = None) -> None:
        if indices is not None and self.row_groups is not None:
            if self.row_groups.device != indices.device:
                self.row_groups = self.row_groups.to(indices.device)
            groups = self.row_groups[indices].long()
        else:
            try:
                groups = torch.tensor([self._index[c] for c in communities], dtype=torch.long, device=self.device)
            except KeyError as err:
                raise ValueError(f"community {err.args[0]!r} is not among this metric's {self.communities}") from err
        if chosen_logps is None or rejected_logps is None:
            chosen_logps = rejected_logps = torch.zeros_like(losses)
        values = torch.stack([losses, chosen_rewards, rejected_rewards, chosen_rewards - rejected_rewards,
                              (chosen_rewards > rejected_rewards).to(losses.dtype), chosen_logps, rejected_logps], 1)
        rows = torch.full_like(groups, -1) if indices is None else indices.to(groups)
        self.rows.append(rows)
        self.groups.append(groups)
        self.values.append(values.detach().to(torch.float64))

    def _distinct(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(groups, values) with each row index once (the first seen); rows without an index all count."""
        if not len(self.rows):  # nothing on any process
            return torch.zeros(0, dtype=torch.long), torch.zeros(0, len(PAIR_METRICS), dtype=torch.float64)
        rows, groups, values = (dim_zero_cat(x) for x in (self.rows, self.groups, self.values))
        indexed = rows >= 0
        _, first = _first_occurrences(rows[indexed])
        keep = torch.cat([indexed.nonzero().flatten()[first], (~indexed).nonzero().flatten()])
        return groups[keep], values[keep]

    def compute(self) -> dict[str, float]:
        """``{"rewards/accuracies": .., "rewards/accuracies/r_<community>": .., ".../macro", ".../worst"}``, each
        figure of ``PAIR_METRICS`` so, and the pairs counted (``pairs``, ``pairs/r_<community>``).

        Communities with no pair in this run are left out (not counted as 0).
        """
        groups, values = self._distinct()
        n = len(self.communities)
        counts = torch.zeros(n, dtype=torch.float64, device=values.device).index_add_(
            0, groups, torch.ones_like(groups, dtype=torch.float64))
        sums = torch.zeros(len(PAIR_METRICS), n, dtype=torch.float64, device=values.device).index_add_(
            1, groups, values.T.contiguous())
        seen = counts > 0
        out = {}
        total = counts.sum().clamp(min=1)
        for m, name in enumerate(self.names):
            out[name] = float(sums[m].sum() / total)
            for c, community in enumerate(self.communities):
                if seen[c]:
                    out[f"{name}/r_{community}"] = float(sums[m, c] / counts[c])
        out["pairs"] = int(counts.sum())
        for c, community in enumerate(self.communities):
            if seen[c]:
                out[f"pairs/r_{community}"] = int(counts[c])
        acc = PAIR_METRICS.index("rewards/accuracies")
        per = sums[acc][seen] / counts[seen]
        if len(per):
            out["rewards/accuracies/macro"] = float(per.mean())
            out["rewards/accuracies/worst"] = float(per.min())
        return out


def wilson_interval(accuracy: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval (95% for ``z`` 1.96) of a proportion ``accuracy`` over ``n`` pairs: unlike the
    normal approximation it stays within [0, 1] and is not empty at 0% or 100%."""
    if n <= 0:
        return math.nan, math.nan
    center = (accuracy + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(accuracy * (1 - accuracy) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, center - half), min(1.0, center + half)


def _first_occurrences(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(distinct values, position of each one's first occurrence in ``rows``)."""
    distinct, inverse = torch.unique(rows, return_inverse=True)
    positions = torch.arange(len(rows), device=rows.device)
    first = torch.full((len(distinct),), len(rows), dtype=torch.long, device=rows.device)
    return distinct, first.scatter_reduce_(0, inverse, positions, reduce="amin")


def add_phase_metrics(metrics: nn.ModuleDict, splits: dict, variants: Sequence[str] = (),
                      with_logps: bool = True) -> None:
    """One ``PreferenceMetrics`` per prepared split, keyed ``<phase>_true`` (train, val, test); for val/test
    splits that carry conditioning variants, also ``<phase>_<variant>`` (e.g. ``val_none``)."""
    for phase in ("train", "val", "test"):
        split = SPLIT_OF_PHASE[phase]
        if split in splits and f"{phase}_true" not in metrics:
            names, codes = community_codes(splits[split])
            rows = torch.from_numpy(codes.astype(np.int32))
            metrics[f"{phase}_true"] = PreferenceMetrics(names, with_logps, rows)
            if phase != "train" and "none_prompt_ids" in splits[split].column_names:
                for variant in variants:
                    metrics[f"{phase}_{variant}"] = PreferenceMetrics(names, with_logps, rows)


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
    """``test_metrics.json`` in the run's folder: ``{"model", "conditioning": {variant: {metric: value}}}``,
    written atomically by the first process (the figures are already synced across processes)."""
    folder = run_folder(trainer)  # a broadcast under DDP/FSDP: every process asks, or the first one waits forever
    if not trainer.is_global_zero:
        return
    path = folder / "test_metrics.json"
    write_text(path, json.dumps({"model": model_name, "conditioning": results}, indent=2))
    rank_zero_info(f"[personalm] per-community test metrics written to {path}")
