"""The synthetic data's own judge: on ``embedded:*`` data each community's taste is known, so a win is a fact.

The synthetic generator (``personalm.data.synthetic``) writes every comment from one of a subset's comment styles
(a template with slots) and gives each community a ranking of the styles. :class:`SyntheticJudge` reads which style
a response is written in by how it opens: the first four words of one of the style's templates (any slot values,
whitespace as it comes), as a reader knows "YOLO it on GME..." for the bold style before the end; a generation cut
by its token budget, or one that drifts after its opening, keeps its style. The true community's ranking then
decides: the better-ranked style wins, the same style is a tie. A response that opens none of the styles (a garbled
opening, an empty text) ranks below every style, as no vote in the data puts such a text above one of its comments;
two such responses tie. ``stats`` counts, per side, the responses of no style and those that open a style without
starting with one of its templates in full (``incomplete``), so a report can say how many there were.

A reward or LLM judge is a model of the community's votes and can be wrong; on synthetic data this one is not, so
the study uses it where the figures are the evidence (``judge: synthetic``, ``configs/study/minority.yaml``) and a
reward judge's win rates can be checked against it (``benchmarks/judge_agreement.py``).
"""

from __future__ import annotations

import re
from typing import Optional, Sequence

from personalm.data.synthetic_texts import RANKINGS, SUBSETS
from personalm.evaluation.judge import Comparison, Verdict

OPENING_WORDS = 4  # the words of a template that name its style (every opening of the synthetic data is distinct)


def style_pattern(templates: Sequence[str], slots: dict[str, list[str]], words: Optional[int] = None) -> re.Pattern:
    """A pattern matching the start of a text written from any of ``templates`` (their first ``words`` words, or
    all of them) with any of its slots' values, followed by whitespace or the end."""
    def one(template: str) -> str:
        template = " ".join(template.split(" ")[:words])
        parts = re.split(r"\{(\w+)\}", template)  # text, slot, text, slot, ..., text
        out = []
        for i, part in enumerate(parts):
            words_of = slots[part] if i % 2 else [part]  # a slot's values, or the text between slots
            out.append("(?:" + "|".join(r"\s+".join(map(re.escape, w.split(" "))) for w in words_of) + ")")
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
        self.openings: dict[str, list[re.Pattern]] = {}  # community (r/<name>) -> per style, its openings
        self.templates: dict[str, list[re.Pattern]] = {}  # community -> per style, its templates in full
        self.rankings: dict[str, tuple[int, ...]] = {}    # community -> style indices, best first
        for subset in subsets:
            spec = SUBSETS[subset]
            openings = [style_pattern(t, spec["style_slots"], OPENING_WORDS) for t in spec["styles"]]
            templates = [style_pattern(t, spec["style_slots"]) for t in spec["styles"]]
            for community, ranking in zip(spec["communities"], spec.get("rankings", RANKINGS)):
                name = f"r/{community}"
                if name in self.rankings and (self.rankings[name], [p.pattern for p in self.openings[name]]) != \
                        (tuple(ranking), [p.pattern for p in openings]):
                    raise ValueError(f"synthetic judge: {name} has another taste in each of {list(subsets)}; "
                                     f"judge one of them at a time")
                self.openings[name], self.templates[name], self.rankings[name] = openings, templates, tuple(ranking)
        self.stats = {"no_style": {"a": 0, "b": 0}, "incomplete": {"a": 0, "b": 0}, "judged": 0}

    def style(self, community: str, text: str) -> Optional[int]:
        """The comment style ``text`` opens with, or None when it opens none of the community's subset's styles."""
        found = [i for i, p in enumerate(self.openings[community]) if p.match(text)]
        return found[0] if len(found) == 1 else None

    def complete(self, community: str, text: str, style: int) -> bool:
        """Whether ``text`` starts with one of ``style``'s templates in full (not cut short, not drifting after its
        opening; what follows the template after whitespace does not matter, as the lengthened comments have)."""
        return bool(self.templates[community][style].match(text))

    def rank(self, community: str, style: Optional[int]) -> int:
        """Where ``style`` stands in ``community``'s ranking (0: its favourite); below all for no style (None)."""
        return len(self.rankings[community]) if style is None else self.rankings[community].index(style)

    def judge(self, items: Sequence[Comparison]) -> list[Verdict]:
        verdicts: list[Verdict] = []
        for item in items:
            if item.community not in self.rankings:
                raise ValueError(f"synthetic judge: post {item.post_id!r}: no synthetic community {item.community!r} "
                                 f"(known: {', '.join(sorted(self.rankings))}): is the study's dataset the synthetic "
                                 f"one?")
            ranks = []
            for side, text in (("a", item.response_a), ("b", item.response_b)):
                style = self.style(item.community, text)
                ranks.append(self.rank(item.community, style))
                self.stats["no_style"][side] += style is None
                self.stats["incomplete"][side] += style is not None and not self.complete(item.community, text, style)
            self.stats["judged"] += 1
            verdicts.append("A" if ranks[0] < ranks[1] else "B" if ranks[0] > ranks[1] else "tie")
        return verdicts
