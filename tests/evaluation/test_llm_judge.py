"""LLMJudge against a real scripted HTTP server on 127.0.0.1 (no mocked client)."""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

import pytest

from personalm.evaluation.judge import Comparison, tally
from personalm.evaluation.llm_judge import LLMJudge, LLMJudgeError
from personalm.evaluation.llm_prompt import build_messages, judging_order, parse_answer

KEY = "sk-test-SECRET-0123456789"
ENV = "PERSONALM_TEST_JUDGE_KEY"
Reply = tuple[int, Any, float]  # status, body (dict -> json, str/bytes raw), delay before answering


def chat(content: Any) -> dict:
    return {"choices": [{"message": {"role": "assistant", "content": content}}]}


def always(content: str) -> Callable[[dict], Reply]:
    return lambda request: (200, chat(content), 0.0)


class Scripted(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.requests: list[dict] = []
        self.script: deque[Callable[[dict], Reply]] = deque()  # one per request, then `default`
        self.default: Callable[[dict], Reply] = always("A")
        self.lock = threading.Lock()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def reply(self, *replies: Reply | Callable[[dict], Reply]) -> None:
        for r in replies:
            self.script.append(r if callable(r) else (lambda request, r=r: r))

    def handle_error(self, request, client_address) -> None:  # client timed out and left: fine
        pass


class Handler(BaseHTTPRequestHandler):
    server: Scripted
    extra_headers: dict = {}  # e.g. Location, for a redirect

    def do_POST(self) -> None:
        raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        headers = {k.lower(): v for k, v in self.headers.items()}
        request = {"path": self.path, "headers": headers, "body": json.loads(raw)}
        with self.server.lock:
            self.server.requests.append(request)
            responder = self.server.script.popleft() if self.server.script else self.server.default
        status, body, delay = responder(request)
        time.sleep(delay)
        data = body if isinstance(body, bytes) else (body if isinstance(body, str) else json.dumps(body)).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in self.extra_headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # what a followed 301/302/303 turns the POST into: recorded, refused
        with self.server.lock:
            self.server.requests.append({"path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()},
                                         "body": None})
        self.send_response(405)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server():
    srv = Scripted()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(timeout=2)


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv(ENV, KEY)


def items(n: int, community: str = "r/finance") -> list[Comparison]:
    return [Comparison(f"p{i}", community, f"title {i}", f"body {i}", f"resp a {i}", f"resp b {i}") for i in range(n)]


def shown_a(judge: LLMJudge, item: Comparison) -> str:
    """The verdict of a reply "A" (the server's default) for ``item``: response_b where its order was swapped."""
    return "B" if judge.swapped(item) else "A"


def make_judge(server: Scripted, **kw) -> tuple[LLMJudge, list[float]]:
    judge = LLMJudge(server.base_url, "judge-model", api_key_env=ENV, **{"timeout_s": 2.0, **kw})
    delays: list[float] = []
    judge.sleep = delays.append
    return judge, delays


def test_request(server):
    judge, _ = make_judge(server)
    item = Comparison("p0", "r/AskHistorians", "Why Rome?", "It fell.", "Because of X.", "Because of Y.")
    assert judge.judge([item]) in (["A"], ["B"])
    (request,) = server.requests
    assert request["path"] == "/v1/chat/completions"
    assert request["headers"]["authorization"] == f"Bearer {KEY}"
    body = request["body"]
    assert body["model"] == "judge-model" and body["temperature"] == 0.0 and 0 < body["max_tokens"] <= 16
    prompt = body["messages"][-1]["content"]
    assert "Which comment would be upvoted more in r/AskHistorians?" in prompt
    for text in ("Why Rome?", "It fell.", "Because of X.", "Because of Y.", "Comment A", "Comment B"):
        assert text in prompt
    assert "finance" not in prompt


def test_build_messages_is_pure_and_ordered():
    item = items(1, community="history")[0]
    messages = build_messages(item, "FIRST", "SECOND")
    assert messages == build_messages(item, "FIRST", "SECOND")
    user = messages[-1]["content"]
    assert user.index("Comment A:\nFIRST") < user.index("Comment B:\nSECOND")
    assert "upvoted more in r/history?" in user


@pytest.mark.parametrize("text, expected", [
    ("A", "A"), ("B", "B"), (" B\n", "B"), ("A.", "A"), ('"B"', "B"), ("'A'", "A"), ("**B**", "B"),
    ("Comment A", "A"), ("comment B.", "B"), ("Answer: B", "B"), ("answer:A", "A"), ('Answer: "A".', "A"),
    ("", None), ("   ", None), ("A or B", None), ("Both", None), ("I think A but B", None), ("AB", None),
    ("a", None), ("C", None), ("Neither.", None), ("A, because it is funnier", None), (None, None),
])
def test_parse_answer(text, expected):
    assert parse_answer(text) == expected


def test_order_randomised_and_reproducible(server):
    batch = items(40)
    judge, _ = make_judge(server, seed=0)
    first = judge.judge(batch)  # the server always says "A": "B" exactly where the order was swapped
    assert first.count("B") == judge.stats["swapped"] and 10 <= judge.stats["swapped"] <= 30
    assert first.count("A") + first.count("B") == 40
    assert judge.judge(batch) == first
    assert make_judge(server, seed=0)[0].judge(batch) == first
    assert make_judge(server, seed=1)[0].judge(batch) != first


def test_verdicts_mapped_back(server):
    def longer(request: dict) -> Reply:
        prompt = request["body"]["messages"][-1]["content"]
        a, b = re.search(r"Comment A:\n(.*?)\n\nComment B:\n(.*?)\n\nWhich", prompt, re.S).groups()
        return 200, chat("A" if len(a) > len(b) else "B"), 0.0

    server.default = longer
    lengths = [(n, n + (3 if i % 3 else -3)) for i, n in enumerate(5 + (7 * i) % 11 for i in range(20))]
    batch = [Comparison(f"p{i}", "r/x", "t", "p", "a" * na, "b" * nb) for i, (na, nb) in enumerate(lengths)]
    judge, _ = make_judge(server)
    expected = ["A" if len(c.response_a) > len(c.response_b) else "B" for c in batch]
    assert judge.judge(batch) == expected
    assert 0 < judge.stats["swapped"] < 20 and set(expected) == {"A", "B"}


def test_retry_on_500_then_success(server):
    server.reply((500, "oops", 0.0))
    judge, delays = make_judge(server)
    assert judge.judge(items(1)) == [shown_a(judge, items(1)[0])]  # the retried reply, mapped back
    assert delays == [1.0] and judge.stats["calls"] == 2 and judge.stats["retries"] == 1
    assert judge.stats["failures"] == 0


def test_retry_on_429_exponential_backoff(server):
    server.reply((429, "slow down", 0.0), (429, "", 0.0), (503, "", 0.0))
    judge, delays = make_judge(server, backoff_s=1.0)
    assert judge.judge(items(1)) == [shown_a(judge, items(1)[0])]  # the retried reply, mapped back
    assert delays == [1.0, 2.0, 4.0] and len(server.requests) == 4


def test_retries_exhausted_is_a_failure(server):
    server.default = lambda request: (502, "", 0.0)
    judge, delays = make_judge(server, max_retries=2, backoff_s=0.5)
    assert judge.judge(items(2)) == [None, None]
    assert sorted(delays) == [0.5, 0.5, 1.0, 1.0] and judge.stats["failures"] == 2 and judge.stats["calls"] == 6


def test_timeout_retried(server):
    server.reply((200, chat("A"), 0.6))
    judge, delays = make_judge(server, timeout_s=0.2)
    assert judge.judge(items(1)) == [shown_a(judge, items(1)[0])]  # the retried reply, mapped back
    assert judge.stats["retries"] == 1 and delays == [1.0] and len(server.requests) == 2


def test_connection_error_retried():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    judge = LLMJudge(f"http://127.0.0.1:{port}/v1", "m", api_key_env=ENV, max_retries=2, timeout_s=0.5)
    judge.sleep = lambda s: None
    assert judge.judge(items(1)) == [None]
    assert judge.stats["calls"] == 3 and judge.stats["failures"] == 1


def test_401_refused_without_key(server):
    server.reply((401, {"error": f"invalid key {KEY}"}, 0.0))
    judge, delays = make_judge(server, concurrency=1)
    with pytest.raises(LLMJudgeError, match="refused.*401") as info:
        judge.judge(items(2))
    assert KEY not in str(info.value) and KEY not in repr(info.value)
    assert len(server.requests) == 1 and delays == []


def test_budget(server):
    judge, _ = make_judge(server, max_calls=3)
    verdicts = judge.judge(items(5))
    assert len(server.requests) == 3
    assert sum(v is not None for v in verdicts) == 3
    assert judge.stats["budget_exhausted"] is True and judge.stats["skipped"] == 2


def test_budget_counts_retries(server):
    server.reply((500, "", 0.0), (500, "", 0.0))
    judge, _ = make_judge(server, max_calls=2)
    assert judge.judge(items(2)) == [None, None]
    assert len(server.requests) == 2 and judge.stats["budget_exhausted"] is True


def by_title(replies: dict) -> Callable[[dict], Reply]:
    """A server that answers each item (by its title's number) with its own reply, whatever order they come in."""
    def reply(request: dict) -> Reply:
        number = int(re.search(r"Title: title (\d+)", request["body"]["messages"][-1]["content"]).group(1))
        return replies.get(number, (200, chat("A"), 0.0))
    return reply


def test_garbage_and_malformed_counted(server):
    server.default = by_title({0: (200, chat("A or B"), 0.0), 1: (200, chat("Both"), 0.0), 2: (200, chat(""), 0.0),
                               3: (200, "not json", 0.0), 4: (200, {"choices": []}, 0.0), 5: (200, chat(None), 0.0)})
    judge, _ = make_judge(server)
    verdicts = judge.judge(items(7))
    assert verdicts[:6] == [None] * 6 and verdicts[6] == shown_a(judge, items(7)[6])
    assert judge.stats["garbage"] == 3 and judge.stats["failures"] == 3
    assert judge.stats["calls"] == 7 and judge.stats["retries"] == 0  # neither is retried


def test_missing_key(server, monkeypatch):
    monkeypatch.delenv(ENV)
    judge, _ = make_judge(server)
    with pytest.raises(LLMJudgeError, match=ENV):
        judge.judge(items(1))
    assert server.requests == []


def test_key_never_kept(server):
    judge, _ = make_judge(server)
    judge.judge(items(3))
    for text in (repr(judge), str(judge), str(judge.stats), str(vars(judge))):
        assert KEY not in text


# ------------------------------------------------------------------ refusals, the verdict store, the key


def test_an_item_the_endpoint_refuses_is_a_failed_verdict_and_the_others_complete(server):
    """A content filter's 400 on the second of three items: that item gets None (counted as refused, not
    retried), the first and third are judged."""
    server.default = by_title({1: (400, {"error": {"code": "content_filter"}}, 0.0)})
    judge, delays = make_judge(server)
    verdicts = judge.judge(items(3))
    assert verdicts[1] is None and [verdicts[0], verdicts[2]] == [shown_a(judge, items(3)[i]) for i in (0, 2)]
    assert judge.stats["refused"] == 1 and judge.stats["calls"] == 3 and delays == []


@pytest.mark.parametrize("status", [401, 403, 404])
def test_auth_and_not_found_abort_at_once(server, status):
    server.reply((status, {"error": "no"}, 0.0))
    judge, _ = make_judge(server, concurrency=1)
    with pytest.raises(LLMJudgeError, match=f"HTTP {status}"):
        judge.judge(items(3))
    assert len(server.requests) == 1


def _judge_until_killed(base_url: str, store: str) -> None:
    LLMJudge(base_url, "judge-model", api_key_env=ENV, timeout_s=30.0, store=store, concurrency=1).judge(items(5))


def test_a_rerun_after_a_kill_asks_only_for_the_missing_verdicts(server, tmp_path):
    """A judging process is SIGKILLed while its third request is in flight (the server kills it before
    answering). The rerun reads the two stored verdicts and calls for the three other items only; the budget
    counts the earlier run's three calls."""
    import multiprocessing
    import os
    import signal

    store = tmp_path / "verdicts.jsonl"
    child = multiprocessing.get_context("spawn").Process(target=_judge_until_killed, args=(server.base_url, str(store)))

    def kill_client(request):
        os.kill(child.pid, signal.SIGKILL)
        return 200, chat("A"), 0.5  # answered too late: the client is gone
    server.reply(always("A"), always("B"), kill_client)
    child.start()
    child.join(timeout=60)
    assert child.exitcode == -signal.SIGKILL
    first_run = len(server.requests)
    lines = [json.loads(line) for line in store.read_text().splitlines()]
    assert first_run == 3 and sum("call" in x for x in lines) == 3 and sum("verdict" in x for x in lines) == 2

    titles = lambda requests: {re.search(r"Title: (title \d+)", r["body"]["messages"][-1]["content"]).group(1)  # noqa: E731
                               for r in requests}
    judge, _ = make_judge(server, store=str(store), max_calls=6)
    verdicts = judge.judge(items(5))
    asked = titles(server.requests[first_run:])
    assert len(asked) == 3 and asked == {f"title {i}" for i in range(5)} - titles(server.requests[:2])
    assert judge.stats["reused"] == 2 and None not in verdicts
    assert judge.stats["budget_exhausted"] is False  # 3 + 3 calls of 6

    again, _ = make_judge(server, store=str(store), max_calls=6)
    assert again.judge(items(5)) == verdicts and len(server.requests) == first_run + 3  # nothing asked again
    more, _ = make_judge(server, store=str(store), max_calls=6)
    assert more.judge(items(6))[5] is None and more.stats["budget_exhausted"]  # the 6 calls are spent


def test_stored_verdicts_answer_only_the_same_item_and_settings(server, tmp_path):
    """Another response text, another judge model: asked anew, not answered from the store."""
    store = str(tmp_path / "verdicts.jsonl")
    make_judge(server, store=store)[0].judge(items(2))
    changed = [items(2)[0], Comparison("p1", "r/finance", "title 1", "body 1", "resp a 1", "another text")]
    judge, _ = make_judge(server, store=store)
    judge.judge(changed)
    assert judge.stats["reused"] == 1 and len(server.requests) == 3
    other = LLMJudge(server.base_url, "another-model", api_key_env=ENV, store=store)
    other.judge(items(2))
    assert other.stats["reused"] == 0 and len(server.requests) == 5


def test_a_broken_store_line_is_named(server, tmp_path):
    store = tmp_path / "verdicts.jsonl"
    store.write_text('{"call": "k"}\n{"key": "k", "status": "ok", "verdict": "A"}\nnot json\n')
    with pytest.raises(ValueError, match=r"verdicts.jsonl, line 3"):
        make_judge(server, store=str(store))[0].judge(items(1))


@pytest.fixture
def other_host():
    """A second server on 127.0.0.2: another host, as far as the judge is concerned."""
    srv = Scripted()
    srv.server_close()
    ThreadingHTTPServer.__init__(srv, ("127.0.0.2", 0), Handler)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_a_redirect_is_not_followed_and_the_other_host_never_sees_the_key(server, other_host, status):
    target = f"http://127.0.0.2:{other_host.server_address[1]}/v1/chat/completions"
    server.reply(lambda request: (status, {"redirect": target}, 0.0))
    Handler.extra_headers = {"Location": target}
    try:
        judge, _ = make_judge(server)
        try:
            judge.judge(items(1))
            error = None
        except Exception as err:  # noqa: BLE001 - checked below, after what the other host received
            error = err
    finally:
        Handler.extra_headers = {}
    assert [r["headers"].get("authorization") for r in other_host.requests] == []  # never reached
    assert isinstance(error, LLMJudgeError), error
    assert f"redirected (HTTP {status}) to another host" in str(error) and KEY not in str(error)


@pytest.mark.parametrize("url, ok", [("http://example.com/v1", False), ("http://10.0.0.5:8000/v1", False),
                                     ("https://example.com/v1", True), ("http://localhost:8000/v1", True),
                                     ("http://127.0.0.1:8000/v1", True), ("http://[::1]:8000/v1", True)])
def test_http_only_for_loopback(url, ok):
    if ok:
        LLMJudge(url, "m", api_key_env=ENV)
    else:
        with pytest.raises(ValueError, match="unencrypted"):
            LLMJudge(url, "m", api_key_env=ENV)


# ------------------------------------------------------------------ concurrency, both orders, a budgeted sample


class InFlight:
    """A responder that answers "A" after ``delay`` seconds and records how many requests were in flight at most."""

    def __init__(self, delay: float):
        self.delay, self.now, self.most = delay, 0, 0
        self.lock = threading.Lock()

    def __call__(self, request: dict) -> Reply:
        with self.lock:
            self.now += 1
            self.most = max(self.most, self.now)
        time.sleep(self.delay)
        with self.lock:
            self.now -= 1
        return 200, chat("A"), 0.0


def test_16_in_flight_judge_200_items_in_a_tenth_of_the_serial_time_and_store_every_verdict(server, tmp_path):
    """A server that answers after 200 ms: 200 items one at a time take at least 40 s; 16 in flight take at most a
    tenth of that, with 16 requests really in flight, and the store holds a call and a verdict for every item."""
    server.default = slow = InFlight(0.2)
    store = tmp_path / "verdicts.jsonl"
    judge, _ = make_judge(server, concurrency=16, store=str(store), max_calls=1000)
    start = time.perf_counter()
    verdicts = judge.judge(items(200))
    elapsed = time.perf_counter() - start
    serial = 200 * 0.2
    assert elapsed <= serial / 10, elapsed
    assert slow.most == 16 and None not in verdicts and judge.stats["calls"] == 200
    lines = [json.loads(line) for line in store.read_text().splitlines()]
    assert sum("call" in x for x in lines) == 200 and len({x["key"] for x in lines if "verdict" in x}) == 200
    again, _ = make_judge(server, concurrency=16, store=str(store), max_calls=1000)
    assert again.judge(items(200)) == verdicts and again.stats["reused"] == 200 and len(server.requests) == 200


def test_both_orders_a_judge_that_always_answers_a_gives_every_item_a_tie(server, tmp_path):
    """Under ``orders: both`` each item is shown A/B and B/A; "A" both times means response_a once and response_b
    once: a tie, so the win rate is 0.5. Each order is a call, a stored verdict of its own and part of the key."""
    store = tmp_path / "verdicts.jsonl"
    batch = items(10, "r/finance") + items(10, "r/history")
    judge, _ = make_judge(server, orders="both", store=str(store))
    verdicts = judge.judge(batch)
    assert verdicts == ["tie"] * 20 and judge.stats["disagreed"] == 20 and judge.stats["calls"] == 40
    counts = tally(batch, verdicts)["overall"]
    assert counts["win_rate"] == 0.5 and counts["ties"] == 20 and counts["wins"] == counts["losses"] == 0
    shown = [r["body"]["messages"][-1]["content"] for r in server.requests]
    assert sum("Comment A:\nresp a 3\n" in text for text in shown if "title 3\n" in text) == 2  # history's p3 too
    assert len({json.loads(line)["key"] for line in store.read_text().splitlines() if "verdict" in line}) == 40
    single, _ = make_judge(server, orders="one", store=str(store))
    assert single.judge(batch) == ["A" if not single.swapped(c) else "B" for c in batch]  # stored: the same orders
    assert single.stats["reused"] == 20 and len(server.requests) == 40


def test_both_orders_a_judge_that_reads_the_texts_wins_as_in_one_order(server):
    """A judge that answers by content (the longer comment) agrees with itself in both orders: no tie."""
    def longer(request: dict) -> Reply:
        prompt = request["body"]["messages"][-1]["content"]
        a, b = re.search(r"Comment A:\n(.*?)\n\nComment B:\n(.*?)\n\nWhich", prompt, re.S).groups()
        return 200, chat("A" if len(a) > len(b) else "B"), 0.0

    server.default = longer
    batch = [Comparison(f"p{i}", "r/x", "t", "p", "a" * (5 + i), "b" * (9 - i)) for i in range(9) if 5 + i != 9 - i]
    judge, _ = make_judge(server, orders="both")
    assert judge.judge(batch) == ["A" if len(c.response_a) > len(c.response_b) else "B" for c in batch]
    assert judge.stats["disagreed"] == 0


SIZES = {"r/big": 50, "r/mid": 30, "r/small": 10, "r/few": 5, "r/two": 2}


def communities_of(batch):
    return [c.community for c in batch]


def test_judging_order_is_a_stratified_sample_at_every_prefix():
    """Every community's first item leads; after that each prefix holds each community in proportion (within one
    item); the order is a permutation, fixed by the seed and changed by another."""
    names = [c for c, n in SIZES.items() for _ in range(n)]
    order = judging_order(names, seed=0)
    assert sorted(order) == list(range(len(names)))
    assert {names[i] for i in order[:5]} == set(SIZES)
    for k in range(5, len(names) + 1):
        for community, n in SIZES.items():
            taken = sum(names[i] == community for i in order[:k])
            assert abs(taken - max(1, k * n / len(names))) <= 2, (k, community, taken)
    assert judging_order(names, seed=0) == order and judging_order(names, seed=1) != order


def test_a_budget_judges_a_seeded_sample_that_covers_every_community(server, tmp_path):
    """97 items over five communities (50 down to 2), 20 calls: 20 items judged, every community among them, the
    largest most; a rerun with a larger budget keeps those 20 verdicts and extends the same sample. Under both
    orders the budget counts calls: 20 calls judge 10 items."""
    batch = [Comparison(f"{c}-{i}", c, f"title {j}", "body", f"a {j}", f"b {j}")
             for j, (c, i) in enumerate((c, i) for c, n in SIZES.items() for i in range(n))]
    store = str(tmp_path / "verdicts.jsonl")
    judge, _ = make_judge(server, max_calls=20, store=store)
    verdicts = judge.judge(batch)
    judged = [c.community for c, v in zip(batch, verdicts) if v is not None]
    assert len(judged) == 20 and set(judged) == set(SIZES) and judge.stats["skipped"] == 77
    assert judged.count("r/big") == max(judged.count(c) for c in SIZES)
    other, _ = make_judge(server, max_calls=20, seed=1)
    assert [v is None for v in other.judge(batch)] != [v is None for v in verdicts]  # another seed, another sample
    more, _ = make_judge(server, max_calls=60, store=store)
    extended = more.judge(batch)
    assert more.stats["reused"] == 20 and sum(v is not None for v in extended) == 60
    assert all(e == v for e, v in zip(extended, verdicts) if v is not None)
    both, _ = make_judge(server, max_calls=20, orders="both")
    assert sum(v is not None for v in both.judge(batch)) == 10 and both.stats["calls"] == 20


def test_both_orders_an_item_refused_in_one_order_is_not_asked_in_the_other(server):
    """Under ``orders: both``, the endpoint refuses item 0 (a content filter): it gets no verdict, its other order
    is not paid for, and the budget it had set aside goes to the other items (7 calls: 1 + 2 x 3, all judged)."""
    server.default = by_title({0: (400, {"error": {"code": "content_filter"}}, 0.0)})
    judge, _ = make_judge(server, orders="both", max_calls=7, concurrency=1)
    verdicts = judge.judge(items(4))
    assert verdicts[0] is None and verdicts[1:] == ["tie"] * 3
    assert judge.stats["calls"] == 7 and judge.stats["refused"] == 1 and not judge.stats["budget_exhausted"]
