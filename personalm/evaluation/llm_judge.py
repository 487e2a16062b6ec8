"""An LLM judge for :mod:`personalm.evaluation.judge`: any OpenAI-compatible ``/chat/completions`` endpoint.

As in ComPO (arXiv 2410.16027, judged with GPT-4), the judge sees the post in ``r/<community>`` and two
comments labelled A and B and is asked "Which comment would be upvoted more in r/<community>?", answering
with one letter. With ``orders: one`` each item is shown in one order, drawn per item under ``seed``, and mapped
back, so position bias only averages out; with ``orders: both`` each item is shown in both orders and a side wins
only where the two answers agree, else it is a tie (MT-Bench's conservative rule): a judge that always answers
"A" then gives every item a tie.

Calls go through the ``openai`` client, ``concurrency`` at a time, with our own retries (the client's are off:
``max_retries=0``) so that these hold:

- the API key is read from the environment variable ``api_key_env`` when :meth:`LLMJudge.judge` runs; it is never
  kept on the judge, logged, or put in an error message. It goes to the configured URL only: a redirect is
  refused, not followed (``DefaultHttpxClient(follow_redirects=False)``; a followed redirect would take the
  key to whatever host it names), and ``http://`` is accepted for loopback addresses only;
- with a ``store`` every call is recorded before it is sent and every verdict as it arrives (``verdicts.py``);
  a rerun reuses stored verdicts and asks only for the missing ones, and ``max_calls`` counts every call the
  store records, across reruns (retries too; under ``orders: both`` each order is a call and part of the key);
- an item the endpoint refuses (HTTP 400, 413, 422: a content filter, say) is a failed verdict, reported; 401,
  403 and 404 abort at once; 408, 429, 5xx, timeouts and connection errors are retried with backoff.

Items are judged in a seeded random order stratified by community (``llm_prompt.judging_order``): where
``max_calls`` runs out, the items judged are a random sample with every community in it and each in proportion,
not the first posts by id.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import random
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any, Callable, Literal, Optional, Sequence

from personalm.evaluation.judge import Comparison, Verdict
from personalm.evaluation.llm_prompt import MAX_TOKENS, SYSTEM, build_messages, combine, judging_order, parse_answer
from personalm.evaluation.verdicts import VerdictStore

REFUSED_ITEM = (400, 413, 422)  # the endpoint will not judge this item: a failed verdict, the others go on
RETRIED = (408, 429)  # and 5xx


class LLMJudgeError(RuntimeError):
    """A configuration problem or a refusal by the endpoint (never carries the API key)."""


class _BudgetExhausted(Exception):
    pass


class _RefusedItem(Exception):
    pass


class _Stopped(Exception):
    """Another call aborted the run: no new call starts."""


def is_loopback(host: Optional[str]) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host or "").is_loopback
    except ValueError:
        return False


def _origin(url: str) -> tuple:
    parts = urllib.parse.urlsplit(url)
    return parts.scheme, parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)


class LLMJudge:
    """Judges :class:`Comparison` items with a chat model, ``concurrency`` calls in flight; implements
    ``personalm.evaluation.judge.Judge``.

    ``max_calls`` bounds the HTTP requests (retries included), counting those a ``store`` records as spent
    by earlier runs; past it the remaining items get None and ``stats["budget_exhausted"]`` is True. HTTP
    408, 429, 5xx, timeouts and connection errors are retried up to ``max_retries`` times after
    ``backoff_s * 2**attempt`` seconds (``self.sleep``, replaceable in tests); 400, 413 and 422 make that
    item a failed verdict (``refused``); other 4xx and redirects raise :class:`LLMJudgeError`. After :meth:`judge`,
    ``self.stats`` holds ``calls``, ``retries``, ``failures`` (transport errors after retries, malformed
    bodies), ``garbage`` (unparsable answers), ``refused``, ``reused`` (verdicts read from the store),
    ``skipped`` (items left by the budget), ``swapped`` (calls shown as B/A), ``disagreed`` (items whose two
    orders disagreed: ties), ``orders`` and ``budget_exhausted``.
    """

    def __init__(self, base_url: str, model: str, api_key_env: str = "OPENAI_API_KEY", max_calls: int = 200,
                 max_retries: int = 4, backoff_s: float = 1.0, timeout_s: float = 60.0, seed: int = 0,
                 temperature: float = 0.0, store: Optional[str] = None, concurrency: int = 16,
                 orders: Literal["one", "both"] = "one") -> None:
        parts = urllib.parse.urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"base_url must be an http(s):// URL, got {base_url!r}")
        if parts.scheme == "http" and not is_loopback(parts.hostname):
            raise ValueError(f"base_url {base_url!r}: http:// would send the API key unencrypted; use https:// "
                             "(http:// is accepted for a loopback address only)")
        if max_calls < 0 or max_retries < 0 or concurrency < 1:
            raise ValueError("max_calls and max_retries must be >= 0, concurrency >= 1")
        if orders not in ("one", "both"):
            raise ValueError(f"orders must be one or both, got {orders!r}")
        self.base_url = base_url.rstrip("/")
        self.url = self.base_url + "/chat/completions"
        self.model, self.api_key_env = model, api_key_env
        self.max_calls, self.max_retries, self.backoff_s = max_calls, max_retries, backoff_s
        self.timeout_s, self.seed, self.temperature = timeout_s, seed, temperature
        self.concurrency, self.orders = concurrency, orders
        self.store_path = store
        self.sleep: Callable[[float], None] = time.sleep
        self.stats: dict[str, Any] = self._fresh_stats()
        self._lock = threading.Lock()
        self._store: Optional[VerdictStore] = None
        self._spent_before = 0
        self._reserved = 0  # first calls set aside for items in flight
        self._stop = threading.Event()  # set when a call aborts the run (401, a redirect): no new call starts

    def __repr__(self) -> str:
        return (f"LLMJudge(url={self.url!r}, model={self.model!r}, api_key_env={self.api_key_env!r}, seed={self.seed}, "
                f"orders={self.orders!r}, concurrency={self.concurrency})")

    def _fresh_stats(self) -> dict[str, Any]:
        return dict(calls=0, retries=0, failures=0, garbage=0, refused=0, reused=0, skipped=0, swapped=0,
                    disagreed=0, orders=self.orders, budget_exhausted=False)

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.stats[name] += n

    def swapped(self, item: Comparison) -> bool:
        """Under ``orders: one``, whether ``item`` is shown as (response_b, response_a); fixed by ``seed`` and
        ``post_id``."""
        return random.Random(f"{self.seed}:{item.post_id}").random() < 0.5

    def shown(self, item: Comparison) -> list[bool]:
        """The orders ``item`` is shown in (True: B/A)."""
        return [self.swapped(item)] if self.orders == "one" else [False, True]

    def item_key(self, item: Comparison, swap: bool) -> str:
        """What a stored verdict answers: the item, its two texts, the order they are shown in, and the judge's
        settings and prompt (the seed only picks an order, so it is not part of the key)."""
        settings = [self.url, self.model, self.temperature, SYSTEM, build_messages(item, "{a}", "{b}")]
        blob = json.dumps([settings, item.post_id, item.response_a, item.response_b, "BA" if swap else "AB"],
                          sort_keys=True)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def judge(self, items: Sequence[Comparison]) -> list[Verdict]:
        """Which response of each item ``item.community`` would upvote more; None where the judge failed or the
        budget left the item out."""
        key = os.environ.get(self.api_key_env)
        if not key:
            raise LLMJudgeError(f"environment variable {self.api_key_env} (the API key for {self.url}) is not set")
        from openai import DefaultHttpxClient, OpenAI

        self.stats = self._fresh_stats()
        self._store = VerdictStore(self.store_path) if self.store_path else None
        self._spent_before = self._store.spent if self._store else 0
        verdicts: list[Verdict] = [None] * len(items)
        self._stop.clear()
        self._reserved = 0
        with OpenAI(base_url=self.base_url, api_key=key, max_retries=0, timeout=self.timeout_s,
                    http_client=DefaultHttpxClient(follow_redirects=False)) as client, \
                ThreadPoolExecutor(self.concurrency, thread_name_prefix="llm-judge") as pool:
            order = judging_order([item.community for item in items], self.seed)
            futures = {pool.submit(self._judge_item, items[i], client, key): i for i in order}
            try:
                for future in as_completed(futures):
                    verdicts[futures[future]] = future.result()
            except BaseException:
                self._stop.set()
                pool.shutdown(wait=True, cancel_futures=True)
                raise
        return verdicts

    def _judge_item(self, item: Comparison, client, key: str) -> Verdict:
        try:
            return self._judge_orders(item, client, key)
        except LLMJudgeError:
            self._stop.set()
            raise

    def _judge_orders(self, item: Comparison, client, key: str) -> Verdict:
        """The item's verdict over its orders: stored ones reused, the missing ones asked for, their first calls
        reserved together (a budget never pays for one order of an item and leaves the other unasked)."""
        keys = {swap: self.item_key(item, swap) for swap in self.shown(item)}
        stored = {swap: self._store.get(k) if self._store else None for swap, k in keys.items()}
        missing = [swap for swap in keys if stored[swap] is None]
        self._count("reused", len(keys) - len(missing))
        try:
            self._reserve(len(missing))
        except (_BudgetExhausted, _Stopped):
            self._count("skipped")
            return None
        found: list[Verdict] = []
        unasked = len(missing)  # orders whose reserved first call is not made yet
        try:
            for swap in keys:
                if stored[swap] is not None:
                    found.append(stored[swap]["verdict"])
                    continue
                unasked -= 1  # its first call spends the reservation, whatever the outcome
                status, verdict = self._judge_one(item, swap, client, key, keys[swap])
                if status == "skipped":
                    return None
                if self._store is not None:
                    with self._lock:
                        self._store.add(keys[swap], status, verdict)
                found.append(verdict)
                if verdict is None:  # refused, garbage or failed: the item has no verdict, the other order
                    return None  # is not paid for
        finally:
            with self._lock:
                self._reserved -= unasked
        verdict = combine(found)
        if len(found) == 2 and verdict == "tie":
            self._count("disagreed")
        return verdict

    def _judge_one(self, item: Comparison, swap: bool, client, key: str, item_key: str) -> tuple[str, Verdict]:
        """(status, verdict mapped back to A = response_a): ``ok``, ``garbage``, ``refused``, ``failed`` or
        ``skipped`` (budget)."""
        first, second = (item.response_b, item.response_a) if swap else (item.response_a, item.response_b)
        messages = build_messages(item, first, second)
        try:
            reply = self._complete(client, messages, key, item_key)
        except _BudgetExhausted:
            self._count("skipped")
            return "skipped", None
        except _RefusedItem:
            self._count("refused")
            return "refused", None
        except _Stopped:
            self._count("skipped")
            return "skipped", None
        self._count("swapped", swap)  # calls actually shown in B/A order
        if reply is None:
            self._count("failures")
            return "failed", None
        answer = parse_answer(reply)
        if answer is None:
            self._count("garbage")
            return "garbage", None
        return "ok", ("B" if answer == "A" else "A") if swap else answer

    def _reserve(self, calls: int) -> None:
        """Set aside the first call of each order an item still needs, or raise if the budget cannot pay them all."""
        with self._lock:
            if self._stop.is_set():
                raise _Stopped
            if self._spent_before + self.stats["calls"] + self._reserved + calls > self.max_calls:
                self.stats["budget_exhausted"] = True
                raise _BudgetExhausted
            self._reserved += calls

    def _spend(self, item_key: str, reserved: bool) -> None:
        """Count a call about to be made (and record it in the store first): a reserved first call, or a retry
        while the budget has room; else raise."""
        with self._lock:
            if reserved:
                self._reserved -= 1
            elif self._stop.is_set():
                raise _Stopped
            elif self._spent_before + self.stats["calls"] + self._reserved >= self.max_calls:
                self.stats["budget_exhausted"] = True
                raise _BudgetExhausted
            self.stats["calls"] += 1
            if self._store is not None:
                self._store.spend(item_key)

    def _complete(self, client, messages: list, key: str, item_key: str) -> Optional[str]:
        """The reply text, or None after a malformed body or retries exhausted; raises on refusal/budget."""
        import openai

        for attempt in range(self.max_retries + 1):
            if attempt:
                self._count("retries")
                self.sleep(self.backoff_s * 2 ** (attempt - 1))
            self._spend(item_key, reserved=attempt == 0)
            try:
                response = client.chat.completions.create(model=self.model, messages=messages,
                                                          temperature=self.temperature, max_tokens=MAX_TOKENS)
            except openai.APIStatusError as error:
                if error.status_code in RETRIED or error.status_code >= 500:
                    continue
                if error.status_code in REFUSED_ITEM:
                    raise _RefusedItem from None
                raise LLMJudgeError(self._refusal(error, key)) from None
            except openai.APIConnectionError:  # timeouts, refused/reset connections
                continue
            except ValueError:  # a body that is not JSON
                return None
            try:
                content = response.choices[0].message.content
            except (AttributeError, IndexError, KeyError, TypeError):
                return None
            return content if isinstance(content, str) else None
        return None

    def _refusal(self, error, key: str) -> str:
        status = error.status_code
        if 300 <= status < 400:
            target = urllib.parse.urljoin(self.url, error.response.headers.get("location", ""))
            where = "another host" if _origin(target) != _origin(self.url) else "another path"
            parts = urllib.parse.urlsplit(target)
            return (f"endpoint {self.url} redirected (HTTP {status}) to {where}, {parts.netloc}{parts.path}: not "
                    "followed, the API key is sent to the configured URL only (set base_url to the endpoint's own "
                    "address)").replace(key, "***")
        try:
            detail = error.response.text[:300].strip()
        except Exception:  # noqa: BLE001 - the detail is a courtesy
            detail = ""
        message = f"endpoint {self.url} refused the request: HTTP {status} {error.response.reason_phrase}"
        return (message + (f": {detail}" if detail else "")).replace(key, "***")
