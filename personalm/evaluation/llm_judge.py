"""An LLM judge for :mod:`personalm.evaluation.judge`: any OpenAI-compatible ``/chat/completions`` endpoint.

As in ComPO (arXiv 2410.16027, judged with GPT-4), the judge sees the post in ``r/<community>`` and two
comments labelled A and B and is asked "Which comment would be upvoted more in r/<community>?", answering
with one letter. The shown order is shuffled per item (reproducibly under ``seed``) and mapped back.

Standard library only. The API key is read from the environment variable ``api_key_env`` when
:meth:`LLMJudge.judge` runs; it is never stored on the judge, logged, or put in an error message.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import re
import time
import urllib.error
import urllib.request
from typing import Any, Callable, Literal, Optional, Sequence

from personalm.evaluation.judge import Comparison, Verdict

MAX_TOKENS = 8  # room for "Answer: A" and nothing more
SYSTEM = "You are an expert on Reddit communities and what their members upvote."

# A single capital letter, optionally after "Answer:" and/or "Comment", inside quotes/asterisks,
# with a trailing period and surrounding whitespace. Nothing else (no "A or B", no lowercase "a").
_ANSWER = re.compile(r"""\s*(?i:answer\s*:\s*)?["'`*]*(?i:comment\s+)?([AB])["'`*]*\.?["'`*]*\s*""")


class LLMJudgeError(RuntimeError):
    """A configuration problem or a refusal by the endpoint (never carries the API key)."""


class _BudgetExhausted(Exception):
    pass


def _community(community: str) -> str:
    return community if community.startswith("r/") else f"r/{community}"


def build_messages(item: Comparison, first: str, second: str) -> list[dict[str, str]]:
    """Chat messages asking which of ``first`` (shown as A) and ``second`` (B) ``item.community`` upvotes more."""
    community = _community(item.community)
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


class LLMJudge:
    """Judges :class:`Comparison` items one by one with a chat model; implements ``personalm.evaluation.judge.Judge``.

    ``max_calls`` bounds the HTTP requests (retries included) of one :meth:`judge` call; past it the
    remaining items get None and ``stats["budget_exhausted"]`` is True. HTTP 429, 5xx, timeouts and
    connection errors are retried up to ``max_retries`` times after ``backoff_s * 2**attempt`` seconds
    (``self.sleep``, replaceable in tests); other 4xx raise :class:`LLMJudgeError`. After :meth:`judge`,
    ``self.stats`` holds ``calls``, ``retries``, ``failures`` (transport errors after retries, malformed
    bodies), ``garbage`` (unparsable answers), ``skipped`` (items left by the budget), ``swapped`` (items
    shown as B/A) and ``budget_exhausted``.
    """

    def __init__(self, base_url: str, model: str, api_key_env: str = "OPENAI_API_KEY", max_calls: int = 200,
                 max_retries: int = 4, backoff_s: float = 1.0, timeout_s: float = 60.0, seed: int = 0,
                 temperature: float = 0.0) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {base_url!r}")
        if max_calls < 0 or max_retries < 0:
            raise ValueError("max_calls and max_retries must be >= 0")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.api_key_env = model, api_key_env
        self.max_calls, self.max_retries, self.backoff_s = max_calls, max_retries, backoff_s
        self.timeout_s, self.seed, self.temperature = timeout_s, seed, temperature
        self.sleep: Callable[[float], None] = time.sleep
        self.stats: dict[str, Any] = self._fresh_stats()

    def __repr__(self) -> str:
        return f"LLMJudge(url={self.url!r}, model={self.model!r}, api_key_env={self.api_key_env!r}, seed={self.seed})"

    @staticmethod
    def _fresh_stats() -> dict[str, Any]:
        return dict(calls=0, retries=0, failures=0, garbage=0, skipped=0, swapped=0, budget_exhausted=False)

    def swapped(self, item: Comparison) -> bool:
        """Whether ``item`` is shown as (response_b, response_a); fixed by ``seed`` and ``post_id``."""
        return random.Random(f"{self.seed}:{item.post_id}").random() < 0.5

    def judge(self, items: Sequence[Comparison]) -> list[Verdict]:
        """Which response of each item ``item.community`` would upvote more; None where the judge failed."""
        key = os.environ.get(self.api_key_env)
        if not key:
            raise LLMJudgeError(f"environment variable {self.api_key_env} (the API key for {self.url}) is not set")
        self.stats = self._fresh_stats()
        verdicts: list[Verdict] = []
        for item in items:
            if self.stats["budget_exhausted"]:
                verdicts.append(None)
                self.stats["skipped"] += 1
                continue
            swap = self.swapped(item)
            first, second = (item.response_b, item.response_a) if swap else (item.response_a, item.response_b)
            payload = {"model": self.model, "messages": build_messages(item, first, second),
                       "temperature": self.temperature, "max_tokens": MAX_TOKENS}
            try:
                reply = self._complete(payload, key)
            except _BudgetExhausted:
                self.stats["budget_exhausted"] = True
                self.stats["skipped"] += 1
                verdicts.append(None)
                continue
            self.stats["swapped"] += swap  # items actually shown in B/A order
            answer = None if reply is None else parse_answer(reply)
            if reply is None:
                self.stats["failures"] += 1
            elif answer is None:
                self.stats["garbage"] += 1
            if answer is not None and swap:
                answer = "B" if answer == "A" else "A"
            verdicts.append(answer)
        return verdicts

    def _complete(self, payload: dict[str, Any], key: str) -> Optional[str]:
        """The reply text, or None after a malformed body or retries exhausted; raises on refusal/budget."""
        data = json.dumps(payload).encode("utf-8")
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {key}"}
        for attempt in range(self.max_retries + 1):
            if self.stats["calls"] >= self.max_calls:
                raise _BudgetExhausted
            if attempt:
                self.stats["retries"] += 1
                self.sleep(self.backoff_s * 2 ** (attempt - 1))
            self.stats["calls"] += 1
            request = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    body = response.read()
            except urllib.error.HTTPError as error:
                if error.code == 429 or error.code >= 500:
                    continue
                raise LLMJudgeError(self._refusal(error, key)) from None
            except (OSError, http.client.HTTPException):  # timeouts, refused/reset connections
                continue
            return _content(body)
        return None

    def _refusal(self, error: urllib.error.HTTPError, key: str) -> str:
        try:
            detail = error.read(300).decode("utf-8", "replace").strip()
        except Exception:  # noqa: BLE001 - the detail is a courtesy
            detail = ""
        message = f"endpoint {self.url} refused the request: HTTP {error.code} {error.reason}"
        return (message + (f": {detail}" if detail else "")).replace(key, "***")


def _content(body: bytes) -> Optional[str]:
    """``choices[0].message.content`` of a chat completions response body, or None if it is malformed."""
    try:
        content = json.loads(body)["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        return None
    return content if isinstance(content, str) else None
