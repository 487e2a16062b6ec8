"""Collate functions: prepared rows to padded tensors with labels on the response only. Pure functions."""

from __future__ import annotations

from typing import Literal, Optional, Sequence

import torch

from personalm.data.encoding import IGNORE_INDEX
from personalm.data.packing import pack_examples, pack_pairs, pack_pairs_two_spans, padded_targets

PairPacking = Literal["prefix_shared", "two_spans", "none"]
PAIR_PACKERS = {"prefix_shared": pack_pairs, "two_spans": pack_pairs_two_spans}


def _require(rows: Sequence[dict], keys: Sequence[str], what: str) -> None:
    """A clear error instead of a bare KeyError deep inside a DataLoader worker."""
    if not rows:
        raise ValueError(f"{what}: empty batch")
    for i, row in enumerate(rows):
        missing = [k for k in keys if k not in row]
        if missing:
            raise ValueError(f"{what}: row {i} of the batch lacks {missing} (has {sorted(row)}); "
                             f"prepare rows with ComPreDDataModule(rows=...) for this stage")


def _pad(seqs: Sequence[Sequence[int]], value: int, left: bool = False) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    out = torch.full((len(seqs), width), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s):
            if left:
                out[i, width - len(s):] = torch.as_tensor(s)
            else:
                out[i, : len(s)] = torch.as_tensor(s)
    return out


def sequences(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int) -> dict:
    """Right-padded prompt+response with labels only on the response (prompt and padding -100)."""
    input_ids = _pad([list(p) + list(r) for p, r in zip(prompts, responses)], pad_id)
    labels = _pad([[IGNORE_INDEX] * len(p) + list(r) for p, r in zip(prompts, responses)], IGNORE_INDEX)
    lengths = torch.tensor([len(p) + len(r) for p, r in zip(prompts, responses)])
    attention_mask = (torch.arange(input_ids.size(1))[None, :] < lengths[:, None]).long()
    # what each sequence scores, found here on the host (on a GPU, ``nonzero`` would wait for it), and the tokens
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask,
            "targets": padded_targets(labels, IGNORE_INDEX), "tokens": int(lengths.sum())}


def _post_ids(rows: Sequence[dict]) -> list:
    """The posts of a batch (named when a step goes wrong); rows built by hand may lack them."""
    return [r.get("post_id") for r in rows]


def collate_sft(rows: Sequence[dict], pad_id: int, pack: bool = False, pack_tokens: Optional[int] = None) -> dict:
    """Padded rows; with ``pack``, also the same examples packed (``batch["packed"]``, see
    ``personalm.data.packing``)."""
    _require(rows, ("prompt_ids", "chosen_ids", "community"), "collate_sft")
    batch = sequences([r["prompt_ids"] for r in rows], [r["chosen_ids"] for r in rows], pad_id)
    if pack:
        batch["packed"] = pack_examples([r["prompt_ids"] for r in rows], [r["chosen_ids"] for r in rows], pad_id,
                                        pack_tokens)
    batch["community"] = [r["community"] for r in rows]
    batch["post_id"] = _post_ids(rows)
    return batch


def _pairs(prompts: list, rows: Sequence[dict], pad_id: int, packing: PairPacking, pack_tokens: Optional[int]) -> dict:
    chosen, rejected = [r["chosen_ids"] for r in rows], [r["rejected_ids"] for r in rows]
    batch = sequences(prompts * 2, chosen + rejected, pad_id)
    if packing != "none":
        batch["packed"] = PAIR_PACKERS[packing](prompts, chosen, rejected, pad_id, pack_tokens)
    return batch


def collate_preference(rows: Sequence[dict], pad_id: int, pair_packing: PairPacking = "none",
                       pack_tokens: Optional[int] = None) -> dict:
    """Chosen rows then rejected rows in one batch of 2B sequences, so one forward pass scores both; with
    ``pair_packing``, also the pairs packed into rows (``batch["packed"]``): ``prefix_shared``, one
    ``[prompt | chosen | rejected]`` span per pair; ``two_spans``, ``[prompt | chosen]`` and ``[prompt | rejected]``."""
    if pair_packing != "none" and pair_packing not in PAIR_PACKERS:
        raise ValueError(f"pair_packing must be one of prefix_shared, two_spans, none; got {pair_packing!r}")
    _require(rows, ("prompt_ids", "chosen_ids", "rejected_ids", "community", "index"), "collate_preference")
    batch = _pairs([r["prompt_ids"] for r in rows], rows, pad_id, pair_packing, pack_tokens)
    batch["community"] = [r["community"] for r in rows]
    batch["post_id"] = _post_ids(rows)
    batch["index"] = torch.tensor([r["index"] for r in rows])
    for extra in ("none_prompt_ids", "random_prompt_ids"):  # conditioning-sensitivity variants
        if extra in rows[0]:
            batch[extra.replace("_prompt_ids", "")] = _pairs([r[extra] for r in rows], rows, pad_id, pair_packing,
                                                             pack_tokens)
    return batch


def collate_prompts(rows: Sequence[dict], pad_id: int) -> dict:
    """Left-padded prompts for generation, with what the predictions file records of each."""
    meta = ("index", "post_id", "community", "prompt_community", "title", "post")
    _require(rows, ("prompt_ids", *meta), "collate_prompts")
    input_ids = _pad([r["prompt_ids"] for r in rows], pad_id, left=True)
    lengths = torch.tensor([len(r["prompt_ids"]) for r in rows])
    attention_mask = (torch.arange(input_ids.size(1))[None, :] >= (input_ids.size(1) - lengths)[:, None]).long()
    return {"input_ids": input_ids, "attention_mask": attention_mask, **{k: [r[k] for r in rows] for k in meta}}
