"""The key of a prepared split, known before any step runs: the source's identity (each file's path, size and
modification time; a Hub file's path holds its revision), the settings and the tokenizer that shape its rows,
and the source of every module that does (a change to the template or the encoding is a new key, never a
stale hit)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

from personalm.data import compred, encoding, pairs, prompt, sources
from personalm.data.prepare import planning, spec, tasks

ROW_SHAPING_MODULES = (prompt, encoding, compred, sources, pairs, spec, planning, tasks)  # their source: in the key


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


def source_identity(files: Sequence[tuple[str, Sequence[Path]]]) -> list:
    """(subset, [(path, bytes, modification time in ns), ...]) of every file a split is read from."""
    out = []
    for subset, paths in files:
        stats = [(str(Path(p).resolve()), Path(p).stat().st_size, Path(p).stat().st_mtime_ns) for p in paths]
        out.append([subset, stats])
    return out


def split_key(files: Sequence[tuple[str, Sequence[Path]]], spec, tok) -> str:
    """``spec``: the split's ``prepare.RowSpec`` (every setting that acts on its rows)."""
    sources = [__file__, *(m.__file__ for m in ROW_SHAPING_MODULES)]
    code = hashlib.sha256(b"".join(Path(f).read_bytes() for f in sources)).hexdigest()
    blob = json.dumps([source_identity(files), asdict(spec), tokenizer_identity(tok), tok.eos_token_id,
                       tok.bos_token_id, code], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]
