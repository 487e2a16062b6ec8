"""The Hugging Face export of a trained model: LoRA merged in fp32, weights saved in a dtype that keeps the
change, and a record of what was done (``personalm_export.json``)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Optional

import torch

from personalm.paths import replace_dir

EXPORT_RECORD = "personalm_export.json"  # in an export: the dtype it was saved in and how LoRA was treated


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


def export_hf(model, tokenizer, out_dir: str, merge_lora: bool = True, dtype: Optional[str] = "float32",
              extra_files: Optional[dict] = None):
    """Save in Hugging Face format (``save_pretrained``): plain transformers (or peft) loads it back.

    Written into a temporary folder beside ``out_dir`` and moved into place whole (``extra_files``, name ->
    text, go in with it), so an export is never half written nor mixed with the files of an older one.

    With LoRA and ``merge_lora`` the adapters are merged in fp32, in place (no second copy of a 7B model in
    memory), and the merged, plain model is returned; use it instead of ``model`` after. The weights are
    saved in ``dtype`` (default fp32, which keeps every update; ``bfloat16`` halves the files but rounds
    small updates away; None: as held, or fp32 where a merge left the model in mixed dtypes, which one
    ``config.json`` dtype could not describe). ``personalm_export.json`` records what was done; loading with
    ``dtype: null`` (transformers' ``"auto"``) gives the weights back in the dtype they were saved in.
    """
    out = Path(out_dir)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
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
    model.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    for name, text in {EXPORT_RECORD: json.dumps(record, indent=2), **(extra_files or {})}.items():
        (tmp / name).write_text(text)
    replace_dir(tmp, out)
    return model
