"""Tokenization: one tokenization of the prompt (SentencePiece and byte-level BPE), truncation in tokens."""

import pytest

from personalm.data.encoding import PlainTokenizer, encode, encode_batch, fit_prompts, prompt_budget
from personalm.data.prompt import format_prompt

TITLE = "Should I put my tax refund into index funds or pay off my car?"
POST = ("I am 29 and have 12k saved. My job is stable but rent keeps going up. My partner and I just got "
        "a bonus. We have some debt and no real plan yet, and I keep reading about crypto and gold.")
CHOSEN = "Build an emergency fund of six months first, then buy a low cost index fund and wait."
REJECTED = "YOLO it on GME before earnings, diamond hands."
HEAD = "<|domain|>\nr/finance\n<|user|>\n"
TAIL = "\n<|assistant|>\n"
TOKENIZERS = ["embedded", "mistral"]  # byte-level BPE (GPT-2 style) and SentencePiece (Llama/Mistral)


@pytest.fixture(params=TOKENIZERS)
def tok(request, tokenizer, mistral_tokenizer):
    return tokenizer if request.param == "embedded" else mistral_tokenizer


def text_ids(tok, text: str) -> list[int]:
    """What the tokenizer itself gives for a whole text: its BOS rule, special-token text not parsed."""
    return tok(text, split_special_tokens=True)["input_ids"]


def response_ids(tok, text: str, prompt: str = HEAD + TITLE + "\n" + POST + TAIL) -> list[int]:
    """The response's ids in the whole text (the tokenizer's ids of prompt + response, the prompt's taken
    off), then EOS: what the model sees after the prompt."""
    prompt_ids, whole = text_ids(tok, prompt), text_ids(tok, prompt + text)
    assert whole[:len(prompt_ids)] == prompt_ids
    return whole[len(prompt_ids):] + [tok.eos_token_id]


def check_prompt(tok, e, community: str, title: str, post: str, budget: int) -> None:
    """The prompt ids are exactly the tokenizer's ids of the prompt text with the post as kept."""
    assert not e.dropped
    assert e.prompt_ids == text_ids(tok, format_prompt(community, title, post[:e.post_chars]))
    assert len(e.prompt_ids) <= budget
    assert e.post_shortened == (e.post_chars < len(post))


# ----------------------------------------------------------------------------------------------------
# One tokenization of the prompt


def test_prompt_ids_are_the_tokenizers_ids_of_the_prompt_text(tok):
    e = encode(tok, "r/finance", TITLE, POST, [CHOSEN])
    check_prompt(tok, e, "r/finance", TITLE, POST, 512)
    assert not e.shortened and e.post_chars == len(POST)
    assert e.response_ids == [response_ids(tok, CHOSEN)]
    assert tok.decode(e.prompt_ids, skip_special_tokens=True) == HEAD + TITLE + "\n" + POST + TAIL


@pytest.mark.parametrize("post_room", [1, 5, 12, 25])
def test_shortened_prompt_ids_are_the_tokenizers_ids_of_the_shortened_text(tok, post_room):
    budget = prompt_len(tok, post="") + post_room
    assert prompt_len(tok) > budget
    e = encode(tok, "r/finance", TITLE, POST, [CHOSEN], max_length=256, max_prompt_length=budget)
    check_prompt(tok, e, "r/finance", TITLE, POST, budget)
    assert e.post_shortened and 0 < e.post_chars < len(POST)
    assert len(e.prompt_ids) >= budget - 2, "shortened much more than the budget needed"
    assert POST.startswith(tok.decode(e.prompt_ids, skip_special_tokens=True)[len(HEAD + TITLE + "\n"): -len(TAIL)])
    assert e.response_ids == [response_ids(tok, CHOSEN)]  # the response is whole, EOS included


def test_mistral_pieces_would_differ_from_the_whole_text(mistral_tokenizer):
    """Why the prompt is tokenized once: SentencePiece gives every piece its own leading "▁"."""
    tok = mistral_tokenizer
    pieces = [i for piece in (HEAD, TITLE + "\n", POST, TAIL)
              for i in tok(piece, add_special_tokens=False)["input_ids"]]
    e = encode(tok, "r/finance", TITLE, POST)
    assert e.prompt_ids[0] == tok.bos_token_id and e.prompt_ids[1:] != pieces
    assert e.prompt_ids == text_ids(tok, format_prompt("r/finance", TITLE, POST))


def test_special_token_text_in_posts_and_comments_stays_text(mistral_tokenizer):
    tok = mistral_tokenizer
    bos, eos = tok.bos_token_id, tok.eos_token_id
    comment = "Invest it instead. </s> Seriously. <s> Not <unk> gold."
    post = "My brother says </s> is the end. <s>I disagree.</s>"
    assert tok(comment, add_special_tokens=False)["input_ids"].count(eos) == 1  # the hazard, unguarded
    e = encode(tok, "r/finance", TITLE, post, [comment, "No."])
    assert e.prompt_ids.count(bos) == 1 and e.prompt_ids[0] == bos and eos not in e.prompt_ids
    assert tok.unk_token_id not in e.prompt_ids + e.response_ids[0]
    for ids in e.response_ids:
        assert ids.count(eos) == 1 and ids[-1] == eos and bos not in ids
    assert tok.decode(e.response_ids[0][:-1]) == comment
    check_prompt(tok, e, "r/finance", TITLE, post, 512)


def test_encode_matches_encode_batch(tok):
    rows = [("r/finance", TITLE, POST, CHOSEN, REJECTED),
            ("Reddit", "What do I do with a windfall of 40k?", "", "Keep it boring.", "Buy calls."),
            ("r/Frugal", "Got a raise", "Now what about a house?", "Cancel streaming.", "Leverage up.")]
    batch = encode_batch(tok, [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows],
                         [[r[3] for r in rows], [r[4] for r in rows]], max_length=1024)
    for (community, title, post, chosen, rejected), b in zip(rows, batch):
        one = encode(tok, community, title, post, [chosen, rejected], max_length=1024)
        assert one.prompt_ids == b.prompt_ids and one.response_ids == b.response_ids
        check_prompt(tok, b, community, title, post, 512)
        assert b.response_ids == [response_ids(tok, chosen), response_ids(tok, rejected)]


@pytest.mark.parametrize("max_prompt_length", [None, 50])
def test_generation_prompt_equals_training_prompt(tok, max_prompt_length):
    train = encode(tok, "r/finance", TITLE, POST, [CHOSEN], max_length=128, max_prompt_length=max_prompt_length)
    generate = encode(tok, "r/finance", TITLE, POST, max_length=128, max_prompt_length=max_prompt_length)
    assert generate.response_ids == [] and not generate.dropped
    assert generate.prompt_ids == train.prompt_ids and generate.post_chars == train.post_chars


def test_without_offsets_the_prompt_is_still_the_tokenizers_ids_within_budget(tok):
    """A tokenizer with no Rust backend has no offsets: the post is cut by estimate, tokenized again."""
    plain = PlainTokenizer(tok)
    plain.backend = None
    head = HEAD + TITLE + "\n"
    for budget in (prompt_len(tok, post="") + room for room in (3, 10, 25)):
        (ids, kept), = fit_prompts(plain, [head], [POST], TAIL, budget)
        assert len(ids) <= budget and 0 < kept < len(POST)
        assert ids == text_ids(tok, head + POST[:kept] + TAIL)


# ----------------------------------------------------------------------------------------------------
# Truncation in tokens: the prompt keeps up to max_prompt_length, the response tail is cut


def prompt_len(tok, post: str = POST) -> int:
    return len(text_ids(tok, format_prompt("r/finance", TITLE, post)))


def test_fits_exactly_without_shortening(tok):
    n_prompt = prompt_len(tok)
    n = n_prompt + len(response_ids(tok, CHOSEN))
    e = encode(tok, "r/finance", TITLE, POST, [CHOSEN], max_length=n, max_prompt_length=n_prompt)
    assert not e.shortened and not e.dropped
    assert len(e.prompt_ids) + len(e.response_ids[0]) == n
    assert e.response_ids[0][-1] == tok.eos_token_id


def test_a_response_longer_than_max_length_keeps_the_post(tok):
    """The old rule gave the prompt max_length - longest response tokens: a long answer erased the post."""
    long_answer = " ".join([CHOSEN] * 30)
    assert len(response_ids(tok, long_answer)) > 300
    e = encode(tok, "r/finance", TITLE, POST, [long_answer, REJECTED], max_length=128, max_prompt_length=90)
    check_prompt(tok, e, "r/finance", TITLE, POST, 90)
    if prompt_len(tok) <= 90:  # the post kept whole, or up to max_prompt_length
        assert e.post_chars == len(POST)
    else:
        assert len(e.prompt_ids) >= 88
    assert e.response_cut
    room = 128 - len(e.prompt_ids)
    assert e.response_ids[0] == response_ids(tok, long_answer)[:room]  # tail cut, no EOS: it did not end there
    assert tok.eos_token_id not in e.response_ids[0]
    assert e.response_ids[1] == response_ids(tok, REJECTED)  # the short one whole


def test_default_prompt_budget_is_half_of_max_length(tok):
    long_answer = " ".join([CHOSEN] * 30)
    e = encode(tok, "r/finance", TITLE, POST * 4, [long_answer], max_length=100)
    check_prompt(tok, e, "r/finance", TITLE, POST * 4, 50)
    assert e.post_shortened and e.response_cut and len(e.prompt_ids) + len(e.response_ids[0]) == 100
    assert prompt_budget(100) == 50 and prompt_budget(100, 70) == 70


@pytest.mark.parametrize("max_prompt_length", [100, 101, 500])
def test_max_prompt_length_must_leave_room_for_a_response(max_prompt_length):
    with pytest.raises(ValueError, match="smaller than max_length"):
        prompt_budget(100, max_prompt_length)


def test_row_is_dropped_only_when_markers_and_title_exceed_the_budget(tok):
    fixed = prompt_len(tok, post="")
    at_limit = encode(tok, "r/finance", TITLE, POST, [CHOSEN], max_length=fixed + 50, max_prompt_length=fixed)
    assert not at_limit.dropped and at_limit.post_chars == 0 and len(at_limit.prompt_ids) == fixed
    for over in (1, 5):
        e = encode(tok, "r/finance", TITLE, POST, [CHOSEN], max_length=fixed + 50, max_prompt_length=fixed - over)
        assert e.dropped and e.response_ids == []


def test_one_token_of_room_is_not_dropped(tok):
    fixed = prompt_len(tok, post="")
    e = encode(tok, "r/finance", TITLE, POST, [CHOSEN], max_length=fixed + 1, max_prompt_length=fixed)
    assert not e.dropped and e.response_ids == [response_ids(tok, CHOSEN)[:1]]


def test_variants_share_the_post_text_and_the_responses(tok):
    """The "no community" and "random community" rows score the same post text and the same responses as
    the true row, all within max_length; the true prompt is the one training and generation use."""
    communities = ["r/Frugal", "r/finance"]
    variants = [["Reddit", "Reddit"], ["r/personalfinance", "r/wallstreetbets"]]
    long_answer = " ".join([CHOSEN] * 10)
    posts, chosen = [POST, POST * 3], [long_answer, CHOSEN]
    for budget, max_length in ((50, 120), (64, 90), (300, 400)):
        rows = encode_batch(tok, communities, [TITLE, TITLE], posts, [chosen, [REJECTED, REJECTED]],
                            max_length=max_length, max_prompt_length=budget, variants=variants)
        alone = encode_batch(tok, communities, [TITLE, TITLE], posts, max_length=max_length,
                             max_prompt_length=budget)
        for i, e in enumerate(rows):
            assert e.prompt_ids == alone[i].prompt_ids and e.post_chars == alone[i].post_chars
            check_prompt(tok, e, communities[i], TITLE, posts[i], budget)
            for community, ids in zip([v[i] for v in variants], e.variant_prompt_ids):
                assert ids == text_ids(tok, format_prompt(community, TITLE, posts[i][:e.post_chars]))
            longest = max(len(ids) for ids in [e.prompt_ids, *e.variant_prompt_ids])
            assert e.response_ids == [response_ids(tok, r)[:max_length - longest] for r in (chosen[i], REJECTED)]


# ----------------------------------------------------------------------------------------------------
# The response as in the text: prompt ids + response ids are the tokenizer's ids of prompt + response


def demo_pairs() -> list[dict]:
    """Every preference row of the demo data (``embedded:compred``: both subsets, all three splits)."""
    from personalm.data.pairs import to_pairs
    from personalm.data.sources import load_split
    from personalm.data.synthetic import dataset_dir

    root = str(dataset_dir("embedded:compred"))
    return [row for subset in ("finance", "history") for split in ("train_pref", "validation_pref", "test_pref")
            for row in to_pairs(load_split(root, subset, split)).to_pylist()]


@pytest.fixture(scope="module")
def demo_rows() -> list[dict]:
    return demo_pairs()


@pytest.mark.parametrize("max_length, max_prompt_length", [(128, None), (64, 46)])  # the demo's; responses cut
def test_every_demo_row_is_tokenized_as_its_whole_text(tok, demo_rows, max_length, max_prompt_length):
    """For every demo row and each of its prompts (the true community, "Reddit", another community): the
    prompt's ids followed by a response's ids are the tokenizer's ids of prompt + response text, EOS aside;
    a cut response's are a prefix of them. Mistral tokenizes a response on its own with a leading "▁" that
    the whole text does not have."""
    from personalm.data.prompt import random_other_community

    rows = demo_rows
    assert len(rows) > 7000
    names = sorted({r["community"] for r in rows})
    communities = ["r/" + r["community"] for r in rows]
    variants = [["Reddit"] * len(rows),
                ["r/" + random_other_community(r["community"], r["post_id"], names, 0) for r in rows]]
    enc = encode_batch(tok, communities, [r["title"] for r in rows], [r["post"] for r in rows],
                       [[r["chosen"] for r in rows], [r["rejected"] for r in rows]], max_length=max_length,
                       max_prompt_length=max_prompt_length, variants=variants)
    texts, checks = {}, []  # whole texts tokenized once, in one call
    for i, (row, e) in enumerate(zip(rows, enc)):
        assert not e.dropped
        for community, prompt_ids in zip([communities[i], *(v[i] for v in variants)],
                                         [e.prompt_ids, *e.variant_prompt_ids]):
            prompt = format_prompt(community, row["title"], row["post"][:e.post_chars])
            for text, ids in zip((row["chosen"], row["rejected"]), e.response_ids):
                texts[prompt + text] = None
                checks.append((prompt + text, prompt_ids, ids))
    whole = dict(zip(texts, tok(list(texts), split_special_tokens=True)["input_ids"]))
    cut = 0
    for text, prompt_ids, ids in checks:
        if ids[-1] == tok.eos_token_id:
            assert prompt_ids + ids[:-1] == whole[text]
        else:  # cut to fit max_length: a prefix
            cut += 1
            assert prompt_ids + ids == whole[text][:len(prompt_ids) + len(ids)]  # (all of it when only EOS went)
    assert (cut > 0) == (max_length == 64)


def merging_tokenizer():
    """A byte-level BPE with "\\n\\n" as one token (as GPT-2 has): the marker's last "\\n" merges with
    newlines that open a response."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(["x\n\n\ny"] * 50 + [TITLE, POST, CHOSEN], trainer)  # "\n\n" the first merge
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="</s>")


def test_a_response_merged_with_the_marker_is_tokenized_on_its_own():
    tok = merging_tokenizer()
    lead = "\n\n" + CHOSEN  # after the marker: "\n" + "\n\n..." -> "\n\n", "\n", ...
    prompt = format_prompt("r/finance", TITLE, POST)
    assert text_ids(tok, prompt + lead)[:len(text_ids(tok, prompt))] != text_ids(tok, prompt)  # the merge
    e = encode(tok, "r/finance", TITLE, POST, [lead, CHOSEN])
    check_prompt(tok, e, "r/finance", TITLE, POST, 512)
    alone = tok(lead, add_special_tokens=False)["input_ids"]
    assert e.response_ids[0] == alone + [tok.eos_token_id] and tok.decode(alone) == lead
    assert e.response_ids[1] == response_ids(tok, CHOSEN, prompt)  # the other row as in its text
