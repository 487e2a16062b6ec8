"""Where configs and checkpoints name it (``personalm.sft.SFTModule``); the code is in ``personalm.training.sft``."""

from personalm.training.sft import SFTModule

__all__ = ["SFTModule"]
