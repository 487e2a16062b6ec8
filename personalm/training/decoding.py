"""What ``predict`` decodes with, under either backend (``generation``: Hugging Face, ``vllm_generation``: vLLM):
the settings and where a response ends."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional


@dataclass
class VLLMSettings:
    """vLLM's engine (``backend: vllm``); where vLLM is not installed, asking for it fails at start."""

    prompts_per_call: int = 512
    """Prompts handed to the engine at once (it batches them continuously); their predictions are written when
    the call returns, so a kill loses at most this many. Replaces ``data.eval_batch_size`` for ``predict``."""
    tensor_parallel_size: int = 1
    """GPUs one model is split over (vLLM's own workers; ``trainer.devices`` stays 1)."""
    gpu_memory_utilization: float = 0.9
    """Share of each GPU's memory vLLM may take (weights, activations and the paged KV cache)."""
    max_num_seqs: Optional[int] = None
    """Sequences decoded together at most (None: vLLM's default)."""
    max_model_len: Optional[int] = None
    """Tokens of prompt + response at most (None: the model's context length)."""
    cpu_kv_cache_gib: float = 4.0
    """On a CPU: GiB of KV cache (``VLLM_CPU_KVCACHE_SPACE``; unset, vLLM asks for most of the memory)."""
    enforce_eager: Optional[bool] = None
    """No CUDA graphs / torch.compile (None: eager on a CPU, where compiling costs minutes; graphs on a GPU)."""


@dataclass
class GenerationSettings:
    """Generation for ``predict``; defaults are the paper's (greedy, repetition penalty 1.1)."""

    max_new_tokens: int = 1024
    do_sample: bool = False
    repetition_penalty: float = 1.1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    """Sampling from the k likeliest tokens only (0: all). Passed to both backends, so neither takes another default
    (transformers' own is 50; a model folder's generation config is not read for it)."""
    backend: Literal["hf", "vllm"] = "hf"
    """``hf``: transformers' ``generate`` in Lightning's predict loop, batches of ``data.eval_batch_size``, any
    strategy. ``vllm``: vLLM's engine (continuous batching, paged KV cache), one process."""
    vllm: VLLMSettings = field(default_factory=VLLMSettings)

    def __post_init__(self):
        if isinstance(self.vllm, dict):  # from a checkpoint's or hparams.yaml's plain data
            self.vllm = VLLMSettings(**self.vllm)
        if self.backend not in ("hf", "vllm"):
            raise ValueError(f"generation.backend must be hf or vllm, got {self.backend!r}")


def until_eos(ids: list[int], eos_id: int) -> list[int]:
    """``ids`` up to and including the first EOS (what follows it in a batch is padding)."""
    return ids[:ids.index(eos_id) + 1] if eos_id in ids else ids
