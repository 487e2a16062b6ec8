"""DPO math, no Lightning: per-sequence log-probabilities and the preference losses.

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

from personalm.encoding import IGNORE_INDEX

LOSS_TYPES = ("sigmoid", "ipo", "hinge")


class SequenceLogprobs(NamedTuple):
    sum: torch.Tensor  # [N] fp32: sum over response tokens of log p(token | prefix)
    mean: torch.Tensor  # [N] fp32: the same divided by the number of response tokens
    tokens: torch.Tensor  # [N] number of response tokens


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> SequenceLogprobs:
    """Log-probabilities of the labelled tokens of each sequence.

    ``logits`` [N, T, V] predict position t+1 from position t, so they are shifted against ``labels``
    [N, T]; positions labelled ``IGNORE_INDEX`` (prompt, padding) count for nothing. Computed from
    fp32 logits (log-softmax as gather minus logsumexp) and summed in fp32.
    """
    logits = logits[:, :-1, :].float()
    labels = labels[:, 1:]
    mask = labels != IGNORE_INDEX
    safe = labels.masked_fill(~mask, 0)
    token_logps = torch.gather(logits, 2, safe.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    token_logps = torch.where(mask, token_logps, 0.0)
    total = token_logps.sum(-1)
    count = mask.sum(-1)
    return SequenceLogprobs(total, total / count.clamp(min=1), count)


def response_start(labels: torch.Tensor) -> int:
    """The first position whose logits matter: one before the earliest labelled token of the batch.

    ``sequence_logprobs(logits[:, s:], labels[:, s:])`` equals ``sequence_logprobs(logits, labels)`` for
    this ``s``, since every earlier position is masked.
    """
    labelled = labels != IGNORE_INDEX
    if not labelled.any():
        return 0
    first = int(labelled.float().argmax(dim=1)[labelled.any(dim=1)].min())
    return max(first - 1, 0)


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
