"""An LLM judge for :mod:`personalm.evaluation.judge`: any OpenAI-compatible ``/chat/completions`` endpoint.

As in ComPO (arXiv 2410.16027, judged with GPT-4), the judge sees the post in ``r/<community>`` and two
comments labelled A and B and is asked "Which comment would be upvoted more in r/<community>?", answering
with one letter. The shown order is shuffled per item (reproducibly under ``seed``) and mapped back.

Standard library only. The API key is read from the environment variable ``api_key_env`` when
:meth:`LLMJudge.judge` runs; it is never stored on the judge, logged, or put in an error message. It goes
to the configured URL only: a redirect is refused, not followed (urllib would copy the key to any host it
names), and ``http://`` is accepted for loopback addresses only (a local server), never to send a key in the
clear.

With a ``store`` every verdict is appended to a JSON-lines file the moment it arrives, keyed by the post,
its two texts and the judge's settings, and every call is recorded before it is made; a rerun reuses stored
verdicts and asks only for the missing ones, and the budget counts every call the store records, across
reruns. An item the endpoint refuses
(HTTP 400, 413, 422: a content filter, say) is a failed verdict, reported; 401, 403 and 404 abort at once.

Why not the ``openai`` client: its retries and backoff would replace a few lines, but the guarantees above
(refusals per item, never following a redirect to another host with the key, a budget across reruns) would
still be ours to write and test around it, and it would be one more dependency for one optional judge.
"""

from __future__ import annotations

import hashlib
import http.client
import ipaddress
import json
import os
import random
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Sequence

from personalm.evaluation.judge import Comparison, Verdict
from personalm.evaluation.verdicts import VerdictStore

MAX_TOKENS = 8  # room for "Answer: A" and nothing more
SYSTEM = "You are an expert on Reddit communities and what their members upvote."

# A single capital letter, optionally after "Answer:" and/or "Comment", inside quotes/asterisks,
# with a trailing period and surrounding whitespace. Nothing else (no "A or B", no lowercase "a").
_ANSWER = re.compile(r"""\s*(?i:answer\s*:\s*)?["'`*]*(?i:comment\s+)?([AB])["'`*]*\.?["'`*]*\s*""")


REFUSED_ITEM = (400, 413, 422)  # the endpoint will not judge this item: a failed verdict, the others go on
RETRIED = (408, 429)  # and 5xx


class LLMJudgeError(RuntimeError):
    """A configuration problem or a refusal by the endpoint (never carries the API key)."""


class _BudgetExhausted(Exception):
    pass


class _RefusedItem(Exception):
    pass


def _origin(url: str) -> tuple:
    parts = urllib.parse.urlsplit(url)
    return parts.scheme, parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)


def is_loopback(host: Optional[str]) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host or "").is_loopback
    except ValueError:
        return False


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """Refuses every redirect. urllib would copy ``Authorization`` to whatever host a 301/302/303 names (and
    turn the POST into a GET without its body); the key goes to the configured URL and nowhere else."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        target = urllib.parse.urljoin(req.full_url, newurl)
        where = "another host" if _origin(target) != _origin(req.full_url) else "another path"
        raise LLMJudgeError(f"endpoint {req.full_url} redirected (HTTP {code}) to {where}, "
                            f"{urllib.parse.urlsplit(target).netloc}{urllib.parse.urlsplit(target).path}: not "
                            "followed, the API key is sent to the configured URL only (set base_url to the "
                            "endpoint's own address)")


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

    ``max_calls`` bounds the HTTP requests (retries included), counting those a ``store`` records as spent
    by earlier runs; past it the remaining items get None and ``stats["budget_exhausted"]`` is True. HTTP
    408, 429, 5xx, timeouts and connection errors are retried up to ``max_retries`` times after
    ``backoff_s * 2**attempt`` seconds (``self.sleep``, replaceable in tests); 400, 413 and 422 make that
    item a failed verdict (``refused``); other 4xx raise :class:`LLMJudgeError`. After :meth:`judge`,
    ``self.stats`` holds ``calls``, ``retries``, ``failures`` (transport errors after retries, malformed
    bodies), ``garbage`` (unparsable answers), ``refused``, ``reused`` (verdicts read from the store),
    ``skipped`` (items left by the budget), ``swapped`` (items shown as B/A) and ``budget_exhausted``.
    """

    def __init__(self, base_url: str, model: str, api_key_env: str = "OPENAI_API_KEY", max_calls: int = 200,
                 max_retries: int = 4, backoff_s: float = 1.0, timeout_s: float = 60.0, seed: int = 0,
                 temperature: float = 0.0, store: Optional[str] = None) -> None:
        parts = urllib.parse.urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"base_url must be an http(s):// URL, got {base_url!r}")
        if parts.scheme == "http" and not is_loopback(parts.hostname):
            raise ValueError(f"base_url {base_url!r}: http:// would send the API key unencrypted; use https:// "
                             "(http:// is accepted for a loopback address only)")
        if max_calls < 0 or max_retries < 0:
            raise ValueError("max_calls and max_retries must be >= 0")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.api_key_env = model, api_key_env
        self.max_calls, self.max_retries, self.backoff_s = max_calls, max_retries, backoff_s
        self.timeout_s, self.seed, self.temperature = timeout_s, seed, temperature
        self.store_path = Path(store) if store else None
        self.sleep: Callable[[float], None] = time.sleep
        self.stats: dict[str, Any] = self._fresh_stats()
        self._store: Optional[VerdictStore] = None
        self._item = ""
        self._open = urllib.request.build_opener(_NoRedirects()).open

    def __repr__(self) -> str:
        return f"LLMJudge(url={self.url!r}, model={self.model!r}, api_key_env={self.api_key_env!r}, seed={self.seed})"

    @staticmethod
    def _fresh_stats() -> dict[str, Any]:
        return dict(calls=0, retries=0, failures=0, garbage=0, refused=0, reused=0, skipped=0, swapped=0,
                    budget_exhausted=False)

    def swapped(self, item: Comparison) -> bool:
        """Whether ``item`` is shown as (response_b, response_a); fixed by ``seed`` and ``post_id``."""
        return random.Random(f"{self.seed}:{item.post_id}").random() < 0.5

    def item_key(self, item: Comparison) -> str:
        """What a stored verdict answers: the item, its two texts, and the judge's settings and prompt."""
        settings = [self.url, self.model, self.temperature, self.seed, SYSTEM, build_messages(item, "{a}", "{b}")]
        blob = json.dumps([settings, item.post_id, item.response_a, item.response_b], sort_keys=True)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def judge(self, items: Sequence[Comparison]) -> list[Verdict]:
        """Which response of each item ``item.community`` would upvote more; None where the judge failed."""
        key = os.environ.get(self.api_key_env)
        if not key:
            raise LLMJudgeError(f"environment variable {self.api_key_env} (the API key for {self.url}) is not set")
        self.stats = self._fresh_stats()
        store = self._store = VerdictStore(self.store_path) if self.store_path else None
        self._spent_before = store.spent if store else 0
        verdicts: list[Verdict] = []
        for item in items:
            item_key = self._item = self.item_key(item)
            stored = store.get(item_key) if store else None
            if stored is not None:
                self.stats["reused"] += 1
                verdicts.append(stored["verdict"])
                continue
            if self.stats["budget_exhausted"]:
                verdicts.append(None)
                self.stats["skipped"] += 1
                continue
            status, verdict = self._judge_one(item, key)
            if status == "skipped":
                verdicts.append(None)
                continue
            if store is not None:
                store.add(item_key, status, verdict)
            verdicts.append(verdict)
        return verdicts

    def _judge_one(self, item: Comparison, key: str) -> tuple[str, Verdict]:
        """(status, verdict): ``ok``, ``garbage``, ``refused``, ``failed`` or ``skipped`` (budget)."""
        swap = self.swapped(item)
        first, second = (item.response_b, item.response_a) if swap else (item.response_a, item.response_b)
        payload = {"model": self.model, "messages": build_messages(item, first, second),
                   "temperature": self.temperature, "max_tokens": MAX_TOKENS}
        try:
            reply = self._complete(payload, key)
        except _BudgetExhausted:
            self.stats["budget_exhausted"] = True
            self.stats["skipped"] += 1
            return "skipped", None
        except _RefusedItem:
            self.stats["refused"] += 1
            return "refused", None
        self.stats["swapped"] += swap  # items actually shown in B/A order
        if reply is None:
            self.stats["failures"] += 1
            return "failed", None
        answer = parse_answer(reply)
        if answer is None:
            self.stats["garbage"] += 1
            return "garbage", None
        return "ok", ("B" if answer == "A" else "A") if swap else answer

    def _complete(self, payload: dict[str, Any], key: str) -> Optional[str]:
        """The reply text, or None after a malformed body or retries exhausted; raises on refusal/budget."""
        data = json.dumps(payload).encode("utf-8")
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {key}"}
        for attempt in range(self.max_retries + 1):
            if self._spent_before + self.stats["calls"] >= self.max_calls:
                raise _BudgetExhausted
            if attempt:
                self.stats["retries"] += 1
                self.sleep(self.backoff_s * 2 ** (attempt - 1))
            self.stats["calls"] += 1
            if self._store is not None:
                self._store.spend(self._item)
            request = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
            try:
                with self._open(request, timeout=self.timeout_s) as response:
                    body = response.read()
            except urllib.error.HTTPError as error:
                if error.code in RETRIED or error.code >= 500:
                    continue
                if error.code in REFUSED_ITEM:
                    raise _RefusedItem from None
                raise LLMJudgeError(self._refusal(error, key)) from None
            except LLMJudgeError:
                raise
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
