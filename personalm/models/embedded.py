"""The embedded default model: ``embedded:tiny-llama``, a ~1M-parameter Llama config shipped in
``personalm/models/tiny-llama`` with a byte-level BPE tokenizer trained offline on the synthetic data
(``personalm.data.tokenizer_training.build_tokenizer`` made it; rebuilding gives the same files). Its weights are not
shipped: they are initialised from the config under a fixed seed, so every run starts from the same model.
"""

from __future__ import annotations

from pathlib import Path

from personalm.paths import EMBEDDED

MODEL_DIR = Path(__file__).parent / "tiny-llama"
MODELS = {"tiny-llama": MODEL_DIR}
INIT_SEED = 1234


def lookup(name: str, table: dict):
    """``table``'s entry for ``embedded:<key>``; a clear error naming the known ones otherwise."""
    key = name[len(EMBEDDED):]
    if key not in table:
        raise ValueError(f"unknown embedded name {name!r}; known: {[EMBEDDED + k for k in table]}")
    return table[key]


def model_dir(name: str) -> Path:
    return Path(lookup(name, MODELS))
