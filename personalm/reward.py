"""Where configs and checkpoints name it (``personalm.reward.RewardModule``); the code is in
``personalm.training.reward`` (the judge built on a reward model: ``personalm.evaluation.reward_judge``)."""

from personalm.evaluation.reward_judge import RewardJudge
from personalm.training.reward import RewardModule, bradley_terry_loss

__all__ = ["RewardJudge", "RewardModule", "bradley_terry_loss"]
