"""Where configs saved before the move name it (``personalm.sharding.FSDP2Strategy``, e.g. a run's
``config.yaml``); the code is in ``personalm.training.sharding``."""

from personalm.training.sharding import FSDP2Strategy

__all__ = ["FSDP2Strategy"]
