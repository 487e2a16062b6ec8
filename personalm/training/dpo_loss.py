"""DPO math, no Lightning: the preference losses, on per-pair log-probabilities (``personalm.training.logprobs``).

Direct Preference Optimization (Rafailov et al. 2023, arXiv 2305.18290). With policy pi, frozen
reference ref, prompt x, chosen y_w and rejected y_l, the log-ratio difference is

    h = [log pi(y_w|x) - log ref(y_w|x)] - [log pi(y_l|x) - log ref(y_l|x)]

and the losses are

    sigmoid (DPO)      : -log sigmoid(beta h)
    conservative DPO   : -(1 - e) log sigmoid(beta h) - e log sigmoid(-beta h)      (label_smoothing e)
    ipo (Azar et al.)  : (h - 1 / (2 beta))^2, with h from per-token *mean* log-probs
    hinge (SLiC)       : max(0, 1 - beta h)

The implicit reward of a response is r(y) = beta (log pi(y|x) - log ref(y|x)); the reward accuracy is
mean(r(y_w) > r(y_l)). With policy == reference every h is 0, so the sigmoid loss is ln 2.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from personalm.training.logprobs import SequenceLogprobs

LOSS_TYPES = ("sigmoid", "ipo", "hinge")


def check_dpo_args(beta: float, loss_type: str, label_smoothing: float) -> None:
    """Refuse settings that would train something else than asked, before any training starts."""
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; choose one of {LOSS_TYPES}")
    if not 0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if label_smoothing and loss_type != "sigmoid":
        raise ValueError(f"label_smoothing (conservative DPO) applies to the sigmoid loss, not {loss_type!r}")


class PairLogps(NamedTuple):
    """Log-probabilities of the two responses of each pair, [B] each: sums and per-token means."""

    chosen_sum: torch.Tensor
    rejected_sum: torch.Tensor
    chosen_mean: torch.Tensor
    rejected_mean: torch.Tensor

    @classmethod
    def from_sequences(cls, seq: SequenceLogprobs, n: int) -> "PairLogps":
        """From the log-probs of a batch of chosen rows then rejected rows (2n sequences)."""
        return cls(seq.sum[:n], seq.sum[n:], seq.mean[:n], seq.mean[n:])

    def for_loss(self, loss_type: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen, rejected) as the loss takes them: per-token means for IPO, sums for the others."""
        return (self.chosen_mean, self.rejected_mean) if loss_type == "ipo" else (self.chosen_sum, self.rejected_sum)


class PairLosses(NamedTuple):
    """Per-pair results of a DPO step, [B] each."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor  # detached
    rejected_rewards: torch.Tensor  # detached
    chosen_logps: torch.Tensor  # policy sums, detached
    rejected_logps: torch.Tensor
    chosen_mean_logps: torch.Tensor  # policy per-token means of the chosen responses, with their graph (RPO)

    @property
    def for_metrics(self) -> dict[str, torch.Tensor]:
        """What ``PreferenceMetrics.update`` takes, by name."""
        return {"losses": self.losses, "chosen_rewards": self.chosen_rewards, "rejected_rewards": self.rejected_rewards,
                "chosen_logps": self.chosen_logps, "rejected_logps": self.rejected_logps}


def pair_losses(policy: PairLogps, reference: PairLogps, beta: float, loss_type: str = "sigmoid",
                label_smoothing: float = 0.0) -> PairLosses:
    """``dpo_loss`` on the log-probs ``loss_type`` takes, with the policy's log-probs for logging."""
    losses, chosen_r, rejected_r = dpo_loss(*policy.for_loss(loss_type), *reference.for_loss(loss_type), beta,
                                            loss_type, label_smoothing)
    return PairLosses(losses, chosen_r, rejected_r, policy.chosen_sum.detach(), policy.rejected_sum.detach(),
                      policy.chosen_mean)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float = 0.1, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-example DPO losses and detached chosen/rejected rewards (torchtune's ``DPOLoss`` contract).

    All inputs are [B] log-probabilities: sums for sigmoid and hinge, per-token means for ipo (the
    caller picks; ``DPOModule`` does). Returns ``(losses [B], chosen_rewards [B], rejected_rewards [B])``.
    """
    check_dpo_args(beta, loss_type, label_smoothing)
    h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:  # hinge
        losses = torch.relu(1 - beta * h)
    chosen_rewards = beta * (policy_chosen - ref_chosen).detach()
    rejected_rewards = beta * (policy_rejected - ref_rejected).detach()
    return losses, chosen_rewards, rejected_rewards


LN2 = math.log(2)
