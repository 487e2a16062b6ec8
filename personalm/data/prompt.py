"""The one prompt template, used for SFT, DPO, reward modelling and generation alike.

ComPO (arXiv 2410.16027) conditions the model on the community by naming it in the prompt:

    <|domain|>\n{community}\n<|user|>\n{title}\n{post}\n<|assistant|>\n{response}<eos>

``{community}`` is ``r/<subreddit>`` when contextualized and the literal ``Reddit`` when not.
The markers are plain text, not special tokens, as in the original. The original code had three
diverging copies of this template; every stage here calls the functions below.
"""

from __future__ import annotations

import re
import zlib
from typing import Sequence

NO_CONTEXT = "Reddit"
_SPLIT_SUFFIX = re.compile(r"_(train|validation|valid|val|test)$", re.IGNORECASE)


def normalize_domain(domain: str) -> str:
    """Subreddit name from a ComPreD/SHP ``domain``: ``askhistorians_train`` -> ``askhistorians``.

    Leading ``r/`` and surrounding whitespace are removed too; case is kept (``AskHistorians``).
    """
    name = domain.strip()
    if name.lower().startswith("r/"):
        name = name[2:]
    return _SPLIT_SUFFIX.sub("", name)


def subreddit(name: str) -> str:
    """A community as Reddit writes it, ``r/<name>`` (a name that has its ``r/`` already is kept as it is)."""
    return name if name.startswith("r/") else f"r/{name}"


def community_string(name: str, contextualize: bool) -> str:
    """What stands in the ``{community}`` slot: ``r/<name>`` or ``Reddit``."""
    if not isinstance(contextualize, bool):  # the original parsed "False" as true
        raise TypeError(f"contextualize must be a bool, got {contextualize!r}")
    return subreddit(name) if contextualize else NO_CONTEXT


def random_other_community(subreddit: str, post_id: str, communities: Sequence[str], seed: int) -> str:
    """A community other than ``subreddit``, drawn reproducibly from ``communities``.

    The draw depends only on (seed, post_id), so every pair of a post and its generation prompt get
    the same stand-in, on every run and in every process.
    """
    others = sorted(c for c in set(communities) if c != subreddit)
    if not others:
        raise ValueError(
            f"random-community ablation needs at least two communities in the data; found only {subreddit!r}"
        )
    return others[zlib.crc32(f"{seed}:{post_id}".encode()) % len(others)]


def prompt_parts(community: str, title: str, post: str) -> tuple[str, str, str, str]:
    """The template's prompt cut where truncation may act: (head, title, post, tail).

    ``head + title + "\\n" + post + tail`` is the whole prompt. Truncation shortens only ``post``.
    """
    head = f"<|domain|>\n{community}\n<|user|>\n"
    return head, f"{title}\n", post, "\n<|assistant|>\n"


def format_prompt(community: str, title: str, post: str) -> str:
    """The whole prompt as text (for display and for the predictions file)."""
    return "".join(prompt_parts(community, title, post))
