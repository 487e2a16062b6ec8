"""Where configs and checkpoints name it (``personalm.dpo.DPOModule``); the code is in ``personalm.training.dpo``."""

from personalm.training.dpo import DPOModule

__all__ = ["DPOModule"]
