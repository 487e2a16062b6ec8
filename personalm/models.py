"""Loading causal LMs and tokenizers (Hub id, local folder, or the embedded default) and LoRA."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from personalm import embedded

log = logging.getLogger(__name__)

EXPORT_RECORD = "personalm_export.json"  # in an export: the dtype it was saved in and how LoRA was treated

# Llama's attention and MLP projections; other architectures name theirs differently (set target_modules).
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


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
    if embedded.is_embedded(name_or_path):
        return str(embedded.model_dir(name_or_path))
    path = Path(name_or_path).expanduser()
    looks_local = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1  # Hub ids: org/name
    if looks_local and not path.exists():
        raise FileNotFoundError(f"model folder {name_or_path} does not exist")
    return str(path) if path.exists() else name_or_path


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
    if embedded.is_embedded(name_or_path) and not _has_weights(folder):
        config = AutoConfig.from_pretrained(source, **extra)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(embedded.INIT_SEED)
            model = auto.from_config(config, dtype=torch_dtype)
    elif (folder / "adapter_config.json").exists():
        from peft import AutoPeftModelForCausalLM, AutoPeftModelForSequenceClassification

        peft_auto = AutoPeftModelForCausalLM if kind == "causal" else AutoPeftModelForSequenceClassification
        model = peft_auto.from_pretrained(source, dtype=torch_dtype, is_trainable=True, **extra)
    else:
        model = auto.from_pretrained(source, dtype=torch_dtype, **extra)
    if kind == "causal" and model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = model.config.pad_token_id
    if gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if lora is not None and not hasattr(model, "peft_config"):
        model = add_lora(model, lora, kind)
    model.train()
    return model


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


def merge_lora_in_fp32(model):
    """Merge LoRA adapters into base weights upcast to fp32 first, then unload peft's wrappers.

    Merging in the base's bf16 would round a small delta (lr 2e-7) away: the merged model would be the
    starting model. Returns the plain merged model (fp32 where adapters were; other weights unchanged).
    """
    for module in model.modules():
        base = getattr(module, "base_layer", None)
        if base is not None and hasattr(module, "lora_A"):
            for p in base.parameters(recurse=False):
                if p.is_floating_point():
                    p.data = p.data.float()
    return model.merge_and_unload()


def _dtypes(params) -> list[str]:
    return sorted({str(p.dtype).replace("torch.", "") for p in params})


def export_hf(model, tokenizer, out_dir: str, merge_lora: bool = True, dtype: Optional[str] = "float32"):
    """Save in Hugging Face format (``save_pretrained``): plain transformers (or peft) loads it back.

    With LoRA and ``merge_lora`` the adapters are merged in fp32, in place (no second copy of a 7B model in
    memory), and the merged, plain model is returned; use it instead of ``model`` after. The weights are
    saved in ``dtype`` (default fp32, which keeps every update; ``bfloat16`` halves the files but rounds
    small updates away; None: as held, or fp32 where a merge left the model in mixed dtypes, which one
    ``config.json`` dtype could not describe). ``personalm_export.json`` records what was done; loading with
    ``dtype: null`` (transformers' ``"auto"``) gives the weights back in the dtype they were saved in.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    held = {kind: _dtypes(p for p in model.parameters() if p.requires_grad == grad)
            for kind, grad in (("trainable", True), ("frozen", False))}
    record: dict = {"held_in_training": held, "lora": None}
    if hasattr(model, "peft_config") and not merge_lora:  # the adapter alone: peft saves only its weights
        config = next(iter(model.peft_config.values()))
        record.update(lora="adapter only (loads with its base through peft)", base=config.base_model_name_or_path,
                      dtype=_dtypes(p for n, p in model.named_parameters() if "lora_" in n or p.requires_grad))
    else:
        if hasattr(model, "peft_config"):
            model = merge_lora_in_fp32(model)
            record["lora"] = "merged in float32"
        if dtype is None and len(_dtypes(model.parameters())) > 1:
            dtype = "float32"
        if dtype:
            model = model.to(getattr(torch, dtype))
        record["dtype"] = _dtypes(model.parameters())[0]
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    (out / EXPORT_RECORD).write_text(json.dumps(record, indent=2))
    return model
