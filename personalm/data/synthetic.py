"""A small synthetic dataset in the ComPreD format, built so that communities disagree.

It is NOT real Reddit data. It exists so the whole pipeline runs offline and so the effect the paper
studies is visible in minutes: every subset has four communities that share the same kinds of posts
(the post text never reveals the community) and three comment styles. Each community ranks the styles
differently, and the four rankings are chosen so that each pair of styles is won by one style in two
communities and by the other in the remaining two. Without the community in the prompt a model can
do no better than chance on these pairs; with it, a model can learn every community's taste.

Rows carry every field of the real schema (``domain`` with the SHP-style split suffix, A/B order
random, ``labels`` 1 when A is preferred), and the files are written in the Hub layout::

    <dir>/<subset>/{train_pref,validation_pref,test_pref}.jsonl
    <dir>/<subset>_test_prompts/test_prompts.jsonl
"""

from __future__ import annotations

import itertools
import math
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from personalm.data.synthetic_texts import FILLER, RANKINGS, SUBSETS
from personalm.jsonl import write_jsonl
from personalm.models.embedded import lookup
from personalm.paths import cache_root

MINORITY_POSTS = {"train_pref": 150, "validation_pref": 20, "test_pref": 40}
MINORITY_NOISE = 0.02


@dataclass(frozen=True)
class LengthModel:
    """Heavy-tailed lengths, in words, for post bodies and comments: log-normal (median, sigma), clipped.

    Reddit text is heavy-tailed, roughly log-normal: most comments are a sentence or two, a few run to
    essays, and posts are longer. ComPreD itself cannot be measured here (no Hub), so the defaults are
    assumptions, kept as parameters: post body median 120 words (sigma 1.0: a quarter over ~235 words, 1%
    over ~1200), comment median 40 words (sigma 1.1: 1% over ~500; 0: comments as they are), clipped at 2000 and
    1200 words. The
    words added are neutral sentences drawn alike for every community and comment style, so lengths carry
    no signal: the demo's learning problem is unchanged, only the sequences are longer and uneven.
    """

    post_median: float = 120.0
    post_sigma: float = 1.0
    post_max: int = 2000
    comment_median: float = 40.0
    comment_sigma: float = 1.1
    comment_max: int = 1200


def _words(rng: random.Random, median: float, sigma: float, most: int) -> int:
    return min(int(rng.lognormvariate(math.log(median), sigma)), most)


def _pad_to(rng: random.Random, text: str, words: int) -> str:
    """``text`` followed by neutral sentences until it holds about ``words`` words."""
    parts, n = [text] if text else [], len(text.split())
    while n < words:
        sentence = rng.choice(FILLER)
        parts.append(sentence)
        n += len(sentence.split())
    return " ".join(parts)


SPLITS = {"train_pref": "train", "validation_pref": "validation", "test_pref": "test"}
DEFAULT_POSTS = {"train_pref": 120, "validation_pref": 12, "test_pref": 20}
_SCORE_BY_RANK = [(40, 120), (8, 20), (1, 4)]


def _fill(rng: random.Random, template: str, slots: dict) -> str:
    return template.format(**{k: rng.choice(v) for k, v in slots.items()})


def _post(rng: random.Random, spec: dict) -> tuple[str, str]:
    return _fill(rng, rng.choice(spec["titles"]), spec["slots"]), _fill(rng, rng.choice(spec["bodies"]), spec["slots"])


def posts(subset: str, split: str, n_posts: int, seed: int = 0,
          lengths: Optional[LengthModel] = None) -> Iterator[dict]:
    """Posts with their comments: dicts with community, post_id, title, history, comments [(text, score)].
    With ``lengths``, bodies and comments are lengthened to heavy-tailed lengths (the rest is unchanged)."""
    spec = SUBSETS[subset]
    rng = random.Random(f"{seed}:{subset}:{split}")
    longer = random.Random(f"{seed}:{subset}:{split}:lengths")  # its own draws: the demo's rows stay as they are
    for ci, community in enumerate(spec["communities"]):
        ranking = spec.get("rankings", RANKINGS)[ci]
        share = spec.get("train_share", {}).get(community, 1.0) if split == "train_pref" else 1.0
        for p in range(round(n_posts * share)):
            title, history = _post(rng, spec)
            n_styles = len(spec["styles"])
            styles = [*range(n_styles), rng.randrange(n_styles)]  # one comment per style, plus one more
            comments, bases = [], []
            for style in styles:
                text = _fill(rng, rng.choice(spec["styles"][style]), spec["style_slots"])
                bases.append(text)
                if lengths is not None and lengths.comment_median > 0:
                    text = _pad_to(longer, text, _words(longer, lengths.comment_median, lengths.comment_sigma,
                                                        lengths.comment_max))
                low, high = spec.get("scores", _SCORE_BY_RANK)[ranking.index(style)]
                comments.append((text, rng.randint(low, high)))
            if lengths is not None:
                history = _pad_to(longer, history, _words(longer, lengths.post_median, lengths.post_sigma,
                                                          lengths.post_max))
            yield {"community": community, "post_id": f"{subset[:3]}{split[:2]}{ci}{p:05d}",
                   "title": title, "history": history, "comments": comments, "bases": bases, "styles": styles}


def preference_rows(subset: str, split: str, n_posts: int, seed: int = 0,
                    lengths: Optional[LengthModel] = None, noise: float = 0.0) -> Iterator[dict]:
    """ComPreD preference rows (all schema fields) for every comment pair of every post (of different styles
    only, for a subset that says so); ``noise``: the share of pairs whose two scores are swapped (the community's
    vote taken the wrong way round)."""
    rng = random.Random(f"{seed}:{subset}:{split}:pairs")
    flips = random.Random(f"{seed}:{subset}:{split}:noise")  # its own draws: without noise the rows stay as they are
    suffix = SPLITS.get(split, "train")
    for post in posts(subset, split, n_posts, seed, lengths):
        for (i, (ta, sa)), (j, (tb, sb)) in itertools.combinations(enumerate(post["comments"]), 2):
            if post["bases"][i] == post["bases"][j]:  # the same comment twice (lengthened apart or not)
                continue
            if SUBSETS[subset].get("distinct_styles") and post["styles"][i] == post["styles"][j]:
                continue
            if noise and flips.random() < noise:
                sa, sb = sb, sa
            if rng.random() < 0.5:
                (i, ta, sa), (j, tb, sb) = (j, tb, sb), (i, ta, sa)
            t0 = 1.6e9 + rng.randrange(10**7)
            yield {
                "domain": f"{post['community']}_{suffix}", "post_id": post["post_id"],
                "title": post["title"], "history": post["history"],
                "c_root_id_A": f"{post['post_id']}c{i}", "c_root_id_B": f"{post['post_id']}c{j}",
                "created_at_utc_A": t0, "created_at_utc_B": t0 + 60 * (j - i),
                "score_A": sa, "score_B": sb, "human_ref_A": ta, "human_ref_B": tb,
                "labels": int(sa > sb), "overlap_ratio": 0.0, "seconds_difference": float(abs(60 * (j - i))),
                "score_ratio": max(sa, sb) / min(sa, sb), "len_ratio": max(len(ta), len(tb)) / min(len(ta), len(tb)),
            }


def prompt_rows(subset: str, n_posts: int, seed: int = 0, lengths: Optional[LengthModel] = None) -> Iterator[dict]:
    """Test-prompt rows: several per post (one per rank), as in ``<subset>_test_prompts``."""
    for post in posts(subset, "test_pref", n_posts, seed, lengths):
        for rank in range(1, 4):
            yield {"rank": rank, "only_comment": False, "domain": post["community"], "post_id": post["post_id"],
                   "title": post["title"], "history": post["history"]}


def write_dataset(root: Path, subsets=("finance", "history"), n_posts: Optional[dict] = None, seed: int = 0,
                  lengths: Optional[LengthModel] = None, noise: float = 0.0) -> Path:
    """Write the synthetic dataset in the Hub layout under ``root`` (atomically: all or nothing); with
    ``lengths``, posts and comments of heavy-tailed lengths (benchmarks), else the demo's short ones; ``noise``:
    the share of training pairs with their labels flipped."""
    root = Path(root)
    n_posts = {**DEFAULT_POSTS, **(n_posts or {})}
    tmp = root.with_name(root.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    for subset in subsets:
        for split in SPLITS:
            write_jsonl(tmp / subset / f"{split}.jsonl",
                        preference_rows(subset, split, n_posts[split], seed, lengths,
                                        noise if split == "train_pref" else 0.0))
        write_jsonl(tmp / f"{subset}_test_prompts" / "test_prompts.jsonl",
                    prompt_rows(subset, n_posts["test_pref"], seed, lengths))
    if root.exists():
        shutil.rmtree(tmp)
        return root  # another process finished first; same seed, same content
    tmp.rename(root)
    return root


# ----------------------------------------------------------------------------------------------------
# embedded:compred

DATASETS = {  # name -> (folder under the cache root, what write_dataset writes there)
    "compred": ("compred-synthetic-v1", {}),
    "compred-minority": ("compred-minority-v2", {"subsets": ("minority",), "n_posts": MINORITY_POSTS,
                                                 "lengths": LengthModel(comment_median=0), "noise": MINORITY_NOISE}),
}


def dataset_dir(name: str) -> Path:
    """Folder of an embedded dataset (``embedded:compred``, the demo's; ``embedded:compred-minority``, the hard
    subset ``minority``), written under the cache root on first use."""
    folder, how = lookup(name, DATASETS)
    root = cache_root() / folder
    if not root.exists():
        write_dataset(root, **how)
    return root
