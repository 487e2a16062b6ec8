"""Generation for ``predict``: one response per test prompt, with the paper's decoding by default (greedy,
repetition penalty 1.1), by Hugging Face ``generate`` (``backend: hf``) or vLLM (``backend: vllm``:
``personalm.training.vllm_generation``). Both take the prompts as the token ids the data prepared, stop at EOS
only, and return the new ids up to and including EOS, decoded here by the same tokenizer call."""

from __future__ import annotations

import torch

from personalm.data.prompt import subreddit
from personalm.training.decoding import GenerationSettings, until_eos
from personalm.training.sharding import is_sharded


class RowRepetitionPenalty:
    """transformers' repetition penalty (CTRL's: a seen token's logit divided by ``penalty`` when positive,
    multiplied when negative) over each row's own tokens only: the left padding of a batch is not seen.

    transformers 5.19 and older count every position of ``input_ids``, padding included; where the pad token is
    EOS (Llama and Mistral have no pad token), a short prompt in a batch of long ones gets EOS penalized, so its
    generation depends on its neighbours (later versions pass the padding lengths; this gives the same result
    under any version). ``pad_lengths[i]``: the left padding of row ``i``'s prompt.
    """

    def __init__(self, penalty: float, pad_lengths: torch.Tensor):
        if penalty <= 0:
            raise ValueError(f"repetition_penalty must be positive, got {penalty}")
        self.penalty, self.pad_lengths = penalty, pad_lengths

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.size(1), device=input_ids.device)
        real = (positions[None, :] >= self.pad_lengths.to(input_ids.device)[:, None]).to(torch.int32)
        seen = torch.zeros(scores.shape, dtype=torch.int32, device=scores.device).scatter_add_(1, input_ids, real) > 0
        penalized = torch.where(scores < 0, scores * self.penalty, scores / self.penalty)
        return torch.where(seen, penalized, scores)


def hf_generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, settings: GenerationSettings,
                eos_id: int, pad_id: int, synced_gpus: bool = False) -> list[list[int]]:
    """New token ids per row of a left-padded batch, up to and including EOS."""
    from transformers import LogitsProcessorList

    pad_lengths = input_ids.size(1) - attention_mask.sum(1)
    processors = LogitsProcessorList([RowRepetitionPenalty(settings.repetition_penalty, pad_lengths)]
                                     if settings.repetition_penalty != 1.0 else [])
    sampling = {"temperature": settings.temperature, "top_p": settings.top_p, "top_k": settings.top_k,
                "min_p": None} if settings.do_sample else {}
    out = model.generate(input_ids=input_ids, attention_mask=attention_mask, synced_gpus=synced_gpus,
                         max_new_tokens=settings.max_new_tokens, do_sample=settings.do_sample,
                         repetition_penalty=1.0, logits_processor=processors, eos_token_id=eos_id,
                         pad_token_id=pad_id, **sampling)
    return [until_eos(row, eos_id) for row in out[:, input_ids.size(1):].tolist()]


class Generates:
    """Mixin of the modules that write (SFT, DPO; not the reward model): ``predict_step`` with either backend."""

    engine = None  # the vLLM engine (backend: vllm), built in configure_model instead of the HF model

    @property
    def uses_vllm(self) -> bool:
        return self.generation_settings.backend == "vllm" and self._fn() == "predict"

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage == "predict" and self.generation_settings.backend == "vllm":
            if self.trainer.world_size > 1:
                raise ValueError(f"generation.backend vllm runs in one process (trainer.devices 1, here "
                                 f"{self.trainer.world_size} processes); vLLM splits a model over GPUs itself with "
                                 "generation.vllm.tensor_parallel_size")
            dm = self.trainer.datamodule
            if hasattr(dm, "set_predict_batch_size"):
                dm.set_predict_batch_size(self.generation_settings.vllm.prompts_per_call)

    def configure_model(self) -> None:
        """With the vLLM backend no Hugging Face model is loaded (the engine holds the weights)."""
        if not self.uses_vllm:
            return super().configure_model()
        if self.tokenizer is None:
            from personalm.models import load_tokenizer

            self.tokenizer = load_tokenizer(self.hparams.model_name_or_path)

    def on_predict_start(self) -> None:
        """The vLLM engine starts here, outside the device and precision contexts Lightning opens around
        ``configure_model`` (tensors vLLM makes without naming a device would land in them)."""
        super().on_predict_start()
        if self.uses_vllm and self.engine is None:
            from personalm.training.vllm_generation import VLLMGenerator

            self.engine = VLLMGenerator(self.hparams.model_name_or_path, self.tokenizer, self.generation_settings,
                                        self.load_dtype, self.trainer.strategy.root_device)

    def on_predict_end(self) -> None:
        if self.engine is not None:
            self.engine.close()
            self.engine = None

    def predict_step(self, batch, batch_idx):
        """One response per prompt: the prompt's ids without padding go in, new ids up to EOS come out."""
        tok, gen = self.tokenizer, self.generation_settings
        prompts = [ids[mask.bool()] for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]
        if self.engine is not None:
            new_ids = self.engine.generate([p.tolist() for p in prompts])
        else:
            new_ids = hf_generate(self.model, batch["input_ids"], batch["attention_mask"], gen, tok.eos_token_id,
                                  tok.pad_token_id, synced_gpus=is_sharded(self.model) and self.trainer.world_size > 1)
        responses = tok.batch_decode(new_ids, skip_special_tokens=True)
        prompt_texts = tok.batch_decode(prompts, skip_special_tokens=True)
        return [
            {"index": int(batch["index"][i]), "post_id": batch["post_id"][i],
             "community": subreddit(batch["community"][i]), "prompt_community": batch["prompt_community"][i],
             "title": batch["title"][i], "post": batch["post"][i], "prompt": prompt_texts[i],
             "response": responses[i]}
            for i in range(len(responses))
        ]
