"""Generation for ``predict``: one response per test prompt, with the paper's decoding by default."""

from __future__ import annotations

from dataclasses import dataclass

from personalm.training.sharding import is_sharded


@dataclass
class GenerationSettings:
    """Generation for ``predict``; defaults are the paper's (greedy, repetition penalty 1.1)."""

    max_new_tokens: int = 1024
    do_sample: bool = False
    repetition_penalty: float = 1.1
    temperature: float = 1.0
    top_p: float = 1.0


class Generates:
    """Mixin of the modules that write (SFT, DPO; not the reward model): ``predict_step``."""

    def predict_step(self, batch, batch_idx):
        """One response per prompt; the prompt is removed by tokens (left padding: all end together)."""
        gen = self.generation_settings
        sampling = {"temperature": gen.temperature, "top_p": gen.top_p} if gen.do_sample else {}
        out = self.model.generate(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
            synced_gpus=is_sharded(self.model) and self.trainer.world_size > 1,  # equal forward passes per rank
            max_new_tokens=gen.max_new_tokens, do_sample=gen.do_sample,
            repetition_penalty=gen.repetition_penalty, eos_token_id=self.tokenizer.eos_token_id,
            pad_token_id=self.tokenizer.pad_token_id, **sampling)
        new_tokens = out[:, batch["input_ids"].size(1):]
        responses = self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        prompts = self.tokenizer.batch_decode(
            [ids[mask.bool()] for ids, mask in zip(batch["input_ids"], batch["attention_mask"])],
            skip_special_tokens=True)
        return [
            {"index": int(batch["index"][i]), "post_id": batch["post_id"][i],
             "community": f"r/{batch['community'][i]}", "prompt_community": batch["prompt_community"][i],
             "title": batch["title"][i], "post": batch["post"][i], "prompt": prompts[i], "response": responses[i]}
            for i in range(len(responses))
        ]
