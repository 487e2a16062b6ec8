"""Group-robust preference optimization over communities (Ramesh et al. 2024, "Group Robust Preference Optimization
in Reward-free RLHF", arXiv 2405.20304; reference code rsshyam/Group-robust-preference-optimization,
``compute_robust_loss``), for DPO and the reward model.

Plain DPO minimizes the mean loss over the pairs it sees, so a community with a few percent of them barely moves it.
Group-robust DPO keeps weights alpha over communities and minimizes sum_g alpha_g L_g, moving alpha towards the
communities whose loss is high (mirror ascent):

    alpha_g <- alpha_g * exp(eta * L_g), then normalized to sum 1      (L_g = 0 for a community absent from the step)

That is the reference code's rule (``eta_per: step`` with ``decay: 0``). Its alpha ends proportional to start_g *
exp(eta * the sum of L_g over the steps), so one eta moves alpha further the more steps a run has: on the hard subset
the step size that helped under a cap of 800 pairs (50 steps) cost the large communities when the same run had every
pair (196 steps).
The default, ``eta_per: epoch``, scales each step's exponent by its share of an epoch (B / N): over an epoch log
alpha_g grows (up to the normalization all communities share) by about eta times community g's mean loss, whatever
the number of pairs and the batch size.

The per-community loss here is the reference code's scaled sum, L_g = (N / N_g) * sum_{i in g} l_i / B (N_g: the
community's training pairs, N all of them, B the step's pairs), an unbiased estimate of the community's mean loss
that adds up over micro-batches and processes. So the objective is a weighted mean of the pairs' losses, each pair of
community g weighted w_g = alpha_g * N / N_g:

- ``start: share`` (alpha_g = N_g / N): every w_g is 1 and, with ``eta: 0``, this is exactly plain DPO;
- ``start: uniform`` (alpha_g = 1 / G): w_g = N / (G N_g), each community weighted by the inverse of its share; with
  ``eta: 0`` this is the fixed-weights baseline (every community counts as much, whatever its size).

With community-balanced draws (``data.community_tau``) a community is drawn with probability q_g instead of N_g / N;
L_g = sum_{i in g} l_i / (B q_g) and w_g = alpha_g / q_g then (the same formulas with q_g = N_g / N for a plain
shuffle), so L_g still estimates the community's mean loss and ``start: share`` with ``eta: 0`` is still plain DPO's
objective in expectation, the draws' bias weighted back out.

``decay`` (per epoch, whatever ``eta_per``; 4 by default, 0 is the reference rule) makes alpha return towards its
start as the losses even out: each step multiplies log(alpha_g / start_g) by exp(-decay * s), s = B / N being the
step's share of an epoch, before adding the step's exponent (eta * s * L_g per epoch). That is mirror ascent on sum_g
alpha_g L_g - (decay / eta) KL(alpha || start), the KL-regularized group DRO (to first order in decay * s; the
exponential keeps any decay stable): with losses held fixed alpha settles at start_g * exp(eta * s * L_g / (1 -
exp(-decay * s))), normalized, about start_g * exp(eta L_g / decay) when s is small, so alpha follows the losses of
roughly the last 1 / decay epochs instead of adding up every loss since the start. Without it, a community
that was behind early keeps its extra weight after it has caught up: on the hard subset with every training pair, the
small community's alpha without decay rose over the first half of the run and stayed up; with decay it fell back
towards its start, while under a cap, where the community stays behind longer, it stayed higher.

The update happens once per optimizer step, from that step's losses (all micro-batches of an accumulation, summed
across processes, so every process holds the same alpha); a step trains with the weights the previous step left.
(The reference code, which does not accumulate, updates before its backward: the same rule, one step earlier; with
accumulation the step's losses are only known after its last micro-batch's backward.) alpha is saved in checkpoints,
logged per community (``train/group_robust/alpha/r_<community>``) and written beside a DPO export
(``personalm_group_robust.json``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Literal, Optional, Sequence

import numpy as np
import torch

from personalm.data.batching import community_codes, community_probabilities

STATE = "personalm_group_robust"  # in a checkpoint: alpha and the step's partial sums
RECORD = "personalm_group_robust.json"  # beside an export: the settings and alpha at the end


@dataclass
class GroupRobustSettings:
    """Group-robust weights over communities (see ``personalm.training.group_robust``)."""

    eta: float = 8.0
    """Step size of the update alpha_g *= exp(eta * L_g) (per epoch by default: ``eta_per``); 0 keeps the weights where
    they start. 8 with ``decay`` 4 was chosen on the validation split of the hard subset (``embedded:compred-minority``,
    the demo recipes, seeds 42-45, every validation pair; ``python benchmarks/minority_eta.py``) among eta 2 without
    decay and 4, 8 and 16 with decay 4, as the one raising the small community most under the cap of 800 pairs with
    ``cap_floor: 100`` (from 69 to 80%; macro 74 to 77%) among those whose run on every training pair lowers no
    community by more than 2 points against plain DPO (16 lowered r/investing by 2.3). The grids and the test figures:
    README.md, "Measured on the hard subset"."""
    eta_per: Literal["epoch", "step"] = "epoch"
    """``step`` (with ``decay: 0``): the reference code's rule, alpha_g *= exp(eta * L_g) at every optimizer step, so
    alpha ends proportional to start_g * exp(eta * the sum of L_g over the run's steps) and the same eta moves alpha
    further the more steps a run has (more pairs, a smaller batch). ``epoch``: each step's exponent is scaled by its
    share of an epoch, B / N (B the step's pairs over all micro-batches and processes, N the training split's pairs,
    as many as an epoch draws), so over one epoch log alpha_g grows (up to the shared normalization) by about eta
    times community g's mean loss, whatever the number of pairs and the batch size (for a step: eta * sum_{i in g}
    l_i / (N q_g))."""
    decay: float = 4.0
    """How fast alpha returns towards where it started, per epoch (with either ``eta_per``): each step multiplies
    log(alpha_g / start_g) by exp(-decay * the step's share of an epoch) before the update, so with steady losses
    (``eta_per: epoch``) alpha settles at about start_g * exp(eta * L_g / decay), normalized: it follows the losses of
    the last 1 / decay epochs or so. On the hard subset with every pair, alpha on the small community rose while it was
    behind and was nearly back at its start by the end; under the cap, where it stays behind longer, alpha stayed
    higher. 0: the reference rule (every loss since the start adds up, so alpha keeps what it gained after the
    community caught up)."""
    start: Literal["share", "uniform"] = "share"
    """Where alpha starts: ``share`` (N_g / N: eta 0 is plain DPO) or ``uniform`` (1 / G: eta 0 weighs each community
    by the inverse of its share of the training pairs)."""

    def __post_init__(self):
        if self.eta < 0:
            raise ValueError(f"group_robust.eta must be >= 0, got {self.eta}")
        if self.decay < 0:
            raise ValueError(f"group_robust.decay must be >= 0, got {self.decay}")
        if self.eta_per not in ("epoch", "step"):
            raise ValueError(f"group_robust.eta_per must be epoch or step, got {self.eta_per!r}")
        if self.start not in ("share", "uniform"):
            raise ValueError(f"group_robust.start must be share or uniform, got {self.start!r}")


def start_weights(counts: torch.Tensor, start: str) -> torch.Tensor:
    """alpha at the start: each community's share of the training pairs, or uniform."""
    return counts / counts.sum() if start == "share" else torch.full_like(counts, 1.0 / len(counts))


def pair_weights(alpha: torch.Tensor, drawn: torch.Tensor) -> torch.Tensor:
    """The weight of a pair of community g in the objective: w_g = alpha_g / q_g, q_g the share of draws that are
    community g's (N_g / N for a plain shuffle: w_g = alpha_g * N / N_g)."""
    return alpha / drawn


def group_losses(loss_sums: torch.Tensor, pairs: torch.Tensor, drawn: torch.Tensor) -> torch.Tensor:
    """L_g = sum_{i in g} l_i / (B q_g) from the step's per-community sums of losses and its B pairs: for a plain
    shuffle (q_g = N_g / N) the reference code's (N / N_g) * sum_{i in g} l_i / B; for community-balanced draws
    the same estimate of community g's mean loss, not inflated by how often it is drawn."""
    return loss_sums / (pairs.clamp(min=1) * drawn)


def epoch_share(pairs: torch.Tensor, epoch_pairs: torch.Tensor) -> torch.Tensor:
    """The share of an epoch one optimizer step of ``pairs`` pairs is, B / N (``eta_per: epoch`` scales by it)."""
    return pairs / epoch_pairs


def update(alpha: torch.Tensor, losses: torch.Tensor, eta: float, start: Optional[torch.Tensor] = None,
           keep: Optional[torch.Tensor] = None) -> torch.Tensor:
    """alpha_g * exp(eta * L_g), normalized (in log space: no overflow for large eta * L); with ``keep`` (in [0, 1],
    given with ``start``), log(alpha_g / start_g) is first multiplied by it: alpha moves back towards ``start``."""
    log_alpha = torch.log(alpha)
    if keep is not None:
        log_start = torch.log(start)
        log_alpha = log_start + keep * (log_alpha - log_start)
    return torch.softmax(log_alpha + eta * losses, dim=0)


class GroupWeights:
    """The weights of one run over the communities of its training split (in sorted order), on ``device``."""

    def __init__(self, settings: GroupRobustSettings, communities: Sequence[str], counts: Sequence[int],
                 device: Optional[torch.device] = None, drawn: Optional[Sequence[float]] = None):
        self.settings, self.communities = settings, list(communities)
        self.index = {c: i for i, c in enumerate(self.communities)}
        self.counts = torch.tensor(counts, dtype=torch.float64, device=device)
        if (self.counts <= 0).any():
            raise ValueError("every community needs training pairs for group-robust weights: "
                             f"{dict(zip(communities, counts))}")
        # q_g, the share of training draws that are community g's: N_g / N, or the balanced sampler's
        self.drawn = self.counts / self.counts.sum() if drawn is None else torch.tensor(drawn, dtype=torch.float64,
                                                                                         device=device)
        self.start = start_weights(self.counts, settings.start)
        self.alpha = self.start
        self.loss_sums = torch.zeros_like(self.counts)  # this optimizer step's, on this process
        self.pairs = torch.zeros((), dtype=torch.float64, device=device)
        self.row_groups: Optional[torch.Tensor] = None  # each training row's community number (set by the hooks)

    def to(self, device: torch.device) -> None:
        self.counts, self.drawn, self.start, self.alpha, self.loss_sums, self.pairs = (
            t.to(device) for t in (self.counts, self.drawn, self.start, self.alpha, self.loss_sums, self.pairs))
        if self.row_groups is not None:
            self.row_groups = self.row_groups.to(device)

    def objective(self, losses: torch.Tensor, groups) -> torch.Tensor:
        """The weighted mean of a micro-batch's per-pair losses (what it backpropagates); ``groups``: their community
        numbers on the losses' device, or the communities' names. The losses are added to the step's sums."""
        if self.alpha.device != losses.device:  # built in setup, before the model moved to its device
            self.to(losses.device)
        if not isinstance(groups, torch.Tensor):
            groups = self.groups(groups, losses.device)
        weights = pair_weights(self.alpha, self.drawn).to(losses.dtype)[groups]
        self.loss_sums.index_add_(0, groups, losses.detach().to(torch.float64))
        self.pairs += len(groups)
        return (weights * losses).mean()

    def groups(self, communities: Sequence[str], device: torch.device) -> torch.Tensor:
        """Community numbers of a batch built without row indices (a tensor made from host data)."""
        return torch.tensor([self.index[c] for c in communities], device=device)

    def step(self, reduce=lambda t: t) -> None:
        """At an optimizer step: the step's per-community losses (summed over processes by ``reduce``) update
        alpha; the sums start again."""
        sums = reduce(torch.cat([self.loss_sums, self.pairs.reshape(1)]))
        losses = group_losses(sums[:-1], sums[-1], self.drawn)
        share = epoch_share(sums[-1], self.counts.sum())
        if self.settings.eta_per == "epoch":
            losses = losses * share
        keep = torch.exp(-self.settings.decay * share) if self.settings.decay > 0 else None
        self.alpha = update(self.alpha, losses, self.settings.eta, self.start, keep)
        self.loss_sums.zero_()
        self.pairs.zero_()

    def logged(self) -> dict[str, torch.Tensor]:
        return {f"train/group_robust/alpha/r_{c}": self.alpha[i].float() for i, c in enumerate(self.communities)}

    def state_dict(self) -> dict:
        return {"communities": self.communities, "alpha": self.alpha.cpu(), "loss_sums": self.loss_sums.cpu(),
                "pairs": self.pairs.cpu()}

    def load_state_dict(self, state: dict) -> None:
        if state["communities"] != self.communities:
            raise ValueError(f"the checkpoint's group-robust weights are over {state['communities']}, this run's "
                             f"training split has {self.communities}")
        device = self.counts.device
        self.alpha, self.loss_sums, self.pairs = (state[k].to(device) for k in ("alpha", "loss_sums", "pairs"))
        # (``objective`` moves them to the losses' device)

    def record(self) -> str:
        """``personalm_group_robust.json``: the settings, each community's training pairs and alpha at the end."""
        return json.dumps({"settings": asdict(self.settings),
                           "pairs": dict(zip(self.communities, map(int, self.counts.tolist()))),
                           "alpha": dict(zip(self.communities, self.alpha.tolist()))}, indent=2)


class GroupRobustHooks:
    """Mixed into a LightningModule with a ``group_robust`` setting (DPO, the reward model): the weights built for
    the training split, the weighted objective, the update at each optimizer step, checkpoints and the record."""

    group_weights: Optional[GroupWeights] = None

    @property
    def group_robust_settings(self) -> Optional[GroupRobustSettings]:
        value = self.hparams.get("group_robust")
        return None if value is None else GroupRobustSettings(**value)

    def setup(self, stage: str) -> None:
        super().setup(stage)
        settings = self.group_robust_settings
        dm = self.trainer.datamodule if self._trainer is not None else None
        if stage == "fit" and settings is not None and self.group_weights is None:
            names, codes = community_codes(dm.splits["train_pref"])  # sorted names, each row's number into them
            counts = np.bincount(codes, minlength=len(names))
            tau = dm.hparams.get("community_tau")  # balanced draws: each community's share of them, not of the pairs
            drawn = None if tau is None else community_probabilities(counts, tau).tolist()
            self.group_weights = GroupWeights(settings, names, counts.tolist(), self.device, drawn)
            self.group_weights.row_groups = torch.from_numpy(codes.astype(np.int32))

    def preference_objective(self, losses: torch.Tensor, batch: dict) -> torch.Tensor:
        """What a training step minimizes of its per-pair losses: their mean, or the group-robust weighted mean
        (each pair's community looked up on the device from its row ``index``)."""
        weights = self.group_weights
        if weights is None:
            return losses.mean()
        if "index" in batch and weights.row_groups is not None:
            groups = weights.row_groups.to(losses.device)[batch["index"]].long()
        else:
            groups = weights.groups(batch["community"], losses.device)
        return weights.objective(losses, groups)

    def on_before_optimizer_step(self, optimizer) -> None:
        if self.group_weights is not None:
            self.group_weights.step(lambda t: self.trainer.strategy.reduce(t, reduce_op="sum"))
            self.log_dict(self.group_weights.logged())

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.group_weights is not None:
            checkpoint[STATE] = self.group_weights.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        if STATE in checkpoint:
            self._group_state = checkpoint[STATE]

    def on_train_start(self) -> None:
        super().on_train_start()
        state = getattr(self, "_group_state", None)
        if state is not None and self.group_weights is not None:
            self.group_weights.load_state_dict(state)
            self._group_state = None

    def export_extras(self) -> dict:
        extras = super().export_extras()
        return {**extras, RECORD: self.group_weights.record()} if self.group_weights is not None else extras
