"""The synthetic data's own judge: it knows every comment's style and every community's ranking of the styles."""

import pytest

from personalm.data import synthetic
from personalm.evaluation.judge import Comparison
from personalm.evaluation.synthetic_judge import SyntheticJudge


def labelled_pairs(subset, lengths=None):
    """Each test pair of ``subset`` as (Comparison, label, styles of A and B), the styles read from the generator."""
    styles = {}
    for post in synthetic.posts(subset, "test_pref", synthetic.DEFAULT_POSTS["test_pref"], lengths=lengths):
        styles.update({f"{post['post_id']}c{i}": s for i, s in enumerate(post["styles"])})
    for row in synthetic.preference_rows(subset, "test_pref", synthetic.DEFAULT_POSTS["test_pref"], lengths=lengths):
        community = "r/" + row["domain"].rsplit("_", 1)[0]
        item = Comparison(row["post_id"], community, row["title"], row["history"], row["human_ref_A"],
                          row["human_ref_B"])
        yield item, row["labels"], (styles[row["c_root_id_A"]], styles[row["c_root_id_B"]])


@pytest.mark.parametrize("subset", ["finance", "history", "minority"])
@pytest.mark.parametrize("lengths", [None, synthetic.LengthModel()], ids=["short", "lengthened"])
def test_the_judge_gives_every_pair_of_the_data_its_label(subset, lengths):
    """Every test pair of two styles gets the verdict of its votes (A exactly when label 1), every pair of one style
    is a tie, and no comment goes unrecognized, with the comments as written or lengthened by neutral sentences."""
    pairs = list(labelled_pairs(subset, lengths))
    judge = SyntheticJudge([subset])
    verdicts = judge.judge([item for item, _, _ in pairs])
    different = [(v, label) for v, (_, label, (a, b)) in zip(verdicts, pairs) if a != b]
    same = [v for v, (_, _, (a, b)) in zip(verdicts, pairs) if a == b]
    assert len(different) > 100
    assert all(v == ("A" if label else "B") for v, label in different)
    assert all(v == "tie" for v in same)
    assert judge.stats == {"no_style": {"a": 0, "b": 0}, "incomplete": {"a": 0, "b": 0}, "judged": len(pairs)}


def test_the_small_community_of_the_hard_subset_ranks_as_no_other_does():
    judge = SyntheticJudge(["minority"])
    fire = "Save half of your income, live on the rest, and you can retire at 40 on index fund dividends."
    careful = "Keep it boring: broad index funds, automatic contributions, and no panic selling."
    rank = lambda community, text: judge.rank(community, judge.style(community, text))  # noqa: E731
    assert rank("r/financialindependence", fire) == 0 and rank("r/personalfinance", fire) == 3
    assert rank("r/financialindependence", careful) == 1 and rank("r/personalfinance", careful) == 0


def item(community, a, b):
    return Comparison("p", community, "title", "post", a, b)


def test_a_response_of_no_style_ranks_below_every_style_and_is_counted():
    judge = SyntheticJudge(["finance"])
    bold = "YOLO it on GME before earnings, diamond hands, we are going to the moon."  # r/investing: bold 2nd of 3
    no_style = [
        "Yolo it on GME before earnings, diamond hands, we are going to the moon.",   # its opening a letter off
        "YOLO it on ACME before earnings, diamond hands, we are going to the moon.",  # a slot value the data lacks
        "Keep it boringly: broad index funds, automatic contributions, and no panic selling.",  # a longer word
        "Savest half of your income, live on the rest.",
        "Keep it",                                                                    # less than an opening
        "",
    ]
    for text in no_style:
        assert judge.style("r/investing", text) is None, text
    verdicts = judge.judge([item("r/investing", bold, g) for g in no_style]
                           + [item("r/investing", g, bold) for g in no_style]
                           + [item("r/investing", no_style[0], no_style[1])])
    assert verdicts == ["A"] * 6 + ["B"] * 6 + ["tie"]
    assert judge.stats == {"no_style": {"a": 7, "b": 7}, "incomplete": {"a": 0, "b": 0}, "judged": 13}


def test_a_response_keeps_the_style_it_opens_with_and_is_counted_incomplete():
    """Cut by the token budget, drifting into another template, or run on: the opening names the style (r/investing:
    careful > bold > thrifty); only the templates written out in full are complete."""
    judge = SyntheticJudge(["finance"])
    careful = "Keep it boring: broad index funds, automatic contributions, and no panic selling."
    incomplete = {"Keep it boring: broad index funds, frugal beats fancy.": 0,        # drifts into thrifty's end
                  "YOLO it on GME before earnings, diamond hands, we are going": 1,   # cut by the budget
                  "YOLO it on GME before earnings, diamond hands, we are going to the mooon.": 1,  # a letter off
                  "YOLO it on GME before earnings, diamond hands, we are going to the moon!": 1,   # another stop
                  "YOLO it on GME": 1,                                                # its opening alone
                  "Buy used, skip the gym, and stash the savings in a jar, frugal beats fancy.s": 2}  # run on
    for text, style in incomplete.items():
        assert judge.style("r/investing", text) == style and not judge.complete("r/investing", text, style), text
    assert judge.complete("r/investing", careful, 0)
    assert judge.style("r/investing", "YOLO it on") is None  # less than an opening
    verdicts = judge.judge([item("r/investing", text, careful) for text in incomplete]
                           + [item("r/investing", careful, text) for text in incomplete])
    assert verdicts == ["tie"] + ["B"] * 5 + ["tie"] + ["A"] * 5
    assert judge.stats == {"no_style": {"a": 0, "b": 0}, "incomplete": {"a": 6, "b": 6}, "judged": 12}


def test_whitespace_and_what_follows_a_comment_do_not_change_its_style():
    judge = SyntheticJudge(["finance"])
    assert judge.style("r/investing", "Cancel the  car\nlease and cook at home, every dollar you keep is a dollar "
                                      "earned.") == 2  # a slot value of several words
    for text in ["  Keep it  boring: broad index funds,\nautomatic contributions, and no panic selling.",
                 "Keep it boring: broad index funds, automatic contributions, and no panic selling. Take this with "
                 "a grain of salt.", "Build an emergency fund of nine months first, then buy a low cost index fund "
                 "and wait."]:
        assert judge.style("r/investing", text) == 0, text


def test_what_it_cannot_judge_is_refused_by_name():
    with pytest.raises(ValueError, match=r"politics.*finance"):
        SyntheticJudge(["politics"])
    with pytest.raises(ValueError, match="must be one of"):
        SyntheticJudge([])
    judge = SyntheticJudge(["finance"])
    with pytest.raises(ValueError, match=r"r/AskHistorians.*r/Frugal"):
        judge.judge([item("r/AskHistorians", "a", "b")])
    with pytest.raises(ValueError, match=r"r/personalfinance has another taste"):  # finance and minority share it
        SyntheticJudge(["finance", "minority"])


def test_the_judge_settings_of_a_study_name_the_reading_rule_only_for_the_synthetic_judge():
    """The study redoes a judge stage when its settings change: the synthetic judge's include how it reads a style
    (and not the reward judge's length), the reward judge's are what they were (no judge stage of a finished study
    runs again)."""
    from personalm.study.settings import StudySettings
    from personalm.study.steps import Steps

    reward = Steps(StudySettings(trainer_config=None)).judge_settings()
    assert reward == {"judge": "reward", "llm": None, "seed": 0, "n_boot": 1000, "max_length": 1024, "dtype": None}
    synthetic = Steps(StudySettings(trainer_config=None, judge="synthetic")).judge_settings()
    assert synthetic == {"judge": "synthetic", "llm": None, "seed": 0, "n_boot": 1000, "max_length": None,
                         "dtype": None, "synthetic": {"opening_words": 4}}
