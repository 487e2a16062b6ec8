"""Loading a causal LM straight into its FSDP2 shards: host memory per process is its shard, not the model.

Every process builds the model with its parameters on the meta device (buffers such as rotary ``inv_freq``
computed for real: they are small and not in the weight files), shards it (``fully_shard``), allocates only its
shards (``to_empty``) and the first process reads the weights from the safetensors files one tensor at a time
and scatters each to the processes that hold a part of it (``distribute_tensor``, public since torch 2.6).
No process ever holds a whole model: the first holds its shards plus one tensor, the others their shards plus
one tensor's receive buffer. It runs in ``configure_model``, before Lightning restores a checkpoint.

Used for a folder of full weights in safetensors whose tensors are named as the model's parameters (a
``save_pretrained`` folder, e.g. an SFT export), without new LoRA adapters; other sources (Hub ids, the embedded
model, adapter folders, LoRA runs, ``.bin`` files, and a reference whose log-probs are precomputed: its cache key
fingerprints the whole weights) load whole in every process as before.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from personalm.models import resolve
from personalm.models.loading import finish_loading
from personalm.paths import is_embedded


def streamable_folder(name_or_path: str) -> Optional[Path]:
    """The local folder of full safetensors weights ``name_or_path`` names, or None (not streamable)."""
    if is_embedded(name_or_path):
        return None
    try:
        folder = Path(resolve(name_or_path))
    except FileNotFoundError:
        return None
    if not folder.is_dir() or (folder / "adapter_config.json").exists() or not any(folder.glob("*.safetensors")):
        return None
    return folder


@dataclass
class EmptyModel:
    """A causal LM with its parameters on the meta device, and the safetensors files that fill its shards."""

    model: nn.Module
    files: dict[str, Path]  # tensor name -> the file holding it (``weight_index``)


def empty_for_shards(name_or_path: str, dtype: Optional[str],
                     gradient_checkpointing: bool = False) -> Optional[EmptyModel]:
    """``name_or_path``'s model on the meta device, to be sharded and then filled (``fill_shards``) from its
    folder; None where it loads whole (not a local folder of full safetensors weights named as the model's)."""
    folder = streamable_folder(name_or_path)
    if folder is None:
        return None
    files = weight_index(folder)
    model = empty_causal_lm(folder, files, dtype, gradient_checkpointing)
    return EmptyModel(model, files) if model is not None else None


def weight_index(folder: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it (headers only are read)."""
    from safetensors import safe_open

    index = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            index.update(dict.fromkeys(f.keys(), file))
    return index


def empty_causal_lm(folder: Path, files: dict[str, Path], dtype: Optional[str],
                    gradient_checkpointing: bool = False) -> Optional[nn.Module]:
    """The model of ``folder`` with its parameters on the meta device and its buffers real; None when its
    ``files`` do not name every parameter as the model does (then it loads the ordinary way)."""
    from accelerate import init_empty_weights  # a dependency of peft
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype) if dtype else config.dtype)
    if any(name not in files for name, _ in model.named_parameters()):  # tied copies are named once
        return None
    if (folder / "generation_config.json").is_file():  # as from_pretrained reads it
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(folder)
    finish_loading(model, gradient_checkpointing)
    return model.train()


@torch.no_grad()
def fill_shards(model: nn.Module, files: dict[str, Path], device: torch.device) -> None:
    """Allocate this process's shards of a sharded meta model on ``device`` and fill them from ``files`` (tensor
    name -> safetensors file); every process calls this (each tensor is a collective)."""
    import torch.distributed as dist
    from safetensors import safe_open
    from torch.distributed.tensor import DTensor, distribute_tensor

    buffers = {name: b.clone() for name, b in model.named_buffers()}  # to_empty would leave them uninitialised
    model.to_empty(device=device)
    for name, b in model.named_buffers():
        b.copy_(buffers.pop(name))
    first = dist.get_rank() == 0
    for name, p in model.named_parameters():
        full = torch.empty(p.shape, dtype=p.dtype, device=device)
        if first:  # the file opened per tensor: its mapped pages are released with it
            with safe_open(files[name], framework="pt") as f:
                full.copy_(f.get_tensor(name))
        if isinstance(p, DTensor):
            p.copy_(distribute_tensor(full, p.device_mesh, p.placements))
        else:
            dist.broadcast(full, src=0)
            p.copy_(full)
        del full
