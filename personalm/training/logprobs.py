"""Per-sequence log-probabilities of the labelled (response) tokens. Pure functions.

Computed from fp32 logits as gather minus logsumexp (never a ``[tokens, vocab]`` log-softmax tensor) and
summed in fp32. Two paths:

- ``sequence_logps`` (the default): the model's final hidden states of a padded batch or of packed rows
  (``personalm.data.packing``: prefix-shared DPO pairs, packed SFT examples, under a 4D attention mask),
  gathered at the positions that predict a response token; the LM head is applied to those alone, chunk
  by chunk, each chunk recomputed in backward, so ``[tokens, vocab]`` logits are never held.
- ``model_logprobs`` (the old path, and the fallback for models that change their logits after the head or
  whose attention takes no custom mask): the model's logits from the batch's earliest response on.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from lightning.pytorch.utilities.rank_zero import WarningCache
from torch import nn
from torch.utils.checkpoint import checkpoint

from personalm.data.encoding import IGNORE_INDEX
from personalm.data.packing import attention_mask_4d, padded_targets
from personalm.training.attention import FLEX, attend, block_mask


class SequenceLogprobs(NamedTuple):
    sum: torch.Tensor  # [N] fp32: sum over response tokens of log p(token | prefix)
    mean: torch.Tensor  # [N] fp32: the same divided by the number of response tokens
    tokens: torch.Tensor  # [N] number of response tokens

    @classmethod
    def of(cls, total: torch.Tensor, count: torch.Tensor) -> "SequenceLogprobs":
        return cls(total, total / count.clamp(min=1), count)


def target_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``log_softmax(logits)`` at ``targets`` along the last dimension, in fp32, as gather minus logsumexp (no
    log-softmax tensor the size of ``logits``): ``logits`` [..., V], ``targets`` [...] -> [...]."""
    logits = logits.float()
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> SequenceLogprobs:
    """Log-probabilities of the labelled tokens of each sequence.

    ``logits`` [N, T, V] predict position t+1 from position t, so they are shifted against ``labels``
    [N, T]; positions labelled ``IGNORE_INDEX`` (prompt, padding) count for nothing. Computed from
    fp32 logits (log-softmax as gather minus logsumexp) and summed in fp32.
    """
    logits = logits[:, :-1, :]
    labels = labels[:, 1:]
    mask = labels != IGNORE_INDEX
    safe = labels.masked_fill(~mask, 0)
    token_logps = target_logps(logits, safe)
    token_logps = torch.where(mask, token_logps, 0.0)
    return SequenceLogprobs.of(token_logps.sum(-1), mask.sum(-1))


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


# -------------------------------------------------------------------------- hidden states, chunked head

# attention implementations that take a custom mask: its dtype (None: boolean; FlexAttention: a BlockMask)
MASKS = {"sdpa": None, "eager": torch.float32, FLEX: None}
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_softcapping", "logit_scale", "logits_scaling")


def _base(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


PLAIN_HEAD = "_personalm_plain_head"  # set on a model once its head was checked against its own logits


def head_is_plain(model: nn.Module) -> bool:
    """The logits are the output embedding of the final hidden states, nothing after. Gemma's soft-capping,
    Cohere's and Granite's scales are in the config; other scalings inside a model's forward are caught by
    ``sequence_logps``' first call, which compares the head's output with the model's own logits."""
    base = _base(model)
    config = getattr(base, "config", None)
    if any(getattr(config, k, None) not in (None, 1, 1.0) for k in LOGIT_TRANSFORMS):
        return False
    return getattr(base, PLAIN_HEAD, True)


def takes_4d_mask(model: nn.Module) -> bool:
    """One custom 4D mask describes every layer: SDPA or eager attention, all layers full attention (a 4D mask
    reaches sliding-window layers without their window, and linear-attention or recurrent layers without
    the spans' boundaries), no ALiBi bias built from a 2D mask."""
    config = getattr(_base(model), "config", None)
    if getattr(config, "_attn_implementation", None) not in MASKS:
        return False
    if any(t != "full_attention" for t in (getattr(config, "layer_types", None) or ())):
        return False
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return False
    return not (getattr(config, "alibi", False) or getattr(config, "model_type", "") in ("bloom", "mpt"))


def final_hidden_states(model: nn.Module, input_ids, attention_mask, position_ids=None) -> torch.Tensor:
    """``[N, T, H]`` after the final norm: the decoder's output, caught by a hook while the model runs as a
    whole (so peft's and FSDP's wrappers run their hooks), its head asked for one position only. The first
    time for a model, that position's logits are compared with the head applied to the caught state: a
    model that scales its logits inside its forward is marked (``head_is_plain`` then says no)."""
    base = _base(model)
    caught = []
    handle = base.get_decoder().register_forward_hook(
        lambda _m, _a, out: caught.append(out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]))
    try:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       logits_to_keep=1, use_cache=False).logits
    finally:
        handle.remove()
    hidden = caught[-1]
    if not hasattr(base, PLAIN_HEAD):
        with torch.no_grad():
            mine = base.get_output_embeddings()(hidden[:, -1:]).float()
        setattr(base, PLAIN_HEAD, bool(torch.allclose(mine, logits[:, -1:].float(), rtol=1e-3, atol=1e-3)))
    return hidden


def _token_logps(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return target_logps(head(hidden), targets)


def token_logps(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, chunk: Optional[int]) -> torch.Tensor:
    """log p(target | hidden) per row of ``hidden`` [M, H], the head applied ``chunk`` rows at a time and
    recomputed in backward (only the chunk's inputs are kept); ``chunk`` None or 0: in one piece."""
    if not chunk or hidden.size(0) <= chunk:
        return _token_logps(head, hidden, targets)
    grad = torch.is_grad_enabled() and hidden.requires_grad
    return torch.cat([checkpoint(_token_logps, head, h, t, use_reentrant=False) if grad else _token_logps(head, h, t)
                      for h, t in zip(hidden.split(chunk), targets.split(chunk))])


def packed_mask(model: nn.Module, group: torch.Tensor, branch: torch.Tensor):
    """The mask of packed rows as the model's attention takes it: dense 4D (SDPA, eager) or a ``BlockMask``."""
    implementation = _base(model).config._attn_implementation
    if implementation == FLEX:
        return block_mask(group, branch)
    return attention_mask_4d(group, branch, MASKS[implementation])


def layout_logprobs(model: nn.Module, layout: dict, chunk: Optional[int]) -> SequenceLogprobs:
    """Sequence log-probs of the ``target_*`` of a layout: packed rows (``group``/``branch``: a 4D mask) or
    a padded batch (``attention_mask``); a custom mask's forward runs under ``personalm.training.attention.attend``."""
    if "group" in layout:
        mask = packed_mask(model, layout["group"], layout["branch"])
        hidden = attend(model, lambda: final_hidden_states(model, layout["input_ids"], mask, layout["position_ids"]),
                        layout["input_ids"].device.type)
    elif takes_4d_mask(model):  # the padded rows' own 4D mask: transformers then checks no 2D mask on the host
        group = (layout["attention_mask"].long() - 1)  # 0: a token, -1: padding (sees only earlier padding, so no
        mask = packed_mask(model, group, torch.zeros_like(group))  # row is all masked)
        positions = torch.arange(group.size(1), device=group.device).expand_as(group)  # right-padded: 0, 1, ...
        hidden = attend(model, lambda: final_hidden_states(model, layout["input_ids"], mask, positions),
                        group.device.type)
    else:
        hidden = final_hidden_states(model, layout["input_ids"], layout["attention_mask"])
    picked = hidden.reshape(-1, hidden.size(-1))[layout["target_source"]]
    logps = token_logps(_base(model).get_output_embeddings(), picked, layout["target_ids"], chunk)
    seq, n = layout["target_sequence"], layout["sequences"]
    total = torch.zeros(n, dtype=torch.float32, device=logps.device).index_add(0, seq, logps.float())
    counts = layout.get("target_counts")  # counted on the host by the collate function
    return SequenceLogprobs.of(total, torch.bincount(seq, minlength=n) if counts is None else counts)


MESSAGES = WarningCache()  # each fallback said once


def runs_packed_rows(model: nn.Module) -> bool:
    """Packed rows (``batch["packed"]``) are what this model runs: a plain head and one 4D mask for every layer."""
    return head_is_plain(model) and takes_4d_mask(model)


def sequence_logps(model: nn.Module, seqs: dict, chunk: Optional[int] = 1024) -> SequenceLogprobs:
    """Sequence log-probs of a padded batch (``input_ids``, ``attention_mask``, ``labels``) that may also
    carry the same sequences packed (``seqs["packed"]``): packed rows where the model takes a 4D mask,
    chunked head unless ``chunk`` is None; the old path where neither applies or the head is not plain."""
    packed = seqs.get("packed")
    if not head_is_plain(model):
        MESSAGES.info("[personalm] this model transforms its logits after the head: packed rows and chunked "
                      "log-probs are off (the model's own logits are used)")
        return model_logprobs(model, seqs)
    if packed is None and not chunk:
        return model_logprobs(model, seqs)
    if packed is not None and runs_packed_rows(model):
        out = layout_logprobs(model, packed, chunk)
    else:
        if packed is not None:
            MESSAGES.info(f"[personalm] attention {_base(model).config._attn_implementation!r} or this model's "
                          "layers (sliding windows, linear attention, ALiBi) take no custom 4D mask: packed rows "
                          "are off")
        targets = seqs.get("targets") or padded_targets(seqs["labels"], IGNORE_INDEX)  # batches made by hand
        out = layout_logprobs(model, {**seqs, **targets}, chunk)
    if not head_is_plain(model):  # found out on this first call: the model's own logits from now on
        return sequence_logps(model, seqs, chunk)
    return out
