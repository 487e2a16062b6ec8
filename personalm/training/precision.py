"""What a module computes in, and the precision settings under which training would not train: refused before
any weights load, and trainable weights held in fp32. A part of ``CausalLMModule`` (it reads the module's
``hparams``, ``trainer`` and ``model``)."""

from __future__ import annotations

from typing import Optional

import torch
from lightning.pytorch.utilities import rank_zero_info

from personalm.models import compute_dtype, upcast_trainable

HALF = ("bfloat16", "float16")


class TrainingPrecision:
    """The precision side of ``CausalLMModule``: the dtype a run computes in, the checks of its settings, and
    trainable weights upcast to fp32."""

    @property
    def compute_dtype(self) -> Optional[str]:
        """What the trainer's precision computes in (``bfloat16`` under ``bf16-mixed``), None for ``32-true``."""
        return compute_dtype(self.trainer.precision) if self._trainer is not None else None

    def check_training_precision(self, precision: str) -> None:
        """Refuse, before any weights load, precision settings under which training would not train (the
        CLI calls this before preparing data; ``setup`` again for other callers)."""
        hp = self.hparams
        if precision in ("bf16-true", "16-true"):
            raise ValueError(f"trainer.precision {precision} casts the trainable weights to 16 bits, where AdamW's "
                             f"updates (about lr={hp.lr:g}) round away. Use trainer.precision: bf16-mixed (fp32 "
                             "trainable weights, bf16 compute), as configs/paper/*.yaml do.")
        if hp.dtype in HALF and "mixed" not in precision:
            raise ValueError(f"dtype {hp.dtype} with trainer.precision {precision}: the trainable weights are held "
                             f"in fp32 beside {hp.dtype} frozen ones, which needs autocast. Use trainer.precision: "
                             "bf16-mixed (configs/paper/*.yaml), or dtype: float32.")

    def _check_loaded_precision(self) -> None:
        """A checkpoint saved in 16 bits and loaded as saved (``dtype: null``) has the same need as ``dtype:
        bfloat16``: frozen 16-bit weights beside fp32 trainable ones compute only under autocast."""
        if self._trainer is None or "mixed" in str(self.trainer.precision):
            return
        frozen = {p.dtype for p in self.model.parameters() if not p.requires_grad and p.is_floating_point()}
        half = frozen & {torch.bfloat16, torch.float16}
        if half:
            raise ValueError(f"{self.hparams.model_name_or_path} loaded with frozen {sorted(map(str, half))} weights "
                             f"(dtype: null keeps the checkpoint's dtype) and trainer.precision "
                             f"{self.trainer.precision}: fp32 trainable weights beside them need autocast. Use "
                             "trainer.precision: bf16-mixed, or dtype: float32.")

    @property
    def bf16_compute(self) -> bool:
        return self._trainer is not None and str(self.trainer.precision) == "bf16-mixed"

    def _hold_trainable_in_fp32(self, model, say: bool = False) -> None:
        upcast = upcast_trainable(model)
        if upcast and say:
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            rank_zero_info(
                f"[personalm] {upcast / 1e6:.1f}M trainable weights loaded as {self.hparams.dtype} are held in "
                f"float32 so that small updates are not rounded away: +{upcast * 2 / 2**30:.2f} GiB for the "
                f"weights and +{upcast * 2 / 2**30:.2f} GiB for their fp32 gradients, and AdamW keeps two fp32 "
                f"moments ({trainable * 8 / 2**30:.2f} GiB); the frozen weights (and a DPO reference) stay in "
                "their dtype")
