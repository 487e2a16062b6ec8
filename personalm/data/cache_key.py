"""The cache key of a tokenized split: its data, the settings and the tokenizer that shape its rows, and the
source of every module that does (a change to the template or the encoding is a new key, never a stale hit)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Sequence

from personalm.data import compred, encoding, pairs, prompt

ROW_SHAPING_MODULES = (prompt, encoding, compred, pairs)  # their source is part of the tokenization cache key
ROW_SHAPING_SETTINGS = ("rows", "contextualize", "random_community", "conditioning_variants", "max_length",
                        "max_prompt_length", "seed")


def tokenizer_identity(tok) -> str:
    """What makes a tokenizer's ids: a fast tokenizer's whole definition (vocabulary, normalizer, pre- and
    post-processing), else a hash of its vocabulary files; and its settings (special tokens, BOS/EOS)."""
    if hasattr(tok, "backend_tokenizer"):
        definition = tok.backend_tokenizer.to_str()
    else:
        folder = Path(tok.name_or_path)
        files = sorted(folder / name for name in tok.vocab_files_names.values() if (folder / name).is_file())
        definition = hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest() if files else tok.name_or_path
    settings = {k: v for k, v in tok.init_kwargs.items() if k != "name_or_path" and isinstance(v, (str, int, bool))}
    return json.dumps([definition, sorted(settings.items()), tok.all_special_tokens], default=str)


def split_key(data_fingerprint: str, split: str, settings, tok, extra_sources: Sequence[str] = ()) -> str:
    """``settings``: the DataModule's hyperparameters (those in ``ROW_SHAPING_SETTINGS`` count)."""
    sources = [__file__, *extra_sources, *(m.__file__ for m in ROW_SHAPING_MODULES)]
    code = hashlib.sha256(b"".join(Path(f).read_bytes() for f in sources)).hexdigest()
    blob = json.dumps([data_fingerprint, split, {k: settings[k] for k in ROW_SHAPING_SETTINGS}, tokenizer_identity(tok),
                       tok.eos_token_id, tok.bos_token_id, code], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]
