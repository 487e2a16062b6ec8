"""Predictions to JSONL, one line per post, correct with several processes, safe to interrupt, resumable."""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Optional

from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info

from personalm.jsonl import json_line, read_jsonl, write_jsonl
from personalm.paths import run_folder, write_json

DATA_SETTINGS = ("dataset", "subset", "contextualize", "random_community", "max_length", "max_prompt_length", "seed")


class JsonlPredictionWriter(BasePredictionWriter):
    """Writes ``predict`` output: ``post_id``, ``community``, ``prompt_community`` (what the prompt
    said), ``title``, ``post``, ``prompt``, ``response``; one line per post, in the test file's order.

    Each process appends whole lines to its own part file (one ``os.write`` per batch on an
    ``O_APPEND`` descriptor), so an interrupted run leaves only whole lines there. At the end the
    first process merges the parts, keeps each post once (the distributed sampler repeats samples to
    even out ranks) and moves the result into place atomically; the parts are then removed.

    A rerun of an interrupted ``predict`` with the same model, generation and data settings (recorded in
    ``<output>.meta.json`` when it started) keeps the lines already written, asks the data for the other
    posts only, and says how many it kept; with any other model or settings it starts over and says why.
    The part files of every earlier process are read, so the number of processes may change in between.

    Args:
        output_path: the JSONL file (default ``predictions.jsonl`` in the run's folder).
    """

    def __init__(self, output_path: Optional[str] = None):
        super().__init__(write_interval="batch")
        self.output_path = output_path
        self.path: Optional[Path] = None
        self._fd: Optional[int] = None

    def _part(self, rank: int) -> Path:
        return self.path.with_name(f"{self.path.name}.rank{rank}.part")

    def _parts(self) -> list[Path]:
        return sorted(self.path.parent.glob(f"{self.path.name}.rank*.part"))

    @property
    def _meta_path(self) -> Path:
        return self.path.with_name(self.path.name + ".meta.json")

    @staticmethod
    def settings(trainer, pl_module) -> dict:
        """What the predictions depend on: the model (its files), the dtype it runs in, the decoding (and its
        backend) and the prompts."""
        from personalm.models import resolve

        name = pl_module.hparams.model_name_or_path
        local = Path(resolve(name))
        files = sorted((p.name, p.stat().st_size, int(p.stat().st_mtime)) for p in local.glob("*") if p.is_file()) \
            if local.is_dir() else []
        dm = trainer.datamodule.hparams if trainer.datamodule is not None else {}
        return json.loads(json.dumps({
            "model": str(local.resolve()) if local.exists() else name, "model_files": files,
            "dtype": pl_module.load_dtype, "generation": asdict(pl_module.generation_settings),
            "data": {k: dm.get(k) for k in DATA_SETTINGS}}, default=str))

    def setup(self, trainer, pl_module, stage: str) -> None:
        """Before the prediction data are made: keep what an interrupted run with the same settings wrote."""
        if stage != "predict":
            return
        self.path = Path(trainer.strategy.broadcast(
            str(self.output_path or run_folder(trainer) / "predictions.jsonl")))
        kept: list[int] = []
        if trainer.is_global_zero:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            kept = self._keep_or_start_over(self.settings(trainer, pl_module))
        kept = trainer.strategy.broadcast(kept)
        if kept and hasattr(trainer.datamodule, "skip_predictions"):
            trainer.datamodule.skip_predictions(kept)

    def _keep_or_start_over(self, settings: dict) -> list[int]:
        parts = self._parts()
        before = json.loads(self._meta_path.read_text()) if self._meta_path.is_file() else None
        kept: list[int] = []
        if parts and before == settings:
            kept = sorted(read_parts(parts))
            rank_zero_info(f"[personalm] predict: kept the {len(kept)} predictions an interrupted run wrote to "
                           f"{self.path.name}'s part files; writing the rest")
        elif parts:
            changed = sorted(k for k in settings if (before or {}).get(k) != settings[k]) if before else ["(unknown)"]
            rank_zero_info(f"[personalm] predict: starting over; the earlier run's part files were made with other "
                           f"settings ({', '.join(changed)} differ)")
            for part in parts:
                part.unlink()
        write_json(self._meta_path, settings)
        return kept

    def on_predict_start(self, trainer, pl_module) -> None:
        part = self._part(trainer.global_rank)
        _drop_unfinished_line(part)
        self._fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        os.write(self._fd, "".join(map(json_line, prediction)).encode("utf-8"))

    def on_predict_end(self, trainer, pl_module) -> None:
        os.close(self._fd)
        self._fd = None
        trainer.strategy.barrier()
        if trainer.is_global_zero:
            parts = self._parts()
            rows = read_parts(parts)
            write_jsonl(self.path, ({k: v for k, v in rows[i].items() if k != "index"} for i in sorted(rows)))
            for part in parts:
                part.unlink()
            self._meta_path.unlink(missing_ok=True)
            rank_zero_info(f"[personalm] wrote {len(rows)} predictions (one per post) to {self.path}")
        trainer.strategy.barrier()


def read_parts(parts: list[Path]) -> dict[int, dict]:
    """Rows of the part files by ``index``, each post once; an unfinished last line (a kill) is ignored."""
    rows: dict[int, dict] = {}
    for part in parts:
        for _, row in read_jsonl(part, finished_only=True):
            rows.setdefault(row["index"], row)
    return rows


def _drop_unfinished_line(part: Path) -> None:
    """Cut a line a kill left unfinished off the end of a part file, so appended lines start on their own."""
    if not part.is_file():
        return
    data = part.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(part, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)
