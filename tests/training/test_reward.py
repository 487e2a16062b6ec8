"""Reward model: Bradley-Terry loss by hand, per-community accuracy after a short fit."""

import json
import math
from pathlib import Path

import pytest
import torch

from personalm.training.reward import bradley_terry_loss


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


def test_reward_model_learns_every_communitys_taste(reward_run):
    _, test = reward_run
    report = json.loads((Path(test.trainer.log_dir) / "test_metrics.json").read_text())["conditioning"]["true"]
    per = {k: v for k, v in report.items() if k.startswith("rewards/accuracies/r_")}
    assert len(per) == 8, per
    assert report["rewards/accuracies"] > 0.7, report["rewards/accuracies"]
    assert min(per.values()) > 0.5, per
    assert report["rewards/accuracies/worst"] == pytest.approx(min(per.values()))
    assert not any(k.startswith("logps/") for k in report)  # a reward model has no log-probs to report
