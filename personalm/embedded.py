"""The embedded default: a tiny Llama-style model and the synthetic ComPreD data, both offline.

``embedded:tiny-llama`` is a ~1.4M-parameter LlamaConfig shipped in ``personalm/embedded/tiny-llama``
together with a byte-level BPE tokenizer trained offline on the synthetic data (``build_tokenizer``
made it; rebuilding gives the same files). Its weights are not shipped: they are initialised from the
config under a fixed seed, so every run starts from the same model.

``embedded:compred`` is the synthetic dataset of ``personalm.synthetic``, written once into
``$PERSONALM_CACHE`` (default ``~/.cache/personalm``) in the Hub layout.
"""

from __future__ import annotations

import os
from pathlib import Path

PREFIX = "embedded:"
MODEL_DIR = Path(__file__).parent / "embedded" / "tiny-llama"
MODELS = {"tiny-llama": MODEL_DIR}
DATASETS = {"compred": "compred-synthetic-v1"}
INIT_SEED = 1234


def is_embedded(name: str) -> bool:
    return isinstance(name, str) and name.startswith(PREFIX)


def cache_root() -> Path:
    return Path(os.environ.get("PERSONALM_CACHE", Path.home() / ".cache" / "personalm")).expanduser()


def _lookup(name: str, table: dict) -> str:
    key = name[len(PREFIX):]
    if key not in table:
        raise ValueError(f"unknown embedded name {name!r}; known: {[PREFIX + k for k in table]}")
    return table[key]


def model_dir(name: str) -> Path:
    return Path(_lookup(name, MODELS))


def dataset_dir(name: str) -> Path:
    """Folder of the embedded dataset, written on first use."""
    from personalm import synthetic

    root = cache_root() / _lookup(name, DATASETS)
    if not root.exists():
        synthetic.write_dataset(root)
    return root


def build_tokenizer(out_dir: Path = MODEL_DIR, vocab_size: int = 1024) -> None:
    """Train the embedded byte-level BPE tokenizer on the synthetic corpus (deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from personalm import synthetic

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    markers = ["<|domain|>\nr/", "\n<|user|>\n", "\n<|assistant|>\n", "Reddit"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(synthetic.corpus()) + markers * 100, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", model_max_length=512)
    fast.save_pretrained(str(out_dir))


if __name__ == "__main__":  # python -m personalm.embedded  (rebuilds the shipped tokenizer files)
    build_tokenizer()
