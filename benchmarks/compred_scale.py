"""A ComPreD-format local copy of real size, for benchmarks: the finance train split's shape by default.

    python benchmarks/compred_scale.py --out /tmp/compred-finance [--rows 2245068 --shards 9]

Not Reddit data and not the demo's: random text in the Hub layout with every schema field, so that reading,
validation, subsampling and tokenization do the work they do on the real split. The shape is a parameter:
rows, shards, rows per parquet row group, pairs per post (geometric, mean ``pairs_per_post``), post and comment
lengths in words (log-normal medians and sigmas), and the share of pairs with ``score_ratio >= 2``. Posts are
long and comments shorter; a post's pairs share its text and draw from its few comments, as in ComPreD. Words
are drawn (Zipf-like) from the whole-word pieces of the tokenizer given, so a word is one to two tokens as in
English text. With the defaults the 9 shards hold about 1.2 GB, as the real finance split does.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

COMMUNITIES = ["personalfinance", "wallstreetbets", "Frugal", "investing"]


@dataclass(frozen=True)
class Shape:
    rows: int = 2_245_068
    shards: int = 9
    row_group_rows: int = 50_000
    pairs_per_post: float = 5.0
    post_median: float = 130.0
    post_sigma: float = 0.9
    comment_median: float = 40.0
    comment_sigma: float = 1.0
    title_words: int = 10
    ratio_2_share: float = 0.75
    seed: int = 0


def vocabulary(tokenizer_model: str = "", size: int = 8000) -> list[str]:
    """Whole-word pieces of a SentencePiece model (``▁word``), or a small built-in list without one."""
    if tokenizer_model:
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=tokenizer_model)
        words = [p[1:] for p in (sp.id_to_piece(i) for i in range(sp.get_piece_size()))
                 if p.startswith("▁") and p[1:].isalpha() and len(p) > 2]
        return words[:size]
    return ("the of and to in is it that for you was with on as have be at or this but not are from by they "
            "we an my one all there their what so up out if about who get which go me when make can like time no "
            "just him know take people into year your good some could them see other than then now look only come "
            "its over think also back after use two how our work first well way even new want because any these "
            "give day most us money fund index debt rent save invest market stock bond house loan credit").split()


class Text:
    """Texts of given word counts, cut from one long stream of Zipf-drawn words (fast: slices of a string)."""

    def __init__(self, words: list[str], rng: np.random.Generator, stream_words: int = 2_000_000):
        p = 1.0 / np.arange(1, len(words) + 1)
        picks = rng.choice(len(words), size=stream_words, p=p / p.sum())
        tokens = [words[i] for i in picks]
        self.stream = " ".join(tokens)
        self.starts = np.r_[0, np.cumsum([len(t) + 1 for t in tokens])[:-1]]
        self.rng = rng

    def make(self, counts: np.ndarray) -> list[str]:
        n = len(self.starts)
        first = self.rng.integers(0, n - int(counts.max()) - 1, size=len(counts))
        last = first + counts
        ends = self.starts[last] - 1
        return [self.stream[s:e] for s, e in zip(self.starts[first], ends)]


def lognormal_words(rng, n: int, median: float, sigma: float, most: int) -> np.ndarray:
    return np.clip(rng.lognormal(math.log(median), sigma, size=n).astype(np.int64), 1, most)


def write(out: Path, shape: Shape = Shape(), tokenizer_model: str = "") -> dict:
    """The train split as ``shape`` says (and small validation/test splits and prompts); returns sizes."""
    rng = np.random.default_rng(shape.seed)
    text = Text(vocabulary(tokenizer_model), rng)
    per_post = np.clip(rng.geometric(1 / shape.pairs_per_post, size=shape.rows // 2 + 16), 1, 60)
    n_posts = int(np.searchsorted(np.cumsum(per_post), shape.rows)) + 1
    per_post = per_post[:n_posts]
    per_post[-1] -= int(per_post.sum()) - shape.rows
    comments_per_post = np.maximum(2, np.ceil((1 + np.sqrt(1 + 8 * per_post)) / 2)).astype(np.int64)
    comment_base = np.r_[0, np.cumsum(comments_per_post)[:-1]]
    n_comments = int(comments_per_post.sum())
    folder = out / "finance"
    folder.mkdir(parents=True, exist_ok=True)
    post_of_row = np.repeat(np.arange(n_posts), per_post)
    rank = np.arange(shape.rows) - np.repeat(np.r_[0, np.cumsum(per_post)[:-1]], per_post)
    k = comments_per_post[post_of_row]
    a = rank % k
    b = (a + 1 + (rank // k) % (k - 1)) % k
    ca, cb = comment_base[post_of_row] + a, comment_base[post_of_row] + b
    score = rng.integers(1, 500, size=n_comments)
    bounds = np.linspace(0, shape.rows, shape.shards + 1).astype(np.int64)
    total = 0
    for shard in range(shape.shards):
        lo, hi = bounds[shard], bounds[shard + 1]
        posts = np.unique(post_of_row[lo:hi])
        comments = np.unique(np.r_[ca[lo:hi], cb[lo:hi]])
        post_index = {p: i for i, p in enumerate(posts.tolist())}
        comment_index = {c: i for i, c in enumerate(comments.tolist())}
        titles = pa.array(text.make(np.full(len(posts), shape.title_words)))
        bodies = pa.array(text.make(lognormal_words(rng, len(posts), shape.post_median, shape.post_sigma, 3000)))
        replies = pa.array(text.make(lognormal_words(rng, len(comments), shape.comment_median, shape.comment_sigma,
                                                     2000)))
        pi = pa.array([post_index[p] for p in post_of_row[lo:hi].tolist()])
        ia = pa.array([comment_index[c] for c in ca[lo:hi].tolist()])
        ib = pa.array([comment_index[c] for c in cb[lo:hi].tolist()])
        sa, sb = score[ca[lo:hi]], score[cb[lo:hi]]
        high = rng.random(hi - lo) < shape.ratio_2_share  # the share of pairs passing the paper's threshold
        sb = np.where(high, np.maximum(1, sa // 3), np.maximum(1, (sa * 0.8).astype(np.int64)))
        swap = rng.random(hi - lo) < 0.5
        sa, sb = np.where(swap, sb, sa), np.where(swap, sa, sb)
        community = np.array(COMMUNITIES)[post_of_row[lo:hi] % len(COMMUNITIES)]
        table = pa.table({
            "domain": pa.array([f"{c}_train" for c in community]),
            "post_id": pa.array([f"p{p:07d}" for p in post_of_row[lo:hi].tolist()]),
            "title": titles.take(pi), "history": bodies.take(pi),
            "c_root_id_A": pa.array([f"c{c}" for c in ca[lo:hi].tolist()]),
            "c_root_id_B": pa.array([f"c{c}" for c in cb[lo:hi].tolist()]),
            "created_at_utc_A": 1.6e9 + rng.random(hi - lo) * 1e7,
            "created_at_utc_B": 1.6e9 + rng.random(hi - lo) * 1e7,
            "score_A": sa, "score_B": sb, "human_ref_A": replies.take(ia), "human_ref_B": replies.take(ib),
            "labels": (sa > sb).astype(np.int64), "overlap_ratio": rng.random(hi - lo),
            "seconds_difference": rng.random(hi - lo) * 1e5,
            "score_ratio": np.maximum(sa, sb) / np.minimum(sa, sb), "len_ratio": 1 + rng.random(hi - lo),
        })
        path = folder / f"train_pref-{shard:05d}-of-{shape.shards:05d}.parquet"
        pq.write_table(table, path, row_group_size=shape.row_group_rows)
        total += path.stat().st_size
    small = pq.read_table(folder / f"train_pref-00000-of-{shape.shards:05d}.parquet").slice(0, 2000)
    for split in ("validation_pref", "test_pref"):
        pq.write_table(small, folder / f"{split}.parquet")
    prompts = out / "finance_test_prompts"
    prompts.mkdir(exist_ok=True)
    pq.write_table(small.select(["domain", "post_id", "title", "history"]), prompts / "test_prompts.parquet")
    return {"rows": shape.rows, "posts": n_posts, "comments": n_comments, "train_bytes": total}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokenizer_model", default="", help="a SentencePiece model whose whole words make the text")
    for name, value in vars(Shape()).items():
        ap.add_argument(f"--{name}", type=type(value), default=value)
    opts = vars(ap.parse_args())
    out, model = Path(opts.pop("out")), opts.pop("tokenizer_model")
    print(write(out, Shape(**opts), model))


if __name__ == "__main__":
    main()
