"""``python -m personalm prepare``: prepare every split a config's stages read, before a (multi-GPU) job starts.

    python -m personalm prepare --config configs/trainer/gpu.yaml --config configs/paper/dpo.yaml \
        [--data.<name> <value> ...]

Takes the same ``--config`` files and ``--data.*`` / ``--model.init_args.model_name_or_path`` arguments as ``fit``
(the model's name is the tokenizer's, as the CLI links them), builds the DataModule only (no model is loaded),
and prepares train, validation and test pairs and the generation prompts, with the conditioning variants the
settings ask for. Prints, per split, the rows read and used, what was skipped, subsampled, shortened or
dropped, the size on disk and the folder. A later ``fit``/``test``/``predict`` with the same settings opens
those folders and recomputes nothing.
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence

from personalm.configs import compose


def main(argv: Optional[Sequence[str]] = None) -> dict:
    from personalm.data.datamodule import ComPreDDataModule

    argv = list(sys.argv[1:] if argv is None else argv)
    configs, rest = [], []
    tokens = iter(argv)
    for token in tokens:
        if token == "--config" or token.startswith("--config="):
            configs.append(token.partition("=")[2] or next(tokens))
        elif token in ("-h", "--help"):
            print(__doc__)
            return {}
        else:
            rest.append(token)
    config = compose(configs, rest)
    data = dict(config.get("data") or {})
    model = (config.get("model") or {}).get("init_args") or {}
    if model.get("model_name_or_path"):
        data["tokenizer"] = model["model_name_or_path"]
    dm = ComPreDDataModule(**data)
    found = dm.prepare_all()
    print("| split | rows read | skipped | subsampled out | capped out | posts shortened | responses cut | dropped "
          "| rows | on disk | folder |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for split, prepared in found.items():
        s = prepared.stats
        print(f"| {split} | {s.rows:,} | {s.skipped or 'none'} | {s.subsampled_out:,} | {s.capped_out:,} | "
              f"{s.post_shortened:,} | {s.response_cut:,} | {s.dropped:,} | {s.rows_out:,} | "
              f"{prepared.bytes / 2**20:,.1f} MiB | {prepared.folder} |")
    return found
