"""Models: loading tokenizers and causal LMs or reward models (Hub id, local folder, ``embedded:tiny-llama``),
LoRA through peft, fp32 trainable weights, and the Hugging Face export.

Owns ``loading`` (tokenizers, models, LoRA, fp32 trainable weights), ``export`` (merge in fp32, save, record),
``embedded`` (the tiny default model) and ``rng`` (randomness that leaves the run's alone). May import
``personalm.paths`` only; knows nothing of data, training or evaluation.
"""

from personalm.models.export import EXPORT_RECORD, export_hf, merge_lora_in_fp32
from personalm.models.loading import (
                                      LLAMA_TARGETS,
                                      LoraSettings,
                                      add_lora,
                                      compute_dtype,
                                      load_causal_lm,
                                      load_reward_model,
                                      load_tokenizer,
                                      resolve,
                                      upcast_trainable,
)

__all__ = ["EXPORT_RECORD", "LLAMA_TARGETS", "LoraSettings", "add_lora", "compute_dtype", "export_hf", "load_causal_lm",
           "load_reward_model", "load_tokenizer", "merge_lora_in_fp32", "resolve", "upcast_trainable"]
