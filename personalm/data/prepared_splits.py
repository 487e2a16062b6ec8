"""The DataModule's splits, prepared once (``personalm.data.prepare``) and opened by every process: where they
are, preparing or opening them, and the line that says what was done. A part of ``ComPreDDataModule`` (it reads
the module's ``hparams``, ``trainer``, ``splits`` and ``stats``)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import datasets
from lightning.pytorch.utilities import rank_zero_info

from personalm.data import compred, prepare, sources, synthetic
from personalm.data.cache_key import split_key
from personalm.data.encoding import prompt_budget
from personalm.models import load_tokenizer
from personalm.paths import cache_root, is_embedded


class PreparedSplits:
    """Preparing and opening the splits of a ``ComPreDDataModule``: Lightning's ``prepare_data`` (one process
    prepares) and ``setup`` (every process opens), and ``python -m personalm prepare`` (``prepare_all``)."""

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.hparams.tokenizer)
        return self._tokenizer

    @property
    def source(self) -> str:
        name = self.hparams.dataset
        return str(synthetic.dataset_dir(name)) if is_embedded(name) else name

    @property
    def cache_root(self) -> Path:
        return Path(self.hparams.cache_dir).expanduser() if self.hparams.cache_dir else cache_root() / "prepared"

    def _splits_for(self, stage: Optional[str]) -> list[str]:
        if stage is None:
            return [*compred.PREFERENCE_SPLITS, compred.PROMPT_SPLIT]
        return [compred.SPLIT_OF_PHASE[phase] for phase in compred.PHASES_OF[stage]]

    def _stage(self) -> Optional[str]:
        return self.trainer.state.fn.value if self.trainer is not None and self.trainer.state.fn else None

    def prepare_data(self) -> None:
        """On one process (Lightning: local rank 0 of each node with ``prepare_data_per_node``, the default;
        set it false where every node sees the same ``cache_dir``, so one process prepares for all): prepare
        the stage's splits, so every process's ``setup`` only opens them."""
        for split in self._splits_for(self._stage()):
            self.prepared(split)

    def setup(self, stage: Optional[str] = None) -> None:
        for split in self._splits_for(stage):
            self._open(split)

    def prepare_all(self) -> dict[str, prepare.Prepared]:
        """Every split a config's stages read (train, validation, test, prompts): ``python -m personalm prepare``."""
        return {split: self.prepared(split) for split in self._splits_for(None)}

    def files(self, split: str) -> list[tuple[str, list[Path]]]:
        return [(subset, sources.source_files(self.source, subset, split)) for subset in self.subsets]

    def prepared(self, split: str, build: bool = True) -> prepare.Prepared:
        """The prepared split (``personalm.data.prepare``): opened if a process or an earlier run prepared it
        with the same key, else prepared here (``build``) or a clear error."""
        files = self.files(split)
        spec = prepare.RowSpec.of(split, self.hparams)
        key = split_key(files, spec, self.tokenizer)
        folder = self.cache_root / f"{split}-{key}"
        found = prepare.find(folder)
        if found is None and not build:
            raise compred.ComPreDDataError(
                f"{split}: the prepared split {folder} is missing on this process (rank {self.trainer.global_rank}), "
                "which only opens what prepare_data made: is cache_dir on storage this node does not share with the "
                "process that prepared (then keep trainer.prepare_data_per_node true), or did the source change "
                "since? Run python -m personalm prepare with the same settings first")
        if found is None:
            where = sources.describe_source(self.source, self.subsets, split)
            found = prepare.prepare(files, spec, self.tokenizer, folder, key, self.num_proc, log=rank_zero_info,
                                    where=where)
            verb = "prepared in"
        else:
            verb = "read from"
        self._report(split, found, verb)
        return found

    @property
    def num_proc(self) -> int:
        return self.hparams.num_proc or prepare.default_num_proc()

    def _open(self, split: str) -> datasets.Dataset:
        """Under a trainer with several processes only opened (``prepare_data`` prepared it); else prepared
        here when missing (a script, a test, one process)."""
        if split not in self.splits:
            trainer = self.trainer
            found = self.prepared(split, build=trainer is None or trainer.world_size <= 1)
            self.splits[split], self.stats[split] = found.dataset(), found.stats
        return self.splits[split]

    def _report(self, split: str, found: prepare.Prepared, verb: str) -> None:
        hp, stats = self.hparams, found.stats
        if self._reported.get(split) == found.folder:
            return
        self._reported[split] = found.folder
        budget = prompt_budget(hp.max_length, hp.max_prompt_length)
        rank_zero_info(
            f"[personalm] {split}: {stats.rows} rows read, skipped {stats.skipped or 'none'}, "
            f"{stats.subsampled_out} left out by subsampling, {stats.capped_out} by the cap, {stats.post_shortened} "
            f"posts shortened to fit {budget} prompt tokens, {stats.response_cut} with a response cut to fit "
            f"{hp.max_length} tokens, {stats.dropped} dropped (markers and title alone over {budget} tokens), "
            f"{stats.rows_out} used; {found.bytes / 2**20:,.1f} MiB {verb} {found.folder}")
