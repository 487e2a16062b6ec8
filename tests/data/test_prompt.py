"""The prompt template, the community slot, domain normalisation and the random-community ablation."""

import pytest

from personalm.data.prompt import (
    NO_CONTEXT,
    community_string,
    format_prompt,
    normalize_domain,
    prompt_parts,
    random_other_community,
    subreddit,
)

TITLE = "Should I put my bonus into index funds?"
POST = "I am 29 and have 12k saved.\nMy job is stable."


# ----------------------------------------------------------------------------------------------------
# Template


def test_template_with_context_is_exact():
    community = community_string("finance", True)
    assert community == "r/finance"
    expected = "<|domain|>\nr/finance\n<|user|>\n" + TITLE + "\n" + POST + "\n<|assistant|>\n"
    assert format_prompt(community, TITLE, POST) == expected


def test_template_without_context_is_exact():
    community = community_string("finance", False)
    assert community == "Reddit" == NO_CONTEXT
    expected = "<|domain|>\nReddit\n<|user|>\n" + TITLE + "\n" + POST + "\n<|assistant|>\n"
    assert format_prompt(community, TITLE, POST) == expected
    assert "finance" not in format_prompt(community, TITLE, POST)


def test_template_with_empty_post_keeps_both_newlines():
    assert format_prompt("r/Frugal", "Title", "") == "<|domain|>\nr/Frugal\n<|user|>\nTitle\n\n<|assistant|>\n"


def test_prompt_parts_cut_the_template_where_truncation_acts():
    head, title, post, tail = prompt_parts("r/finance", TITLE, POST)
    assert head == "<|domain|>\nr/finance\n<|user|>\n"
    assert title == TITLE + "\n"
    assert post == POST  # only this part may be shortened
    assert tail == "\n<|assistant|>\n"
    assert head + title + post + tail == format_prompt("r/finance", TITLE, POST)


def test_community_string_keeps_case():
    assert community_string("AskHistorians", True) == "r/AskHistorians"


def test_subreddit_adds_r_slash_once():
    """Every place that shows a community (prompts, predictions, the LLM judge, the report) writes it so."""
    assert subreddit("Frugal") == "r/Frugal"
    assert subreddit("r/Frugal") == "r/Frugal"


@pytest.mark.parametrize("value", ["False", "True", "false", 0, 1, None, "yes"])
def test_community_string_rejects_non_bool(value):
    # the original parsed "False" as truthy and so ran the no-context experiment with context
    with pytest.raises(TypeError):
        community_string("finance", value)


# ----------------------------------------------------------------------------------------------------
# Domain normalisation


@pytest.mark.parametrize("domain, expected", [
    ("askhistorians_train", "askhistorians"),
    ("AskHistorians_validation", "AskHistorians"),
    ("personalfinance_test", "personalfinance"),
    ("r/finance", "finance"),
    ("r/Frugal_train", "Frugal"),
    ("r/WallStreetBets", "WallStreetBets"),
    ("  investing_test  ", "investing"),
    ("HistoryMemes", "HistoryMemes"),
    ("gender_sexuality", "gender_sexuality"),  # an underscore that is not a split suffix
    ("my_training", "my_training"),  # "_train" only as a whole suffix
    ("test_subreddit", "test_subreddit"),  # split word at the front is not a suffix
])
def test_normalize_domain(domain, expected):
    assert normalize_domain(domain) == expected


def test_normalize_domain_removes_only_one_leading_r_slash():
    assert normalize_domain("r/history") == "history"
    assert normalize_domain("history") == "history"
    assert normalize_domain("r/r/history") == "r/history"


# ----------------------------------------------------------------------------------------------------
# Random-community ablation

COMMUNITIES = ["personalfinance", "wallstreetbets", "Frugal", "investing", "AskHistorians"]


def test_random_other_community_never_returns_the_true_one():
    for true in COMMUNITIES:
        for i in range(60):
            other = random_other_community(true, f"post{i}", COMMUNITIES, seed=3)
            assert other != true
            assert other in COMMUNITIES


def test_random_other_community_with_duplicates_of_the_true_one_in_the_list():
    pool = ["a", "a", "a", "b", "a"]
    assert {random_other_community("a", f"p{i}", pool, seed=0) for i in range(20)} == {"b"}


def test_random_other_community_is_reproducible_for_same_seed_and_post():
    first = [random_other_community("Frugal", f"p{i}", COMMUNITIES, seed=7) for i in range(40)]
    again = [random_other_community("Frugal", f"p{i}", COMMUNITIES, seed=7) for i in range(40)]
    assert first == again
    # the order in which communities are listed does not matter either
    shuffled = list(reversed(COMMUNITIES))
    assert first == [random_other_community("Frugal", f"p{i}", shuffled, seed=7) for i in range(40)]


def test_random_other_community_varies_across_posts_and_seeds():
    drawn = {random_other_community("Frugal", f"p{i}", COMMUNITIES, seed=7) for i in range(100)}
    assert len(drawn) >= 3, drawn  # 4 candidates, 100 posts: a constant draw would be a bug
    by_seed = [tuple(random_other_community("Frugal", f"p{i}", COMMUNITIES, seed=s) for i in range(30))
               for s in (0, 1)]
    assert by_seed[0] != by_seed[1]


@pytest.mark.parametrize("pool", [["finance"], ["finance", "finance"], []])
def test_random_other_community_errors_with_one_community(pool):
    with pytest.raises(ValueError, match="at least two communities"):
        random_other_community("finance", "p1", pool, seed=0)
