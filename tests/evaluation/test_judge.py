"""Pairwise comparison of two prediction files: reading, alignment, counting, bootstrap CIs, outputs."""

import json
import math

import numpy as np
import pytest

from personalm.evaluation import judge as J
from personalm.paths import write_json


class LongerJudge:
    """Prefers the longer response, ties on equal length; fails (None) when either response is "FAIL"."""

    def judge(self, items):
        return [None if "FAIL" in (c.response_a, c.response_b)
                else "A" if len(c.response_a) > len(c.response_b)
                else "B" if len(c.response_a) < len(c.response_b) else "tie" for c in items]


def row(post_id, community, response, **extra):
    return {"post_id": post_id, "community": community, "prompt_community": community, "title": f"t{post_id}",
            "post": f"body {post_id}", "prompt": f"prompt {post_id}", "response": response, **extra}


def write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


# (post, community, response A, response B): the expected verdict of LongerJudge in the comment
POSTS = [("p1", "r/a", "xxx", "x"),     # A
         ("p2", "r/a", "xx", "yy"),     # tie
         ("p3", "r/a", "x", "xxxx"),    # B
         ("p4", "r/a", "xxxx", "xx"),   # A
         ("p5", "r/b", "", "x"),        # B (an empty response is allowed)
         ("p6", "r/b", "xx", "x")]      # A


@pytest.fixture
def files(tmp_path):
    """System A's and B's files; B's lines in another order, to check posts are paired by id."""
    a = write(tmp_path / "a.jsonl", [row(p, c, ra) for p, c, ra, _ in POSTS])
    b = write(tmp_path / "b.jsonl", [row(p, c, rb, prompt_community="Reddit") for p, c, _, rb in reversed(POSTS)])
    return a, b


def test_counts_overall_and_per_community(files):
    """By hand from POSTS: overall A wins p1 p4 p6, ties p2, loses p3 p5 -> 3/1/2, rate (3 + 0.5) / 6 = 7/12.
    r/a: wins p1 p4, tie p2, loss p3 -> (2 + 0.5) / 4 = 0.625; r/b: win p6, loss p5 -> 0.5."""
    result = J.compare(*files, LongerJudge(), name_a="long", name_b="short")
    o = result["overall"]
    assert (o["wins"], o["ties"], o["losses"], o["failed"], o["n"]) == (3, 1, 2, 0, 6)
    assert o["win_rate"] == pytest.approx(7 / 12)
    ra, rb = result["communities"]["r/a"], result["communities"]["r/b"]
    assert list(result["communities"]) == ["r/a", "r/b"]
    assert (ra["wins"], ra["ties"], ra["losses"], ra["win_rate"]) == (2, 1, 1, 0.625)
    assert (rb["wins"], rb["ties"], rb["losses"], rb["win_rate"]) == (1, 0, 1, 0.5)
    assert result["alignment"] == {"posts_a": 6, "posts_b": 6, "compared": 6, "only_a": 0, "only_b": 0}
    assert (result["a"], result["b"], result["seed"], result["n_boot"]) == ("long", "short", 0, 1000)


def test_align_pairs_by_post_id_in_sorted_order(files):
    a, b = (J.read_predictions(p) for p in files)
    items, _ = J.align(a, b, *files)
    assert [c.post_id for c in items] == ["p1", "p2", "p3", "p4", "p5", "p6"]
    assert (items[2].response_a, items[2].response_b, items[2].title) == ("x", "xxxx", "tp3")


def test_tally_counts_ties_as_half_and_excludes_failed():
    """A, A, tie, B, None -> 2 wins, 1 tie, 1 loss, 1 failed; rate (2 + 0.5) / 4 = 0.625 (failed not in it)."""
    items = [J.Comparison(f"p{i}", "r/a", "t", "b", "x", "y") for i in range(5)]
    o = J.tally(items, ["A", "A", "tie", "B", None])["overall"]
    assert (o["wins"], o["ties"], o["losses"], o["failed"], o["n"]) == (2, 1, 1, 1, 5)
    assert o["win_rate"] == 0.625
    assert J.tally(items[:1], [None])["overall"]["win_rate"] is None
    with pytest.raises(ValueError, match="4 verdicts for 5 items"):
        J.tally(items, ["A"] * 4)


def test_failed_verdicts_in_compare(tmp_path):
    """p1 A wins, p2 fails, p3 (r/b) fails -> overall 1 win of 1 decided, r/b has no rate nor CI."""
    a = write(tmp_path / "a.jsonl", [row("p1", "r/a", "xx"), row("p2", "r/a", "FAIL"), row("p3", "r/b", "x")])
    b = write(tmp_path / "b.jsonl", [row("p1", "r/a", "x"), row("p2", "r/a", "x"), row("p3", "r/b", "FAIL")])
    result = J.compare(a, b, LongerJudge())
    assert (result["overall"]["failed"], result["overall"]["win_rate"]) == (2, 1.0)
    assert result["communities"]["r/b"]["win_rate"] is None
    assert result["communities"]["r/b"]["ci95"] == [None, None]
    assert "2 failed verdicts" in J.format_table(result)


def test_run_judge_checks_the_judges_answer():
    items = [J.Comparison("p1", "r/a", "t", "b", "x", "y")]
    with pytest.raises(ValueError, match="2 verdicts for 1 items"):
        J.run_judge(items, type("Two", (), {"judge": lambda self, it: ["A", "B"]})())
    with pytest.raises(ValueError, match="'C' for post 'p1'"):
        J.run_judge(items, type("Bad", (), {"judge": lambda self, it: ["C"]})())


# -- bootstrap ---------------------------------------------------------------------------------------

def test_bootstrap_is_reproducible_and_seed_dependent():
    x = np.random.default_rng(1).choice([0.0, 0.5, 1.0], size=50)
    assert J.bootstrap_ci(x, seed=3) == J.bootstrap_ci(x, seed=3)
    assert J.bootstrap_ci(x, seed=3) != J.bootstrap_ci(x, seed=4)


def test_bootstrap_contains_estimate_and_shrinks_with_data():
    """Half wins: the 95% CI width is about 2 * 1.96 * sqrt(0.25 / n) = 0.098 for n = 400."""
    small, large = np.tile([1.0, 0.0], 10), np.tile([1.0, 0.0], 200)
    lo_s, hi_s = J.bootstrap_ci(small)
    lo_l, hi_l = J.bootstrap_ci(large)
    assert lo_s <= 0.5 <= hi_s and lo_l <= 0.5 <= hi_l
    assert hi_l - lo_l < hi_s - lo_s
    assert 0.08 < hi_l - lo_l < 0.12


def test_bootstrap_degenerate_cases():
    assert J.bootstrap_ci(np.ones(30)) == (1.0, 1.0)
    assert J.bootstrap_ci(np.array([0.5])) == (0.5, 0.5)
    assert all(math.isnan(v) for v in J.bootstrap_ci(np.array([])))


def test_compare_does_not_depend_on_line_order(files, tmp_path):
    """Per-community CIs come from (seed, community), so the same posts in another order give the same result."""
    a, b = files
    a2 = write(tmp_path / "a2.jsonl", list(reversed(a.read_text().splitlines())))
    r1, r2 = J.compare(a, b, LongerJudge(), seed=5), J.compare(a2, b, LongerJudge(), seed=5)
    assert r1["communities"] == r2["communities"] and r1["overall"] == r2["overall"]
    assert r1["communities"]["r/a"]["ci95"] == list(J.bootstrap_ci(np.array([1, 0.5, 0, 1]), 1000,
                                                                   J.community_seed(5, "r/a")))


def test_community_ci_does_not_depend_on_other_communities(tmp_path):
    """r/b's CI is the same with or without r/a's posts (seeds come from the community name, not its position)."""
    lengths = {f"b{i:02d}": ("r/b", "x" * (i % 3), "x") for i in range(30)}  # B wins, tie, A wins, ...
    lengths.update({f"a{i}": ("r/a", "xx", "x") for i in range(5)})

    def pair(ids, tag):
        return [write(tmp_path / f"{side}{tag}.jsonl", [row(p, lengths[p][0], lengths[p][k]) for p in ids])
                for side, k in (("a", 1), ("b", 2))]
    alone = J.compare(*pair([p for p in lengths if p.startswith("b")], "_rb"), LongerJudge())
    both = J.compare(*pair(list(lengths), "_all"), LongerJudge())
    assert alone["communities"]["r/b"] == both["communities"]["r/b"]
    assert len({J.community_seed(0, "r/a"), J.community_seed(0, "r/b"), J.community_seed(1, "r/a")}) == 3


# -- bad inputs --------------------------------------------------------------------------------------

def test_missing_file(tmp_path):
    with pytest.raises(J.PredictionFileError, match="nope.jsonl: prediction file not found"):
        J.read_predictions(tmp_path / "nope.jsonl")


@pytest.mark.parametrize("bad, message", [
    ('{"post_id": "p2", ', r"x.jsonl:2: not valid JSON"),
    ("[1, 2]", r"x.jsonl:2: expected a JSON object, got list"),
    ({k: v for k, v in row("p2", "r/a", "r").items() if k != "response"}, r"x.jsonl:2: missing field 'response'"),
    (row("p2", "r/a", "r", title=5), r"x.jsonl:2: field 'title' must be a string, got int"),
    (row("p1", "r/a", "again"), r"x.jsonl:2: post_id 'p1' already on line 1"),
])
def test_bad_lines_name_file_line_and_field(tmp_path, bad, message):
    path = write(tmp_path / "x.jsonl", [row("p1", "r/a", "r"), bad])
    with pytest.raises(J.PredictionFileError, match=message):
        J.read_predictions(path)


def test_different_posts_error_or_intersect(tmp_path):
    a = write(tmp_path / "a.jsonl", [row(p, "r/a", "xx") for p in ("p1", "p2", "p3", "p4")])
    b = write(tmp_path / "b.jsonl", [row(p, "r/a", "x") for p in ("p2", "p3", "p9")])
    with pytest.raises(J.AlignmentError, match=r"2 only in .*a.jsonl \('p1', 'p4'\), 1 only in .*b.jsonl \('p9'\)"):
        J.compare(a, b, LongerJudge())
    result = J.compare(a, b, LongerJudge(), intersect=True)
    assert result["alignment"] == {"posts_a": 4, "posts_b": 3, "compared": 2, "only_a": 2, "only_b": 1}
    assert result["overall"]["wins"] == 2


def test_no_shared_posts_is_an_error_even_with_intersect(tmp_path):
    a, b = write(tmp_path / "a.jsonl", [row("p1", "r/a", "x")]), write(tmp_path / "b.jsonl", [row("p2", "r/a", "x")])
    with pytest.raises(J.AlignmentError, match="no posts in common"):
        J.compare(a, b, LongerJudge(), intersect=True)


def test_true_community_must_agree(tmp_path):
    a = write(tmp_path / "a.jsonl", [row("p1", "r/a", "x"), row("p2", "r/a", "x")])
    b = write(tmp_path / "b.jsonl", [row("p1", "r/a", "x"), row("p2", "r/b", "x")])
    with pytest.raises(J.AlignmentError, match=r"1 posts .* e.g. 'p2': 'r/a' vs 'r/b'"):
        J.compare(a, b, LongerJudge())


# -- outputs -----------------------------------------------------------------------------------------

def test_write_json_is_strict_json_and_leaves_no_temp_file(files, tmp_path):
    result = J.compare(*files, LongerJudge())
    out = tmp_path / "out" / "result.json"
    write_json(out, result)
    assert json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON {c}")) == result
    assert [p.name for p in out.parent.iterdir()] == ["result.json"]


def test_plot_win_rates_writes_a_png(files, tmp_path):
    first = J.compare(*files, LongerJudge(), name_a="context", name_b="no context")
    second = {**first, "b": "random", "communities": {**first["communities"], "r/c": {"win_rate": None,
                                                                                      "ci95": [None, None]}}}
    out = tmp_path / "plots" / "win_rates.png"
    J.plot_win_rates([first, second], out, title="context helps")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in out.parent.iterdir()] == ["win_rates.png"]


def test_format_table(files):
    table = J.format_table(J.compare(*files, LongerJudge(), name_a="long", name_b="short")).splitlines()
    assert table[0] == "| community | n | wins | ties | losses | win rate (long vs short) | 95% CI |"
    assert table[2].startswith("| r/a | 4 | 2 | 1 | 1 | 0.625 | [")
    assert table[3].startswith("| r/b | 2 | 1 | 0 | 1 | 0.500 | [")
    assert table[4].startswith("| **all** | 6 | 3 | 1 | 2 | 0.583 | [")
    assert len(table) == 5
