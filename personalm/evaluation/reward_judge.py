"""A judge backed by a trained reward model: which of two responses would the true community upvote more."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from personalm.data.collate import sequences
from personalm.data.encoding import encode_batch
from personalm.evaluation.judge import Comparison, Verdict
from personalm.models import load_reward_model, load_tokenizer, resolve


class RewardJudge:
    """``personalm.evaluation.judge.Judge`` backed by a trained reward model: both responses are scored in the
    prompt of the true community, the higher reward wins; within ``tie_margin`` it is a tie (default: 1e-4 with
    fp32 weights, where the same text scored in two batch positions differs by float noise, ~1e-7; 1e-2 with 16-bit
    weights, about bf16's resolution of a reward near 1, so that a near-tie is not decided by the batch's padding).

    The order of A and B does not matter to a reward model (each response is scored alone), so none
    is randomised. Two identical responses are a tie without scoring. A post whose title and template leave no
    room for a response gets ``None``. ``dtype``: the weights' dtype (the study passes what the reward model's runs
    compute in: ``bfloat16`` under ``bf16-mixed``, half the memory of fp32 and no cast per op; None: as saved).
    """

    def __init__(self, model_name_or_path: str, max_length: int = 1024, batch_size: int = 16,
                 tie_margin: Optional[float] = None, device: Optional[str] = None,
                 tokenizer_name_or_path: Optional[str] = None, dtype: Optional[str] = None):
        self.tokenizer = load_tokenizer(model_name_or_path)
        if tokenizer_name_or_path is not None:
            other = load_tokenizer(tokenizer_name_or_path)
            if other.get_vocab() != self.tokenizer.get_vocab():
                raise ValueError(f"reward model {model_name_or_path} was trained with another tokenizer than "
                                 f"{tokenizer_name_or_path}: its scores of that tokenization mean nothing")
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(resolve(model_name_or_path))
        if not any(a.endswith("ForSequenceClassification") for a in config.architectures or []) or \
                getattr(config, "num_labels", None) != 1:
            raise ValueError(f"{model_name_or_path} is not a reward model (architectures {config.architectures}, "
                             f"{config.num_labels} labels): its scalar head would be untrained")
        self.model = load_reward_model(model_name_or_path, dtype, pad_token_id=self.tokenizer.pad_token_id).eval()
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model.to(self.device)
        self.max_length, self.batch_size = max_length, batch_size
        half = next(self.model.parameters()).dtype in (torch.bfloat16, torch.float16)
        self.tie_margin = tie_margin if tie_margin is not None else (1e-2 if half else 1e-4)

    @torch.no_grad()
    def scores(self, items: Sequence[Comparison]) -> list[Optional[tuple[float, float]]]:
        """(reward of A, reward of B) per item, or None when the item could not be encoded."""
        out: list[Optional[tuple[float, float]]] = []
        for start in range(0, len(items), self.batch_size):
            chunk = items[start:start + self.batch_size]
            encoded = encode_batch(self.tokenizer, [c.community for c in chunk], [c.title for c in chunk],
                                   [c.post for c in chunk], [[c.response_a for c in chunk],
                                                             [c.response_b for c in chunk]], self.max_length)
            kept = [e for e in encoded if not e.dropped]
            rewards = iter([])
            if kept:
                seqs = sequences([e.prompt_ids for e in kept] * 2,
                                 [e.response_ids[0] for e in kept] + [e.response_ids[1] for e in kept],
                                 self.tokenizer.pad_token_id)
                logits = self.model(input_ids=seqs["input_ids"].to(self.device),
                                    attention_mask=seqs["attention_mask"].to(self.device)).logits[:, 0].float().cpu()
                rewards = iter(zip(logits[:len(kept)].tolist(), logits[len(kept):].tolist()))
            out += [None if e.dropped else next(rewards) for e in encoded]
        return out

    def judge(self, items: Sequence[Comparison]) -> list[Verdict]:
        verdicts: list[Verdict] = []
        for item, pair in zip(items, self.scores(items)):
            if item.response_a == item.response_b:
                verdicts.append("tie")
            elif pair is None:
                verdicts.append(None)
            elif abs(pair[0] - pair[1]) <= self.tie_margin:
                verdicts.append("tie")
            else:
                verdicts.append("A" if pair[0] > pair[1] else "B")
        return verdicts
