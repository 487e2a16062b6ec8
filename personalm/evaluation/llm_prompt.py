"""What the LLM judge (``llm_judge``) asks and how it reads the answers: the messages, the strict answer parser,
the stratified order items are judged in, and one verdict from both orders."""

from __future__ import annotations

import random
import re
from typing import Literal, Optional, Sequence

from personalm.data.prompt import subreddit
from personalm.evaluation.judge import Comparison, Verdict

MAX_TOKENS = 8  # room for "Answer: A" and nothing more
SYSTEM = "You are an expert on Reddit communities and what their members upvote."

# A single capital letter, optionally after "Answer:" and/or "Comment", inside quotes/asterisks,
# with a trailing period and surrounding whitespace. Nothing else (no "A or B", no lowercase "a").
_ANSWER = re.compile(r"""\s*(?i:answer\s*:\s*)?["'`*]*(?i:comment\s+)?([AB])["'`*]*\.?["'`*]*\s*""")


def build_messages(item: Comparison, first: str, second: str) -> list[dict[str, str]]:
    """Chat messages asking which of ``first`` (shown as A) and ``second`` (B) ``item.community`` upvotes more."""
    community = subreddit(item.community)
    user = (
        f"Here is a post in {community}.\n\nTitle: {item.title}\n\nPost: {item.post}\n\n"
        f"Comment A:\n{first}\n\nComment B:\n{second}\n\n"
        f"Which comment would be upvoted more in {community}? "
        'Answer with exactly one letter, "A" or "B", and nothing else.'
    )
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


def parse_answer(text: Optional[str]) -> Optional[Literal["A", "B"]]:
    """``"A"``/``"B"`` from a reply like ``A``, ``" B. "``, ``'"A"'``, ``Comment B``, ``Answer: A``; else None.

    Strict on purpose: hedged or verbose replies ("A or B", "Both", "I think A but B", "") are garbage,
    counted as such, never guessed.
    """
    match = _ANSWER.fullmatch(text or "")
    return match.group(1) if match else None  # type: ignore[return-value]


def judging_order(communities: Sequence[str], seed: int) -> list[int]:
    """The order items are judged in: one item of every community first, then the rest of each community spread
    evenly (systematic sampling within each community's seeded shuffle), so that every prefix is a stratified
    random sample: a budget that runs out leaves each community judged in proportion, and none left out."""
    rng = random.Random(f"judging order:{seed}")
    groups: dict[str, list[int]] = {}
    for i, community in enumerate(communities):
        groups.setdefault(community, []).append(i)
    keyed = []
    for community in sorted(groups):
        members = groups[community]
        rng.shuffle(members)
        offset = rng.random()
        keyed += [(rank > 0, (rank + offset) / len(members), i) for rank, i in enumerate(members)]
    return [i for *_, i in sorted(keyed)]


def combine(verdicts: Sequence[Verdict]) -> Verdict:
    """One item's verdict from its orders' (each mapped back to A = ``response_a``): a side wins where every order
    says so, a tie where they disagree, None where one failed."""
    if any(v is None for v in verdicts):
        return None
    return verdicts[0] if len(set(verdicts)) == 1 else "tie"
