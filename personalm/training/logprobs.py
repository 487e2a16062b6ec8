"""Per-sequence log-probabilities of the labelled (response) tokens, from a model's logits. Pure functions.

Computed from fp32 logits as gather minus logsumexp (never a ``[tokens, vocab]`` log-softmax tensor) and
summed in fp32; only positions from the batch's earliest response on are asked of the model.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from personalm.data.encoding import IGNORE_INDEX


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


def model_logprobs(model: nn.Module, seqs: dict) -> SequenceLogprobs:
    """Sequence log-probs of ``model`` on a batch (``input_ids``, ``attention_mask``, ``labels``).

    Only positions from the earliest response on need logits (the LM head and the log-softmax over the
    vocabulary are a large share of the work), so the model is asked for those alone (``logits_to_keep``);
    the result is the same as from all logits.
    """
    labels = seqs["labels"]
    start = response_start(labels)
    logits = model(input_ids=seqs["input_ids"], attention_mask=seqs["attention_mask"],
                   logits_to_keep=labels.size(1) - start).logits
    return sequence_logprobs(logits, labels[:, start:])
