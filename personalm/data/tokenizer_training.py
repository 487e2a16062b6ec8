"""The embedded model's tokenizer, trained on the synthetic data (``python -m personalm.data.tokenizer_training``
rebuilds the files shipped in ``personalm/models/tiny-llama``)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from personalm.data.prompt import subreddit
from personalm.data.synthetic import posts
from personalm.models.embedded import MODEL_DIR


def corpus(seed: int = 0) -> Iterator[str]:
    """Every text the synthetic data can hold, for training the embedded tokenizer."""
    for subset in ("finance", "history"):
        for post in posts(subset, "train_pref", 200, seed):
            yield f"{subreddit(post['community'])}\n{post['title']}\n{post['history']}"
            yield from (text for text, _ in post["comments"])


def build_tokenizer(out_dir: Path = MODEL_DIR, vocab_size: int = 1024) -> None:
    """Train the embedded byte-level BPE tokenizer on the synthetic corpus (deterministic); it is shipped in
    ``personalm/models/tiny-llama``: ``python -m personalm.data.tokenizer_training`` rebuilds it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    markers = ["<|domain|>\nr/", "\n<|user|>\n", "\n<|assistant|>\n", "Reddit"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(corpus()) + markers * 100, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", model_max_length=512)
    fast.save_pretrained(str(out_dir))


if __name__ == "__main__":  # python -m personalm.data.tokenizer_training  (rebuilds the shipped tokenizer files)
    build_tokenizer()
