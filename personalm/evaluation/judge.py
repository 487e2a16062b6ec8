"""Pairwise judging of two systems' predictions, post by post, with per-community win rates and CIs.

Read two prediction files (:func:`read_predictions`), pair them by post (:func:`align`), let a
:class:`Judge` pick a winner per post (:func:`run_judge`), count (:func:`tally`) and put bootstrap
confidence intervals on the win rates (:func:`bootstrap_ci`); :func:`compare` does all of it.
"""

from __future__ import annotations

import math
import os
import zlib
from dataclasses import dataclass
from typing import Literal, Optional, Protocol, Sequence, Union

import numpy as np

from personalm.jsonl import JSONLineError, read_jsonl
from personalm.paths import write_atomically

Verdict = Optional[Literal["A", "B", "tie"]]  # None: the judge failed on this item (counted, reported)


@dataclass(frozen=True)
class Comparison:
    """One test post and the two systems' responses to it. ``community`` is the true one, ``r/<name>``."""

    post_id: str
    community: str
    title: str
    post: str
    response_a: str
    response_b: str


class Judge(Protocol):
    """Anything that says, per item, which response the community would upvote more."""

    def judge(self, items: Sequence[Comparison]) -> list[Verdict]: ...


PathLike = Union[str, "os.PathLike[str]"]
FIELDS = ("post_id", "community", "prompt_community", "title", "post", "prompt", "response")
_SCORE = {"A": 1.0, "tie": 0.5, "B": 0.0}


class PredictionFileError(ValueError):
    """A prediction file that is missing or not one valid prediction per line."""


class AlignmentError(ValueError):
    """Two prediction files that do not hold the same posts."""


def read_predictions(path: PathLike) -> dict[str, dict]:
    """The rows of a predict JSONL file by ``post_id``; every field of :data:`FIELDS` must be a string."""
    if not os.path.isfile(path):
        raise PredictionFileError(f"{path}: prediction file not found")
    rows: dict[str, dict] = {}
    lines: dict[str, int] = {}
    try:
        for lineno, row in read_jsonl(path):
            where = f"{path}:{lineno}"
            if not isinstance(row, dict):
                raise PredictionFileError(f"{where}: expected a JSON object, got {type(row).__name__}")
            for field in FIELDS:
                if field not in row:
                    raise PredictionFileError(f"{where}: missing field {field!r}")
                if not isinstance(row[field], str):
                    raise PredictionFileError(f"{where}: field {field!r} must be a string, "
                                              f"got {type(row[field]).__name__}")
            post_id = row["post_id"]
            if post_id in rows:
                raise PredictionFileError(f"{where}: post_id {post_id!r} already on line {lines[post_id]}")
            rows[post_id], lines[post_id] = row, lineno
    except JSONLineError as err:
        raise PredictionFileError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
    return rows


def _examples(ids: list[str], k: int = 3) -> str:
    return ", ".join(map(repr, ids[:k])) + (", ..." if len(ids) > k else "")


def align(a: dict[str, dict], b: dict[str, dict], path_a: PathLike, path_b: PathLike,
          intersect: bool = False) -> tuple[list[Comparison], dict[str, int]]:
    """Pair the two files' rows by post, sorted by ``post_id``, and report how many posts each had.

    Different post sets are an error unless ``intersect``, which compares the shared posts only.
    """
    only_a, only_b = sorted(a.keys() - b.keys()), sorted(b.keys() - a.keys())
    common = sorted(a.keys() & b.keys())
    if (only_a or only_b) and not intersect:
        raise AlignmentError(
            f"{path_a} and {path_b} hold different posts: {len(only_a)} only in {path_a}"
            f"{' (' + _examples(only_a) + ')' if only_a else ''}, {len(only_b)} only in {path_b}"
            f"{' (' + _examples(only_b) + ')' if only_b else ''}; "
            f"pass intersect=True to compare the {len(common)} shared posts")
    if not common:
        raise AlignmentError(f"{path_a} and {path_b} have no posts in common")
    clash = [p for p in common if a[p]["community"] != b[p]["community"]]
    if clash:
        p = clash[0]
        raise AlignmentError(f"{len(clash)} posts have a different true community in {path_a} and {path_b}, "
                             f"e.g. {p!r}: {a[p]['community']!r} vs {b[p]['community']!r}")
    items = [Comparison(p, a[p]["community"], a[p]["title"], a[p]["post"], a[p]["response"], b[p]["response"])
             for p in common]
    info = {"posts_a": len(a), "posts_b": len(b), "compared": len(common),
            "only_a": len(only_a), "only_b": len(only_b)}
    return items, info


def run_judge(items: Sequence[Comparison], judge: Judge) -> list[Verdict]:
    """The judge's verdicts for ``items``, checked: one per item, each "A", "B", "tie" or None."""
    verdicts = list(judge.judge(items))
    if len(verdicts) != len(items):
        raise ValueError(f"the judge returned {len(verdicts)} verdicts for {len(items)} items")
    for item, verdict in zip(items, verdicts):
        if verdict is not None and verdict not in _SCORE:
            raise ValueError(f"the judge returned {verdict!r} for post {item.post_id!r}; expected A, B, tie or None")
    return verdicts


def outcomes(verdicts: Sequence[Verdict]) -> np.ndarray:
    """1 (A wins), 0.5 (tie) or 0 (B wins) per verdict; failed (None) verdicts are left out."""
    return np.array([_SCORE[v] for v in verdicts if v is not None], dtype=float)


def _by_community(items: Sequence[Comparison], verdicts: Sequence[Verdict]) -> dict[str, list[Verdict]]:
    if len(items) != len(verdicts):
        raise ValueError(f"{len(verdicts)} verdicts for {len(items)} items")
    groups: dict[str, list[Verdict]] = {}
    for item, verdict in zip(items, verdicts):
        groups.setdefault(item.community, []).append(verdict)
    return {c: groups[c] for c in sorted(groups)}


def _counts(verdicts: Sequence[Verdict]) -> dict:
    """Counts and win rate (wins + ties / 2) / decided, None when nothing was decided; n counts failed too."""
    scores = outcomes(verdicts)
    return {"wins": int((scores == 1).sum()), "ties": int((scores == 0.5).sum()),
            "losses": int((scores == 0).sum()), "failed": len(verdicts) - scores.size, "n": len(verdicts),
            "win_rate": float(scores.mean()) if scores.size else None}


def tally(items: Sequence[Comparison], verdicts: Sequence[Verdict]) -> dict:
    """Win/tie/loss/failed counts and win rate of A over B: ``{"overall": ..., "communities": {c: ...}}``."""
    groups = _by_community(items, verdicts)
    return {"overall": _counts(verdicts), "communities": {c: _counts(v) for c, v in groups.items()}}


def bootstrap_ci(outcomes: np.ndarray, n_boot: int = 1000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``outcomes`` (the win rate), resampling posts."""
    x = np.asarray(outcomes, dtype=float)
    if x.size == 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def _ci(verdicts: Sequence[Verdict], n_boot: int, seed: int) -> list[Optional[float]]:
    return [None if math.isnan(v) else v for v in bootstrap_ci(outcomes(verdicts), n_boot, seed)]


def community_seed(seed: int, community: str) -> int:
    """The bootstrap seed of one community: fixed by (seed, community), not by the order of communities."""
    return zlib.crc32(f"{seed}:{community}".encode("utf-8"))


def compare(path_a: PathLike, path_b: PathLike, judge: Judge, *, name_a: str = "A", name_b: str = "B",
            seed: int = 0, n_boot: int = 1000, intersect: bool = False) -> dict:
    """Judge system A's predictions against B's, post by post: counts, win rates and 95% CIs, as JSON-able dict.

    Undefined rates and CIs (nothing decided) are None.
    """
    items, info = align(read_predictions(path_a), read_predictions(path_b), path_a, path_b, intersect)
    verdicts = run_judge(items, judge)
    counts = tally(items, verdicts)
    groups = _by_community(items, verdicts)
    return {"a": name_a, "b": name_b, "files": {"a": str(path_a), "b": str(path_b)}, "alignment": info,
            "overall": {**counts["overall"], "ci95": _ci(verdicts, n_boot, seed)},
            "communities": {c: {**counts["communities"][c], "ci95": _ci(v, n_boot, community_seed(seed, c))}
                            for c, v in groups.items()},
            "seed": seed, "n_boot": n_boot}


def plot_win_rates(results: Sequence[dict], path: PathLike, title: Optional[str] = None) -> None:
    """One PNG: per-community (and overall) win rates with 95% CI bars, one bar per comparison in ``results``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = ["all"] + sorted({c for r in results for c in r["communities"]}, reverse=True)
    height = 0.8 / len(results)
    fig, ax = plt.subplots(figsize=(7, 1 + 0.25 * len(rows) * len(results) + 0.3 * len(rows)))
    for j, r in enumerate(results):
        stats = [r["overall"] if c == "all" else r["communities"].get(c, {}) for c in rows]
        rate = np.array([s.get("win_rate") for s in stats], dtype=float)  # None -> nan: no bar
        ci = np.array([s.get("ci95") or [None, None] for s in stats], dtype=float)
        y = np.arange(len(rows)) - 0.4 + height * (len(results) - j - 0.5)
        err = np.clip([rate - ci[:, 0], ci[:, 1] - rate], 0, None)  # distances from the rate to the CI ends
        ax.barh(y, rate, height, xerr=err, capsize=3, label=f"{r['a']} vs {r['b']}")
    ax.axvline(0.5, color="grey", linestyle="--", linewidth=1)
    ax.set(yticks=np.arange(len(rows)), yticklabels=rows, xlim=(0, 1), ylabel="community",
           xlabel="win rate of the first system (ties count half), 95% bootstrap CI")
    fig.legend(*ax.get_legend_handles_labels(), loc="lower center", ncol=2, fontsize="small", frameon=False)
    if title:
        ax.set_title(title)
    fig.tight_layout(rect=(0, 0.04, 1, 1))  # room for the legend below the axes
    try:
        write_atomically(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120), ".png")
    finally:
        plt.close(fig)


def _fmt(x: Optional[float]) -> str:
    return "–" if x is None else f"{x:.3f}"


def format_table(result: dict) -> str:
    """A Markdown table of :func:`compare`'s result: one row per community and an "all" row."""
    lines = [f"| community | n | wins | ties | losses | win rate ({result['a']} vs {result['b']}) | 95% CI |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for name, s in [*result["communities"].items(), ("**all**", result["overall"])]:
        lo, hi = s["ci95"]
        ci = "–" if lo is None else f"[{_fmt(lo)}, {_fmt(hi)}]"
        lines.append(f"| {name} | {s['n']} | {s['wins']} | {s['ties']} | {s['losses']} "
                     f"| {_fmt(s['win_rate'])} | {ci} |")
    stats = (result.get("judge") or {}).get("stats") or {}
    if result["overall"]["failed"]:
        skipped = (f", {stats['skipped']} of them posts the call budget left unjudged (those judged are a random "
                   "sample stratified by community)") if stats.get("skipped") else ""
        lines.append(f"\n{result['overall']['failed']} failed verdicts are counted in n but not in the win "
                     f"rates{skipped}.")
    if stats.get("orders") == "both":
        lines.append(f"\nEach post judged in both orders: a win only where both agree, else a tie "
                     f"({stats.get('disagreed', 0)} posts whose two orders disagreed).")
    return "\n".join(lines)
