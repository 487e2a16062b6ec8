"""Reward model: Bradley-Terry loss by hand, per-community accuracy after a short fit, the judge on top."""

import json
import math
from pathlib import Path

import pytest
import torch

from personalm.cli import main
from personalm.judge import Comparison
from personalm.reward import RewardJudge, bradley_terry_loss
from tests.conftest import quiet

REWARD = str(Path(__file__).resolve().parents[1] / "configs" / "demo" / "reward.yaml")


def test_bradley_terry_loss_hand_derived():
    """-log sigmoid(d) with d = r_chosen - r_rejected:
    d = 0: sigmoid = 1/2, loss = ln 2.   d = ln 3: sigmoid = 3/4, loss = ln 4/3.
    d = -ln 3: sigmoid = 1/4, loss = ln 4.   d = 40: loss ~ e^-40 (no overflow, no NaN).
    """
    chosen = torch.tensor([0.5, math.log(3), 0.0, 40.0])
    rejected = torch.tensor([0.5, 0.0, math.log(3), 0.0])
    expected = torch.tensor([math.log(2), math.log(4 / 3), math.log(4), math.exp(-40)])
    torch.testing.assert_close(bradley_terry_loss(chosen, rejected), expected)


def test_bradley_terry_gradient_raises_chosen_and_lowers_rejected():
    """d loss / d r_chosen = -(1 - sigmoid(d)) < 0, d loss / d r_rejected = +(1 - sigmoid(d)) > 0;
    at d = 0 both are -1/2 and +1/2."""
    chosen = torch.zeros(1, requires_grad=True)
    rejected = torch.zeros(1, requires_grad=True)
    bradley_terry_loss(chosen, rejected).sum().backward()
    assert chosen.grad.item() == pytest.approx(-0.5) and rejected.grad.item() == pytest.approx(0.5)


@pytest.fixture(scope="module")
def reward_run(sft_run, train_compred, tmp_path_factory):
    """Reward model from the SFT export, 80 steps on ``train_compred`` (lr 3e-4: at the demo's 1e-3 this
    short run is still near chance, measured 0.53), then ``test`` on test_pref."""
    sft, _ = sft_run
    root = tmp_path_factory.mktemp("reward")
    common = ["--config", REWARD, *quiet(root), f"--data.dataset={train_compred}", "--data.max_train_pairs=null",
              "--data.max_eval_pairs=null"]
    fit = main(["fit", *common, f"--model.init_args.model_name_or_path={sft.model.export_path}",
                "--trainer.max_steps=80", "--trainer.val_check_interval=40", "--model.init_args.lr=3e-4"])
    test = main(["test", *common, f"--model.init_args.model_name_or_path={fit.model.export_path}"])
    return fit, test


def test_reward_model_learns_every_communitys_taste(reward_run):
    _, test = reward_run
    report = json.loads((Path(test.trainer.log_dir) / "test_metrics.json").read_text())["conditioning"]["true"]
    per = {k: v for k, v in report.items() if k.startswith("rewards/accuracies/r_")}
    assert len(per) == 8, per
    assert report["rewards/accuracies"] > 0.7, report["rewards/accuracies"]
    assert min(per.values()) > 0.5, per
    assert report["rewards/accuracies/worst"] == pytest.approx(min(per.values()))
    assert not any(k.startswith("logps/") for k in report)  # a reward model has no log-probs to report


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
    mirror = {"A": "B", "B": "A", "tie": "tie"}
    assert verdicts[2] == mirror[verdicts[0]] and verdicts[3] == mirror[verdicts[1]], verdicts  # order-free
    assert verdicts[4] == "tie"  # the same text twice (scores differ by float noise only)
    scores = judge.scores(items)
    assert scores[0][0] != pytest.approx(scores[1][0], abs=1e-3)  # the community in the prompt matters


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
