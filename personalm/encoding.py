"""Tokenization with truncation counted in tokens, and the collate functions. Pure functions.

Lengths are token counts (the original counted characters). When prompt + response exceed
``max_length`` the post body is shortened first (template markers and title stay whole), then the
response's tail; a row whose fixed prompt part alone leaves no room for a response is dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from personalm.prompt import prompt_parts

IGNORE_INDEX = -100  # label value that cross-entropy ignores: prompt and padding


@dataclass
class Encoded:
    prompt_ids: list[int]
    response_ids: list[list[int]]  # one per response given; each ends in EOS unless its tail was cut
    shortened: bool
    dropped: bool  # no room for any response token


def _batch_ids(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of many texts in one batched tokenizer call; '' -> [].

    A fast tokenizer's Rust backend is called directly: transformers' wrapper converts every encoding
    in Python, which made it ~5x slower on a million rows. Slow tokenizers go through the wrapper.
    """
    unique = [t for t in dict.fromkeys(texts) if t]  # pairs of one post repeat its title, body, responses
    if not unique:
        return [[] for _ in texts]
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        ids = [e.ids for e in backend.encode_batch(unique, add_special_tokens=False)]
    else:
        ids = tokenizer(unique, add_special_tokens=False)["input_ids"]
    by_text = dict(zip(unique, ids))
    return [list(by_text[t]) if t else [] for t in texts]


def bos_prefix(tokenizer) -> list[int]:
    """The BOS id if this tokenizer puts one in front of its inputs (Llama does, GPT-2 does not)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    ids = tokenizer("x", add_special_tokens=True)["input_ids"]
    return [bos] if ids and ids[0] == bos else []


def fit_to_length(fixed: list[int], post: list[int], tail: list[int], responses: Sequence[list[int]],
                  max_length: int, max_prompt_length: Optional[int] = None) -> Encoded:
    """Fit prompt (``fixed + post + tail``) and responses into ``max_length`` tokens.

    The post body is shortened first; then each response's tail. With several responses (chosen,
    rejected) the prompt is fitted to the longest, so both share one prompt. Without responses
    (generation prompts) the prompt gets ``max_prompt_length`` or ``max_length - 1`` tokens.
    """
    shortened = False
    prompt_budget = max_length - max((len(r) for r in responses), default=1)
    if max_prompt_length is not None:
        prompt_budget = min(prompt_budget, max_prompt_length)
    room_for_post = prompt_budget - len(fixed) - len(tail)
    if len(post) > room_for_post:
        post = post[: max(room_for_post, 0)]
        shortened = True
    prompt = fixed + post + tail
    room = max_length - len(prompt)
    too_long = len(prompt) > (prompt_budget if not responses else (max_prompt_length or max_length))
    if too_long or room <= 0:  # title + markers alone leave no room
        return Encoded(prompt, [], shortened, dropped=True)
    if any(len(r) > room for r in responses):
        shortened = True
        responses = [r[:room] for r in responses]  # a cut response has no EOS: it did not end there
    return Encoded(prompt, list(responses), shortened, dropped=False)


def encode_batch(tokenizer, communities: Sequence[str], titles: Sequence[str], posts: Sequence[str],
                 responses: Sequence[Sequence[str]] = (), max_length: int = 1024,
                 max_prompt_length: Optional[int] = None) -> list[Encoded]:
    """Token ids for the template's prompt and responses of many rows, each fitted into ``max_length``.

    ``responses`` holds one list of texts per response kind (e.g. ``[chosen, rejected]``), each as long
    as ``titles``. Every piece is tokenized on its own (as TRL does for prompt and completion), so the
    same prompt gives the same ids in training and in generation.
    """
    n = len(titles)
    parts = [prompt_parts(c, t, p) for c, t, p in zip(communities, titles, posts)]
    distinct_heads = sorted({p[0] for p in parts})  # one per community string: tokenize each once
    heads = dict(zip(distinct_heads, _batch_ids(tokenizer, distinct_heads)))
    tail = _batch_ids(tokenizer, [parts[0][3]])[0] if n else []
    title_ids = _batch_ids(tokenizer, [p[1] for p in parts])
    post_ids = _batch_ids(tokenizer, [p[2] for p in parts])
    eos = [tokenizer.eos_token_id]
    resp_ids = [[ids + eos for ids in _batch_ids(tokenizer, texts)] for texts in responses]
    bos = bos_prefix(tokenizer)
    return [fit_to_length(bos + heads[parts[i][0]] + title_ids[i], post_ids[i], tail,
                          [r[i] for r in resp_ids], max_length, max_prompt_length) for i in range(n)]


def encode(tokenizer, community: str, title: str, post: str, responses: Sequence[str] = (),
           max_length: int = 1024, max_prompt_length: Optional[int] = None) -> Encoded:
    """``encode_batch`` for one row."""
    return encode_batch(tokenizer, [community], [title], [post], [[r] for r in responses],
                        max_length, max_prompt_length)[0]


# ----------------------------------------------------------------------------------------------------
# Collation


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
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def collate_sft(rows: Sequence[dict], pad_id: int) -> dict:
    _require(rows, ("prompt_ids", "chosen_ids", "community"), "collate_sft")
    batch = sequences([r["prompt_ids"] for r in rows], [r["chosen_ids"] for r in rows], pad_id)
    batch["community"] = [r["community"] for r in rows]
    return batch


def collate_preference(rows: Sequence[dict], pad_id: int) -> dict:
    """Chosen rows then rejected rows in one batch of 2B sequences, so one forward pass scores both."""
    _require(rows, ("prompt_ids", "chosen_ids", "rejected_ids", "community", "index"), "collate_preference")
    prompts = [r["prompt_ids"] for r in rows] * 2
    responses = [r["chosen_ids"] for r in rows] + [r["rejected_ids"] for r in rows]
    batch = sequences(prompts, responses, pad_id)
    batch["community"] = [r["community"] for r in rows]
    batch["index"] = torch.tensor([r["index"] for r in rows])
    for extra in ("none_prompt_ids", "random_prompt_ids"):  # conditioning-sensitivity variants
        if extra in rows[0]:
            batch[extra.replace("_prompt_ids", "")] = sequences(
                [r[extra] for r in rows] * 2, responses, pad_id)
    return batch


def collate_prompts(rows: Sequence[dict], pad_id: int) -> dict:
    """Left-padded prompts for generation, with what the predictions file records of each."""
    meta = ("index", "post_id", "community", "prompt_community", "title", "post")
    _require(rows, ("prompt_ids", *meta), "collate_prompts")
    input_ids = _pad([r["prompt_ids"] for r in rows], pad_id, left=True)
    lengths = torch.tensor([len(r["prompt_ids"]) for r in rows])
    attention_mask = (torch.arange(input_ids.size(1))[None, :] >= (input_ids.size(1) - lengths)[:, None]).long()
    return {"input_ids": input_ids, "attention_mask": attention_mask, **{k: [r[k] for r in rows] for k in meta}}
