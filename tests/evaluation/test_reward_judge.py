"""The reward-model judge: scores in the true community's prompt, order-free, refuses what it cannot judge."""

import pytest

from personalm.evaluation.judge import Comparison
from personalm.evaluation.reward_judge import RewardJudge


def _items(pairs):
    return [Comparison(f"p{i}", community, "What should I do with a bonus?", "I am 29.", a, b)
            for i, (community, a, b) in enumerate(pairs)]


def test_reward_judge_scores_in_the_true_community_and_is_order_free(reward_run):
    fit, _ = reward_run
    judge = RewardJudge(fit.model.export_path, max_length=128)
    careful = "Build an emergency fund of six months first, then buy a low cost index fund and wait."
    bold = "YOLO it on GME before earnings, diamond hands, we are going to the moon."
    items = _items([("r/personalfinance", careful, bold), ("r/wallstreetbets", careful, bold),
                    ("r/personalfinance", bold, careful), ("r/wallstreetbets", bold, careful),
                    ("r/personalfinance", careful, careful)])
    verdicts = judge.judge(items)
    # the synthetic communities' tastes (personalm.data.synthetic): r/personalfinance ranks the careful style first
    # and the bold one last, r/wallstreetbets the other way round; whichever of A and B holds it, the taste wins
    assert verdicts == ["A", "B", "B", "A", "tie"], verdicts
    scores = judge.scores(items)
    (careful_pf, bold_pf), (careful_wsb, bold_wsb) = scores[0], scores[1]
    assert careful_pf > bold_pf and bold_wsb > careful_wsb, scores  # the community in the prompt sets the direction
    assert scores[2] == pytest.approx(scores[0][::-1], abs=1e-4)  # each response scored alone: its place is moot
    assert scores[4][0] == pytest.approx(scores[4][1], abs=judge.tie_margin)  # the same text twice, scored


def test_reward_judge_refuses_another_tokenizer(reward_run, tmp_path, tokenizer):
    fit, _ = reward_run
    other = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    other.add_tokens(["<|extra|>"])
    other.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="another tokenizer"):
        RewardJudge(fit.model.export_path, tokenizer_name_or_path=str(tmp_path))


def test_reward_judge_refuses_a_model_without_a_scalar_head(sft_run):
    sft, _ = sft_run
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(sft.model.export_path)
    assert getattr(config, "num_labels", 2) != 1  # a causal LM export: a fresh head would be random
    with pytest.raises(ValueError, match="not a reward model"):
        RewardJudge(sft.model.export_path)


def test_reward_judge_in_bf16_holds_bf16_weights_and_judges_as_fp32(reward_run, train_compred):
    """``dtype: bfloat16`` (what the study passes under bf16-mixed): bf16 weights, and on the test pairs' own
    comments (chosen as A, rejected as B) the same verdict as fp32 for at least 95% of them."""
    import torch

    from tests.helpers import read_jsonl

    fit, _ = reward_run
    rows = read_jsonl(train_compred / "finance" / "test_pref.jsonl")
    items = [Comparison(r["post_id"], f"r/{r['domain'].rsplit('_', 1)[0]}", r["title"], r["history"],
                        r["human_ref_A"], r["human_ref_B"]) for r in rows]
    fp32, bf16 = (RewardJudge(fit.model.export_path, max_length=128, dtype=d) for d in (None, "bfloat16"))
    assert {p.dtype for p in fp32.model.parameters()} == {torch.float32}
    assert {p.dtype for p in bf16.model.parameters()} == {torch.bfloat16}
    assert (fp32.tie_margin, bf16.tie_margin) == (1e-4, 1e-2)  # a near-tie is not decided by bf16's rounding
    a, b = fp32.judge(items), bf16.judge(items)
    assert len(items) >= 40 and sum(x == y for x, y in zip(a, b)) >= 0.95 * len(items), (a, b)
    assert len(set(a)) > 1  # not one verdict for every item
