"""Tokenization of the template with truncation counted in tokens. Pure functions.

One tokenization of the prompt: the prompt's ids are exactly what the tokenizer itself gives for the final
prompt text (``tokenizer(format_prompt(...), split_special_tokens=True)``: its own BOS rule, and text such
as ``</s>`` in a Reddit post never parsed into a control token). Tokenizing the template in pieces would
not do: a SentencePiece tokenizer (Llama, Mistral) gives every piece its own leading ``▁``, so the model
would be trained on ids that no other tool serving it (vLLM, a pipeline) produces.

The same holds at the response: Mistral's ``tokenizer(prompt + "Build an")`` ends ``'<0x0A>', 'Build', '▁an'``,
while ``"Build an"`` alone is ``'▁Build', '▁an'``. So a response is tokenized after the template's assistant
marker (``"\\n<|assistant|>\\n" + response``) and the marker's own ids dropped: prompt ids + response ids are the
tokenizer's ids of prompt + response text, and every prompt variant of a row shares one set of response ids.

Lengths are token counts (the original counted characters):

- the prompt keeps up to ``prompt_budget(max_length, max_prompt_length)`` tokens: markers, community and
  title always whole, the post body shortened from its end on a token boundary taken from the
  tokenizer's offsets, then the shortened text tokenized again (and shortened again if that overshoots);
- each response's ids are those it has in the whole text, prompt then response, then EOS, and its tail
  is cut to fit ``max_length`` (``response_ids``);
- a row is dropped only when markers, community and title alone leave no room.

Rows scored under several community strings (the "no community" / "random community" evaluation
variants) share one post text and the same responses, so their columns compare like with like.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Optional, Sequence

from personalm.data.prompt import prompt_parts

IGNORE_INDEX = -100  # label value that cross-entropy ignores: prompt and padding


def prompt_budget(max_length: int, max_prompt_length: Optional[int] = None) -> int:
    """Tokens the prompt may take: ``max_prompt_length``, or half of ``max_length`` when unset (the
    paper's DPO ratio, 512 of 1024), so a long answer never erases the post and a long post never
    erases the answer."""
    if max_prompt_length is None:
        return max(max_length // 2, 1)
    if not 0 < max_prompt_length < max_length:
        raise ValueError(f"max_prompt_length ({max_prompt_length}) must be positive and smaller than max_length "
                         f"({max_length}): the response needs at least one token")
    return max_prompt_length


@dataclass
class Encoded:
    prompt_ids: list[int]  # the prompt with the first community string, BOS included where the tokenizer adds one
    response_ids: list[list[int]]  # one per response given; each ends in EOS unless its tail was cut
    post_chars: int  # characters of the post body kept in the prompt (its full length when whole)
    post_shortened: bool
    response_cut: bool
    dropped: bool  # markers, community and title alone leave no room
    variant_prompt_ids: list[list[int]] = field(default_factory=list)  # same post text, other community strings

    @property
    def shortened(self) -> bool:
        return self.post_shortened or self.response_cut


class PlainTokenizer:
    """Text -> ids as ``tokenizer(text, add_special_tokens=False, split_special_tokens=True)`` gives them,
    with character offsets, for many texts in one call.

    A fast tokenizer's Rust backend is called directly (transformers' wrapper converts every encoding in
    Python, ~5x slower on a million rows), on a private copy set to encode special-token text as text.
    A tokenizer without a Rust backend goes through the wrapper and has no offsets (prompts are then
    shortened by an estimate of characters per token, then tokenized again).
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None:
            from tokenizers import Tokenizer

            backend = Tokenizer.from_str(backend.to_str())
            backend.encode_special_tokens = True  # "</s>" in a comment stays three pieces of text
            backend.no_truncation()
            backend.no_padding()
        self.backend = backend
        self.bos = special_prefix(tokenizer)
        self.eos = tokenizer.eos_token_id
        self.vocab_size = len(tokenizer)

    def __getstate__(self) -> dict:
        """What a worker process needs: the Rust backend's definition (not transformers' wrapper), BOS, EOS."""
        state = dict(self.__dict__)
        if self.backend is not None:
            state["backend"], state["tokenizer"] = self.backend.to_str(), None
        return state

    def __setstate__(self, state: dict) -> None:
        if isinstance(state.get("backend"), str):
            from tokenizers import Tokenizer

            backend = Tokenizer.from_str(state["backend"])
            backend.encode_special_tokens = True
            state["backend"] = backend
        self.__dict__.update(state)

    def encode(self, texts: Sequence[str]) -> list[tuple[list[int], Optional[list[tuple[int, int]]]]]:
        """(ids, offsets) per text; texts repeated in the batch (pairs of one post) are tokenized once."""
        unique = [t for t in dict.fromkeys(texts) if t]
        if self.backend is not None:
            found = {t: (e.ids, e.offsets) for t, e in zip(unique, self.backend.encode_batch(
                unique, add_special_tokens=False))}
        else:
            ids = self.tokenizer(unique, add_special_tokens=False, split_special_tokens=True)["input_ids"] \
                if unique else []
            found = {t: (i, None) for t, i in zip(unique, ids)}
        return [(list(found[t][0]), found[t][1]) if t else ([], []) for t in texts]

    def ids(self, texts: Sequence[str]) -> list[list[int]]:
        return [ids for ids, _ in self.encode(texts)]


_PLAIN: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def plain_tokenizer(tokenizer) -> PlainTokenizer:
    """The ``PlainTokenizer`` of a tokenizer, built once (copying a 32k-vocabulary backend takes a while)."""
    if isinstance(tokenizer, PlainTokenizer):
        return tokenizer
    try:
        plain = _PLAIN.get(tokenizer)
        if plain is None:
            plain = _PLAIN[tokenizer] = PlainTokenizer(tokenizer)
        return plain
    except TypeError:  # not weak-referenceable
        return PlainTokenizer(tokenizer)


def special_prefix(tokenizer) -> list[int]:
    """What the tokenizer itself puts in front of an input (BOS for Llama and Mistral, nothing for GPT-2).
    A suffix it may add (some add EOS) is left out: a response follows the prompt."""
    with_special = tokenizer("x", add_special_tokens=True)["input_ids"]
    plain = tokenizer("x", add_special_tokens=False)["input_ids"]
    for k in range(len(with_special) - len(plain) + 1):
        if with_special[k:k + len(plain)] == plain:
            return list(with_special[:k])
    return []




# ----------------------------------------------------------------------------------------------------
# Prompts


def _cut_point(head: str, post: str, offsets: Optional[list[tuple[int, int]]], excess: int, text_chars: int,
               tokens: int) -> int:
    """Characters of ``post`` to keep so that ``excess`` fewer tokens remain: the start of the first post
    token to remove, from the tokenizer's offsets of ``head + post + tail``. Always < len(post).

    Without offsets (a tokenizer with no Rust backend) the cut is estimated from the text's characters
    per token; the caller tokenizes the result again and cuts further if needed (the estimate may keep a
    few tokens fewer than the budget allows).
    """
    if offsets is None:
        return max(min(len(post) - int(excess * text_chars / max(tokens, 1) + 1), len(post) - 1), 0)
    lo, hi = len(head), len(head) + len(post)
    starts = [s for s, e in offsets if lo <= s < hi and e > s]  # tokens that begin inside the post
    if len(starts) <= excess:
        return 0
    return min(starts[len(starts) - excess] - lo, len(post) - 1)


def fit_prompts(plain: PlainTokenizer, heads: Sequence[str], posts: Sequence[str], tail: str,
                budget: int) -> list[Optional[tuple[list[int], int]]]:
    """``(ids, characters of the post kept)`` of ``head + post[:kept] + tail`` for the longest post prefix
    that fits ``budget`` tokens (BOS included), cut where a token of the post begins; None where even the
    empty post does not fit. Every round tokenizes the final texts once, in one batch."""
    keep = [len(p) for p in posts]
    result: list[Optional[tuple[list[int], int]]] = [None] * len(heads)
    pending = list(range(len(heads)))
    while pending:
        encoded = plain.encode([heads[i] + posts[i][:keep[i]] + tail for i in pending])
        again = []
        for i, (ids, offsets) in zip(pending, encoded):
            total = len(plain.bos) + len(ids)
            if total <= budget:
                result[i] = (plain.bos + ids, keep[i])
            elif keep[i] > 0:  # shorten the post and tokenize the shorter text again
                keep[i] = _cut_point(heads[i], posts[i][:keep[i]], offsets, total - budget,
                                     len(heads[i]) + keep[i] + len(tail), len(ids))
                again.append(i)
        pending = again
    return result


def response_ids(plain: PlainTokenizer, texts: Sequence[str], marker: str) -> list[list[int]]:
    """The ids each response has after the prompt, then EOS: ``marker + response`` tokenized (the template's
    assistant marker, which ends every prompt), the marker's own ids dropped.

    With the tokenizers in use (Mistral's SentencePiece: "\\n" is byte-fallback and merges with nothing; the
    embedded byte-level BPE) nothing merges across the marker's last "\\n", so prompt ids + response ids are
    the ids of the whole text. A tokenizer may merge it with whitespace that opens a response (a byte-level BPE
    with a "ĊĊ" token and a response starting with newlines): the tail's ids then do not start with the
    marker's, no split of them keeps the prompt's ids whole, and that response is tokenized on its own (its
    ids still decode to its text).
    """
    marker_ids = plain.ids([marker])[0]
    n = len(marker_ids)
    tails = plain.ids([marker + t for t in texts])
    merged = [i for i, ids in enumerate(tails) if ids[:n] != marker_ids]
    alone = dict(zip(merged, plain.ids([texts[i] for i in merged])))
    return [alone.get(i, ids[n:]) + [plain.eos] for i, ids in enumerate(tails)]


def encode_batch(tokenizer, communities: Sequence[str], titles: Sequence[str], posts: Sequence[str],
                 responses: Sequence[Sequence[str]] = (), max_length: int = 1024,
                 max_prompt_length: Optional[int] = None,
                 variants: Sequence[Sequence[str]] = ()) -> list[Encoded]:
    """Token ids of the template's prompt and the responses of many rows.

    ``responses`` holds one list of texts per response kind (e.g. ``[chosen, rejected]``), ``variants``
    one list of community strings per extra prompt (e.g. ``["Reddit", ...]``, ``["r/Frugal", ...]``); each
    list as long as ``titles``. Without responses (generation prompts) the prompt is the same as in
    training, so a model is asked exactly what it was trained on.

    The first community string's prompt is fitted to the budget exactly as in training (so a test pair's
    true prompt is its training and generation prompt); a variant's prompt holds the same post text, and
    so may pass the budget by the tokens its community string adds. The responses are cut to fit the
    longest of them within ``max_length``, so every variant scores the same responses.
    """
    plain = plain_tokenizer(tokenizer)
    budget = prompt_budget(max_length, max_prompt_length)
    tail = prompt_parts("", "", "")[3]
    heads = [[h + t for h, t, _, _ in (prompt_parts(c, title, "") for c, title in zip(col, titles))]
             for col in (communities, *variants)]
    fitted = fit_prompts(plain, heads[0], posts, tail, budget)  # as in training and generation
    kept = [f[1] if f is not None else 0 for f in fitted]
    others = [plain.ids([h[i] + posts[i][:kept[i]] + tail for i in range(len(titles))]) for h in heads[1:]]
    resp_ids = [response_ids(plain, texts, tail) for texts in responses]
    out = []
    for i, f in enumerate(fitted):
        prompts = [f[0]] + [plain.bos + o[i] for o in others] if f is not None else []
        room = max_length - max(len(p) for p in prompts) if prompts else 0
        if room <= 0:  # markers, community and title alone over the budget (or a variant's over max_length)
            out.append(Encoded(prompt_ids=[], response_ids=[], post_chars=0, post_shortened=True,
                               response_cut=False, dropped=True))
            continue
        mine = [r[i] for r in resp_ids]
        out.append(Encoded(prompt_ids=prompts[0], response_ids=[r[:room] for r in mine],  # a cut response has
                           post_chars=kept[i], post_shortened=kept[i] < len(posts[i]),  # no EOS: it did not
                           response_cut=any(len(r) > room for r in mine), dropped=False,  # end there
                           variant_prompt_ids=prompts[1:]))
    return out


def encode(tokenizer, community: str, title: str, post: str, responses: Sequence[str] = (),
           max_length: int = 1024, max_prompt_length: Optional[int] = None) -> Encoded:
    """``encode_batch`` for one row."""
    return encode_batch(tokenizer, [community], [title], [post], [[r] for r in responses],
                        max_length, max_prompt_length)[0]
