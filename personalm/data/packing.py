"""Packed rows: several sequences per row, each attending only within itself. Pure functions.

Three layouts, all described per token by a ``group`` (which sequence or pair of the row it belongs to;
-1 for padding) and a ``branch`` (0: shared by the whole group; 1, 2: a branch that sees the shared
tokens and itself, never the other branch):

- **Prefix-shared DPO pairs**: one span ``[prompt | chosen | rejected]`` per pair; the rejected tokens do
  not see the chosen ones and their positions continue from the end of the prompt, like the chosen
  ones, so each answer is computed as if it followed the prompt alone (the post is run through the
  model once per pair instead of twice).
- **Two spans per pair** (the peer design: OpenRLHF's and open-instruct's packed DPO): ``[prompt | chosen]``
  and ``[prompt | rejected]`` as separate spans, the prompt run twice; the yardstick prefix sharing is measured
  against (``benchmarks/epoch_vs_trl.py``).
- **Packed SFT examples**: ``[prompt + response]`` spans, positions restarting at 0 in each.

Pairs/examples go into rows by first-fit decreasing up to a token budget (by default the longest span of
the batch, so a row is never wider than without packing). What each output sequence scores is listed as
flat ``targets``: the token, the flat position (row * width + column) of the hidden state that predicts
it, and the sequence it counts for. ``attention_mask_4d`` turns group/branch into the ``[rows, 1, T, T]``
mask the model takes.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

SHARED, FIRST, SECOND = 0, 1, 2  # branches
PAD_GROUP = -1


def _first_fit(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Span indices per row: longest first, each into the first row it fits (a span longer than the budget
    gets a row of its own)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(budget - lengths[i])
    return rows


def pack(spans: Sequence[dict], pad_id: int, budget: Optional[int] = None) -> dict:
    """Lay out spans into packed rows.

    A span is ``{"pieces": [(ids, branch, first_position), ...], "targets": [(piece, offset, src_piece,
    src_offset, sequence), ...]}``: token ``offset`` of piece ``piece`` is scored for output sequence
    ``sequence``, predicted by the hidden state at token ``src_offset`` of piece ``src_piece``.

    Returns ``input_ids``, ``position_ids``, ``group``, ``branch`` ([rows, T]), ``target_ids``,
    ``target_source`` (flat row * T + column), ``target_sequence`` ([M]) and ``tokens`` (non-padding
    tokens forwarded); the callers add ``sequences`` (how many output sequences).
    """
    lengths = [sum(len(ids) for ids, _, _ in s["pieces"]) for s in spans]
    width_needed = max(lengths) if lengths else 1
    rows = _first_fit(lengths, max(budget or 0, width_needed))
    width = max(max(sum(lengths[i] for i in row) for row in rows), 1)
    shape = (len(rows), width)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    group = torch.full(shape, PAD_GROUP, dtype=torch.long)
    branch = torch.zeros(shape, dtype=torch.long)
    tgt_ids, tgt_src, tgt_seq = [], [], []
    for r, row in enumerate(rows):
        col = 0
        for g, i in enumerate(row):
            starts = []
            for ids, b, first in spans[i]["pieces"]:
                n = len(ids)
                starts.append(col)
                if n:
                    input_ids[r, col:col + n] = torch.as_tensor(ids, dtype=torch.long)
                    position_ids[r, col:col + n] = torch.arange(first, first + n)
                    group[r, col:col + n] = g
                    branch[r, col:col + n] = b
                col += n
            for piece, offset, src_piece, src_offset, seq in spans[i]["targets"]:
                tgt_ids.append(spans[i]["pieces"][piece][0][offset])
                tgt_src.append(r * width + starts[src_piece] + src_offset)
                tgt_seq.append(seq)
        if col < width:  # padding: positions go on (they attend only to padding of their row)
            position_ids[r, col:] = torch.arange(width - col)
    as_long = lambda v: torch.tensor(v, dtype=torch.long)  # noqa: E731
    return {"input_ids": input_ids, "position_ids": position_ids, "group": group, "branch": branch,
            "target_ids": as_long(tgt_ids), "target_source": as_long(tgt_src), "target_sequence": as_long(tgt_seq),
            "tokens": int(sum(lengths))}


def target_counts(layout: dict) -> dict:
    """``target_counts``: how many targets each output sequence has, counted here on the host (a ``bincount`` on a
    GPU would wait for it)."""
    return {**layout, "target_counts": torch.bincount(layout["target_sequence"], minlength=layout["sequences"])}


def _response_targets(piece: int, n: int, prompt_len: int, sequence: int) -> list[tuple]:
    """Response tokens of ``piece`` (after a prompt piece 0): token 0 is predicted by the prompt's last
    token, token j by token j - 1 of the same piece. Without a prompt, token 0 has no predictor (as in a
    padded row, where position 0 is never scored)."""
    out = []
    for j in range(n):
        if j == 0:
            if prompt_len:
                out.append((piece, 0, 0, prompt_len - 1, sequence))
        else:
            out.append((piece, j, piece, j - 1, sequence))
    return out


def pack_pairs(prompts: Sequence[Sequence[int]], chosen: Sequence[Sequence[int]], rejected: Sequence[Sequence[int]],
               pad_id: int, budget: Optional[int] = None) -> dict:
    """Prefix-shared pairs: output sequence k is pair k's chosen answer, n + k its rejected one (the order of
    the padded layout: chosen rows, then rejected rows)."""
    n = len(prompts)
    spans = []
    for k, (p, c, r) in enumerate(zip(prompts, chosen, rejected)):
        p, c, r = list(p), list(c), list(r)
        spans.append({"pieces": [(p, SHARED, 0), (c, FIRST, len(p)), (r, SECOND, len(p))],
                      "targets": _response_targets(1, len(c), len(p), k) + _response_targets(2, len(r), len(p), n + k)})
    out = pack(spans, pad_id, budget)
    out["sequences"] = 2 * n
    return target_counts(out)


def pack_pairs_two_spans(prompts: Sequence[Sequence[int]], chosen: Sequence[Sequence[int]],
                         rejected: Sequence[Sequence[int]], pad_id: int, budget: Optional[int] = None) -> dict:
    """Each pair as two spans ``[prompt | chosen]``, ``[prompt | rejected]``; output sequences in the order of
    ``pack_pairs`` (chosen answers, then rejected ones)."""
    n = len(prompts)
    spans = []
    for k, (p, c, r) in enumerate(zip(prompts, chosen, rejected)):
        p = list(p)
        for answer, sequence in ((list(c), k), (list(r), n + k)):
            spans.append({"pieces": [(p, SHARED, 0), (answer, SHARED, len(p))],
                          "targets": _response_targets(1, len(answer), len(p), sequence)})
    out = pack(spans, pad_id, budget)
    out["sequences"] = 2 * n
    return target_counts(out)


def pack_examples(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int,
                  budget: Optional[int] = None) -> dict:
    """Packed SFT examples ``prompt + response``, scored on the response; output sequence k is example k."""
    spans = []
    for k, (p, r) in enumerate(zip(prompts, responses)):  # the response a piece of its own, seeing the prompt
        p, r = list(p), list(r)
        spans.append({"pieces": [(p, SHARED, 0), (r, SHARED, len(p))],
                      "targets": _response_targets(1, len(r), len(p), k)})
    out = pack(spans, pad_id, budget)
    out["sequences"] = len(prompts)
    return target_counts(out)


def attention_mask_4d(group: torch.Tensor, branch: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``[rows, 1, T, T]``: query i sees key j iff j <= i, both in the same group, and j is shared or on
    i's branch. Boolean (True: attend), as SDPA takes it; with ``dtype``, additive (0 / dtype's minimum),
    as eager attention takes it. Padding (its own group) sees earlier padding, so no row is all masked."""
    t = group.size(1)
    causal = torch.ones(t, t, dtype=torch.bool, device=group.device).tril()
    same = group[:, :, None] == group[:, None, :]
    visible = (branch[:, None, :] == SHARED) | (branch[:, :, None] == branch[:, None, :])
    mask = (causal[None] & same & visible)[:, None]
    if dtype is None:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=group.device).masked_fill(~mask, torch.finfo(dtype).min)


def padded_targets(labels: torch.Tensor, ignore_index: int) -> dict:
    """The same ``target_*`` description for a padded batch (labels [N, T]): token t of row b is predicted by
    position t - 1 of that row; output sequence b is row b. The collate functions make it on the host."""
    n, t = labels.shape
    shifted = labels[:, 1:]
    rows, cols = (shifted != ignore_index).nonzero(as_tuple=True)
    return target_counts({"target_ids": shifted[rows, cols], "target_source": rows * t + cols,
                          "target_sequence": rows, "sequences": n})
