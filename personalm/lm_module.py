"""Where checkpoints written before the move name these (their pickled hyperparameters hold a
``personalm.lm_module.GenerationSettings``); the code is in ``personalm.training``."""

from personalm.training.base import CausalLMModule
from personalm.training.generation import GenerationSettings

__all__ = ["CausalLMModule", "GenerationSettings"]
