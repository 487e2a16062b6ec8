"""The synthetic data's own judge: on ``embedded:*`` data each community's taste is known, so a win is a fact.

The synthetic generator (``personalm.data.synthetic``) writes every comment from one of a subset's comment styles
(a template with slots) and gives each community a ranking of the styles. :class:`SyntheticJudge` reads which style
a response is (it starts with one of the style's templates, any slot values, whitespace as it comes, anything after
it: the longer comments of the benchmarks' lengths) and lets the true community's ranking decide: the better-ranked
style wins, the same style is a tie. A response that is none of the styles (a garbled or mixed template) ranks
below every style: the community never saw it, and no vote in the data puts it above one of its comments; two such
responses tie. ``stats`` counts those responses per side, so a report can say how many there were.

A reward or LLM judge is a model of the community's votes and can be wrong; on synthetic data this one cannot, so
the study uses it where the figures are the evidence (``judge: synthetic``, ``configs/study/minority.yaml``) and a
reward judge's win rates can be checked against it.
"""

from __future__ import annotations

import re
from typing import Optional, Sequence

from personalm.data.synthetic_texts import RANKINGS, SUBSETS
from personalm.evaluation.judge import Comparison, Verdict


def style_pattern(templates: Sequence[str], slots: dict[str, list[str]]) -> re.Pattern:
    """A pattern matching the start of a text written from any of ``templates`` with any of its slots' values."""
    def one(template: str) -> str:
        parts = re.split(r"\{(\w+)\}", template)  # text, slot, text, slot, ..., text
        out = []
        for i, part in enumerate(parts):
            if i % 2:
                out.append("(?:" + "|".join(re.escape(v) for v in sorted(slots[part], key=len, reverse=True)) + ")")
            else:
                out.append(r"\s+".join(re.escape(w) for w in part.split(" ")))
        return "".join(out)
    return re.compile(r"\s*(?:" + "|".join(one(t) for t in templates) + r")(?:\s|$)")


class SyntheticJudge:
    """``personalm.evaluation.judge.Judge`` for the synthetic subsets ``subsets`` (e.g. ``["finance", "history"]``
    for ``embedded:compred``, ``["minority"]`` for ``embedded:compred-minority``): the true community's ranking of
    the two responses' comment styles decides."""

    def __init__(self, subsets: Sequence[str]):
        unknown = [s for s in subsets if s not in SUBSETS]
        if unknown or not subsets:
            raise ValueError(f"synthetic judge: subsets {list(subsets)}: each must be one of the synthetic data's "
                             f"{sorted(SUBSETS)}")
        self.patterns: dict[str, list[re.Pattern]] = {}  # community (r/<name>) -> its subset's style patterns
        self.rankings: dict[str, tuple[int, ...]] = {}   # community -> style indices, best first
        for subset in subsets:
            spec = SUBSETS[subset]
            patterns = [style_pattern(t, spec["style_slots"]) for t in spec["styles"]]
            for community, ranking in zip(spec["communities"], spec.get("rankings", RANKINGS)):
                name = f"r/{community}"
                if name in self.rankings and (self.rankings[name], [p.pattern for p in self.patterns[name]]) != \
                        (tuple(ranking), [p.pattern for p in patterns]):
                    raise ValueError(f"synthetic judge: {name} has another taste in each of {list(subsets)}; "
                                     f"judge one of them at a time")
                self.patterns[name], self.rankings[name] = patterns, tuple(ranking)
        self.stats = {"unrecognized": {"a": 0, "b": 0}, "judged": 0}

    def style(self, community: str, text: str) -> Optional[int]:
        """The comment style ``text`` is written in, or None when it is none of the community's subset's styles."""
        found = [i for i, p in enumerate(self.patterns[community]) if p.match(text)]
        return found[0] if len(found) == 1 else None

    def rank(self, community: str, text: str) -> int:
        """Where ``text``'s style stands in ``community``'s ranking (0: its favourite); below all when no style."""
        if community not in self.rankings:
            raise ValueError(f"synthetic judge: no synthetic community {community!r} (known: "
                             f"{', '.join(sorted(self.rankings))}): is the study's dataset the synthetic one?")
        style = self.style(community, text)
        return len(self.rankings[community]) if style is None else self.rankings[community].index(style)

    def judge(self, items: Sequence[Comparison]) -> list[Verdict]:
        verdicts: list[Verdict] = []
        worst = {c: len(r) for c, r in self.rankings.items()}
        for item in items:
            a, b = self.rank(item.community, item.response_a), self.rank(item.community, item.response_b)
            self.stats["unrecognized"]["a"] += a == worst[item.community]
            self.stats["unrecognized"]["b"] += b == worst[item.community]
            self.stats["judged"] += 1
            verdicts.append("A" if a < b else "B" if a > b else "tie")
        return verdicts
