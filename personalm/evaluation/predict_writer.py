"""Predictions to JSONL, one line per post, correct with several processes and safe to interrupt."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info

from personalm.paths import write_text


class JsonlPredictionWriter(BasePredictionWriter):
    """Writes ``predict`` output: ``post_id``, ``community``, ``prompt_community`` (what the prompt
    said), ``title``, ``post``, ``prompt``, ``response``; one line per post, in the test file's order.

    Each process appends whole lines to its own part file (one ``os.write`` per batch on an
    ``O_APPEND`` descriptor), so an interrupted run leaves only whole lines there. At the end the
    first process merges the parts, keeps each post once (the distributed sampler repeats samples to
    even out ranks) and moves the result into place atomically; the parts are then removed.

    Args:
        output_path: the JSONL file (default ``<log_dir>/predictions.jsonl``).
    """

    def __init__(self, output_path: Optional[str] = None):
        super().__init__(write_interval="batch")
        self.output_path = output_path
        self.path: Optional[Path] = None
        self._fd: Optional[int] = None

    def _part(self, rank: int) -> Path:
        return self.path.with_name(f"{self.path.name}.rank{rank}.part")

    def on_predict_start(self, trainer, pl_module) -> None:
        self.path = Path(self.output_path or Path(trainer.log_dir or ".") / "predictions.jsonl")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self._part(trainer.global_rank), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND)

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        os.write(self._fd, "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in prediction).encode("utf-8"))

    def on_predict_end(self, trainer, pl_module) -> None:
        os.close(self._fd)
        self._fd = None
        trainer.strategy.barrier()
        if trainer.is_global_zero:
            rows = {}
            parts = [self._part(r) for r in range(trainer.world_size)]
            for part in parts:
                with open(part, encoding="utf-8") as f:
                    for line in f:
                        row = json.loads(line)
                        rows.setdefault(row["index"], row)
            lines = "".join(json.dumps({k: v for k, v in rows[i].items() if k != "index"}, ensure_ascii=False) + "\n"
                            for i in sorted(rows))
            write_text(self.path, lines)
            for part in parts:
                part.unlink()
            rank_zero_info(f"[personalm] wrote {len(rows)} predictions (one per post) to {self.path}")
        trainer.strategy.barrier()
