"""How packed rows attend: SDPA's kernel checked on CUDA, or FlexAttention with a BlockMask.

- **SDPA** (the default): a packed row's mask is a dense ``[rows, 1, T, T]`` boolean
  (``personalm.data.packing.attention_mask_4d``). On CUDA the forward runs under ``sdpa_kernel`` with the fused
  kernels only (memory-efficient, flash, cuDNN), never the math kernel, which holds ``[rows, heads, T, T]``
  scores in memory; where none of them can run, the cause (torch's own reasons) is warned once and the forward
  runs again under the math kernel. The kernel that ran is said once per model. On a CPU no list is set (the CPU
  has its own fused kernel and math), and the message says so.
- **FlexAttention** (``attn_implementation="flex_attention"``, the module's ``attention`` setting): the same mask
  as a ``BlockMask`` built from each token's group and branch (``block_mask``); blocks outside every span are
  skipped, so a packed row wider than one span costs what its spans cost. transformers 5 takes a ``BlockMask`` as
  ``attention_mask`` (masking_utils returns a 4D mask as it is) and compiles ``flex_attention`` on its first call.
  Its forward runs on a CPU; its backward does not (torch 2.13).

Under gradient checkpointing, the recomputation in backward runs outside the kernel list, under torch's default
choice; that picks the same fused kernel (flash, then memory-efficient, come before math in torch's order), except
where cuDNN alone could run (math comes before cuDNN there).
"""

from __future__ import annotations

import warnings
from typing import Callable, Optional, Sequence, TypeVar

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities.rank_zero import WarningCache
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode

from personalm.data.packing import SHARED

FLEX = "flex_attention"
FUSED = (SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION)
NO_KERNEL = ("No available kernel", "No viable backend")  # torch's errors when no enabled kernel can run (CUDA, CPU)
KERNEL = "_personalm_attention_kernel"  # set on a model once the kernel its packed rows ran under was said
MESSAGES = WarningCache()
T = TypeVar("T")


# -------------------------------------------------------------------------- the mask as a BlockMask


def mask_mod(group: torch.Tensor, branch: torch.Tensor) -> Callable:
    """FlexAttention's ``mask_mod`` for packed rows (``group``, ``branch`` [rows, T]): query q sees key k iff k <= q,
    both in the same group, and k is shared or on q's branch; as ``attention_mask_4d``, padding (group -1) sees
    earlier padding of its row."""

    def visible(b, h, q, k):
        same = group[b, q] == group[b, k]
        return (k <= q) & same & ((branch[b, k] == SHARED) | (branch[b, q] == branch[b, k]))

    return visible


def block_mask(group: torch.Tensor, branch: torch.Tensor):
    """The packed rows' mask as a ``BlockMask`` (one for all heads), on the tokens' device."""
    from torch.nn.attention.flex_attention import create_block_mask

    rows, t = group.shape
    return create_block_mask(mask_mod(group, branch), rows, None, t, t, device=group.device)


# -------------------------------------------------------------------------- the SDPA kernel, checked


class _SeenKernels(TorchFunctionMode):
    """The kernel each ``scaled_dot_product_attention`` call dispatches to under the kernels enabled now (torch's
    own choice function, given the call's arguments)."""

    def __init__(self):
        super().__init__()
        self.kernels: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            choice = torch._fused_sdp_choice(*args, **kwargs)
            self.kernels.append(next((b.name for b in SDPBackend.__members__.values() if b.value == choice),
                                     str(choice)))
        return func(*args, **kwargs)


def _base(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _observed(model: nn.Module, forward: Callable[[], T], where: str) -> T:
    """``forward()``; the first time for ``model`` (or after a change of kernel), the kernel it ran is said."""
    base = _base(model)
    if getattr(base, KERNEL, (None,))[0] == where:
        return forward()
    with _SeenKernels() as seen:
        out = forward()
    kernels = ", ".join(sorted(set(seen.kernels))) or "none (no scaled_dot_product_attention call)"
    MESSAGES.info(f"[personalm] packed rows attend with SDPA kernel {kernels} ({where})")
    setattr(base, KERNEL, (where, kernels))
    return out


def kernel_used(model: nn.Module) -> Optional[str]:
    """The SDPA kernel(s) the model's packed rows ran under last said, and where; None before."""
    said = getattr(_base(model), KERNEL, None)
    return None if said is None else f"{said[1]} ({said[0]})"


def _no_kernel(error: RuntimeError) -> bool:
    return not isinstance(error, torch.OutOfMemoryError) and any(s in str(error) for s in NO_KERNEL)


def attend(model: nn.Module, forward: Callable[[], T], device_type: str,
           kernels: Sequence[SDPBackend] = FUSED) -> T:
    """Run ``forward`` (the model's forward over packed rows) under the attention rules of this module.

    SDPA on CUDA: under ``kernels`` (fused ones, no math); where none runs, torch's reasons are warned (once per
    cause) and ``forward`` runs again under the math kernel. Another device or implementation: as it is, said once.
    ``device_type`` is the tokens' device type (tests name ``cuda`` to check the decision on a CPU).
    """
    implementation = getattr(_base(model).config, "_attn_implementation", None)
    if implementation != "sdpa":
        MESSAGES.info(f"[personalm] packed rows attend with {implementation} on {device_type} (no SDPA kernel list)")
        return forward()
    if device_type != "cuda":
        return _observed(model, forward, f"{device_type}: torch's own choice, the kernel list applies on CUDA only")
    names = "/".join(k.name for k in kernels)
    with warnings.catch_warnings(record=True) as caught:  # torch says why each kernel cannot run as warnings
        warnings.simplefilter("always")
        try:
            with sdpa_kernel(list(kernels)):
                out = _observed(model, forward, f"cuda, kernel list {names}")
        except RuntimeError as error:
            if not _no_kernel(error):
                raise
            cause = "; ".join([str(w.message).strip() for w in caught] + [str(error).strip()])
            out = None
    for w in caught:  # the forward's other warnings, passed on (shown as the filters say, once by default)
        if out is not None or w.category is not UserWarning:
            warnings.warn(w.message, stacklevel=2)
    if out is not None:
        return out
    MESSAGES.warn(f"[personalm] no fused SDPA kernel ({names}) runs these packed rows, so they fall back to the "
                  f"math kernel (it holds [rows, heads, T, T] scores): {cause}")
    with sdpa_kernel([SDPBackend.MATH]):
        return _observed(model, forward, "cuda, math kernel after the fused ones failed")


def use_attention(model: nn.Module, implementation: Optional[str]) -> None:
    """Set the attention implementation (``sdpa``, ``flex_attention``, ``eager``) of a loaded model; None keeps it."""
    base = _base(model)
    if implementation and base.config._attn_implementation != implementation:
        base.set_attn_implementation(implementation)
