"""Loading tokenizers and models (Hub id, local folder, or the embedded default), LoRA, fp32 trainable weights."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from personalm.models import embedded
from personalm.models.rng import rng_untouched
from personalm.paths import is_embedded, local_path

# Llama's attention and MLP projections; other architectures name theirs differently (set target_modules).
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# what each mixed precision computes in: the dtype evaluation holds its weights in (Lightning's precision names)
COMPUTE_DTYPES = {"bf16-mixed": "bfloat16", "16-mixed": "float16"}


def compute_dtype(precision: Optional[str]) -> Optional[str]:
    """The dtype a run under ``precision`` computes in, for weights that need no fp32 copy (evaluation,
    generation, a judge); None where it computes in the weights' own dtype (``32-true``)."""
    return COMPUTE_DTYPES.get(str(precision)) if precision is not None else None


@dataclass
class LoraSettings:
    """LoRA through peft; defaults are the paper's (r 64, alpha 16, dropout 0.1)."""

    r: int = 64
    alpha: int = 16
    dropout: float = 0.1
    target_modules: list[str] = field(default_factory=lambda: list(LLAMA_TARGETS))
    merge_on_export: bool = True
    """Export merged weights (a plain HF model). False exports the adapter only (loads with peft)."""


def resolve(name_or_path: str) -> str:
    """``embedded:<name>`` -> its shipped folder; a local folder -> itself; anything else is a Hub id."""
    if is_embedded(name_or_path):
        return str(embedded.model_dir(name_or_path))
    try:
        path = local_path(name_or_path)
    except FileNotFoundError:
        raise FileNotFoundError(f"model folder {name_or_path} does not exist") from None
    return str(path) if path is not None else name_or_path


def load_tokenizer(name_or_path: str):
    """Tokenizer with a pad token (EOS stands in where the model has none; padding is masked anyway)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve(name_or_path))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if tok.eos_token_id is None:
        raise ValueError(f"tokenizer of {name_or_path} has no EOS token; responses must end in one")
    return tok


def _has_weights(folder: Path) -> bool:
    return any(folder.glob("*.safetensors")) or any(folder.glob("*.bin")) or (folder / "adapter_config.json").exists()


def load_causal_lm(name_or_path: str, dtype: Optional[str] = None, lora: Optional[LoraSettings] = None,
                   gradient_checkpointing: bool = False):
    """A causal LM in train mode (transformers 5 returns eval mode), optionally wrapped with LoRA.

    The embedded default has no weights on disk: it is initialised from its config under a fixed seed.
    A folder holding a peft adapter (``adapter_config.json``) is loaded with its base model.
    """
    return _load("causal", name_or_path, dtype, lora, gradient_checkpointing)


def load_reward_model(name_or_path: str, dtype: Optional[str] = None, lora: Optional[LoraSettings] = None,
                      gradient_checkpointing: bool = False, pad_token_id: Optional[int] = None):
    """A causal LM backbone with a scalar head (``AutoModelForSequenceClassification``, one label).

    From a causal LM (e.g. an SFT export) the head is new (randomly initialised); from a saved reward
    model it is the trained one. The head reads the last non-padding token, found with ``pad_token_id``.
    """
    return _load("reward", name_or_path, dtype, lora, gradient_checkpointing, pad_token_id)


def _load(kind: str, name_or_path: str, dtype: Optional[str], lora: Optional[LoraSettings],
          gradient_checkpointing: bool, pad_token_id: Optional[int] = None):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForCausalLM if kind == "causal" else AutoModelForSequenceClassification
    extra = {} if kind == "causal" else {"num_labels": 1, "pad_token_id": pad_token_id}
    torch_dtype = getattr(torch, dtype) if dtype else None
    source = resolve(name_or_path)
    folder = Path(source)
    if is_embedded(name_or_path) and not _has_weights(folder):
        config = AutoConfig.from_pretrained(source, **extra)
        with rng_untouched(seed=embedded.INIT_SEED):
            model = auto.from_config(config, dtype=torch_dtype)
    elif (folder / "adapter_config.json").exists():
        from peft import AutoPeftModelForCausalLM, AutoPeftModelForSequenceClassification

        peft_auto = AutoPeftModelForCausalLM if kind == "causal" else AutoPeftModelForSequenceClassification
        model = peft_auto.from_pretrained(source, dtype=torch_dtype, is_trainable=True, **extra)
    else:
        model = auto.from_pretrained(source, dtype=torch_dtype, **extra)
    finish_loading(model, gradient_checkpointing, causal=kind == "causal")
    if lora is not None and not hasattr(model, "peft_config"):
        model = add_lora(model, lora, kind)
    model.train()
    return model


def finish_loading(model, gradient_checkpointing: bool, causal: bool = True) -> None:
    """What a loaded model gets however it was built: a causal LM's generation pad id defaulting to the model's,
    and gradient checkpointing when asked."""
    if causal and model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = model.config.pad_token_id
    if gradient_checkpointing:
        model.gradient_checkpointing_enable()


def add_lora(model, lora: LoraSettings, kind: str = "causal"):
    """Wrap ``model`` with new LoRA adapters (peft); only they are trainable."""
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules,
        task_type="CAUSAL_LM" if kind == "causal" else "SEQ_CLS"))


def upcast_trainable(model: torch.nn.Module, dtype: torch.dtype = torch.float32) -> int:
    """Hold every trainable tensor in fp32; returns how many elements were upcast.

    ``bf16-mixed`` computes in bf16 but keeps no fp32 master copy of weights that are themselves bf16:
    AdamW's update (about lr: 2e-7 in the paper's DPO) then rounds away against bf16's step of ~4e-3 of
    the weight. peft already keeps LoRA adapters in fp32; a trainable head (the reward model's ``score``,
    copied by peft's ``modules_to_save``) and full fine-tuning's weights are upcast here. Frozen weights
    keep their dtype: a bf16 base stays bf16.
    """
    upcast = 0
    for p in model.parameters():
        if p.requires_grad and p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)
            upcast += p.numel()
    return upcast
