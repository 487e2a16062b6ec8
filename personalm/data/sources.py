"""Where a split's rows are: the files of a local folder in the Hub layout, or the Hub's own files at their revision.

Local layout, mirroring the Hub (``allenai/compred``)::

    <dir>/<subset>/<split>.jsonl | .parquet            (or shards <split>-*.jsonl | .parquet)
    <dir>/<subset>_test_prompts/test_prompts.jsonl | .parquet
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

import pyarrow as pa

from personalm.data.compred import PROMPT_SPLIT, ComPreDDataError, read_chunks, schema_of
from personalm.paths import local_path


def is_local(dataset: str) -> bool:
    """A local folder (which must exist) rather than a Hub id."""
    try:
        return local_path(dataset) is not None
    except FileNotFoundError:
        raise ComPreDDataError(f"dataset folder {dataset} does not exist") from None


def split_files(root: Path, subset: str, split: str) -> list[Path]:
    """The files of one split in the local Hub layout; a clear error when there are none."""
    folder = root / (f"{subset}_test_prompts" if split == PROMPT_SPLIT else subset)
    if not root.is_dir():
        raise ComPreDDataError(f"dataset folder {root} does not exist")
    if not folder.is_dir():
        have = sorted(p.name for p in root.iterdir() if p.is_dir())
        raise ComPreDDataError(f"subset {subset!r} not found: no folder {folder} (subsets present: {have})")
    files = []
    for ext in ("jsonl", "json", "parquet"):
        files += [folder / f"{split}.{ext}"] if (folder / f"{split}.{ext}").is_file() else []
        files += sorted(folder.glob(f"{split}-*.{ext}"))
    if not files:
        have = sorted(p.name for p in folder.iterdir())
        raise ComPreDDataError(f"split {split!r} not found in {folder} (files present: {have})")
    return files


def describe_source(dataset: str, subsets: Sequence[str], split: str) -> str:
    """Where a split's rows come from, for error messages: its files, or the Hub id, config and split."""
    if not is_local(dataset):
        return ", ".join(f"{dataset}:{config_of(s, split)}/{split}" for s in subsets)
    try:
        return ", ".join(str(p) for s in subsets for p in split_files(Path(dataset).expanduser(), s, split))
    except ComPreDDataError:
        return f"{dataset} ({', '.join(subsets)}/{split})"


def config_of(subset: str, split: str) -> str:
    """The Hub config that holds a split: ``finance`` or ``finance_test_prompts``."""
    return f"{subset}_test_prompts" if split == PROMPT_SPLIT else subset


def source_files(dataset: str, subset: str, split: str) -> list[Path]:
    """The files of one split of one subset, in order: a local folder in the Hub layout, or the Hub's own
    files (the dataset repository's parquet or JSON files at its current revision, downloaded once into the
    Hugging Face cache and read from there: no Arrow copy of them is made)."""
    if is_local(dataset):
        return split_files(Path(dataset).expanduser(), subset, split)
    return hub_files(dataset, config_of(subset, split), split)


def hub_files(dataset: str, config: str, split: str) -> list[Path]:
    """The data files the Hub's config lists for a split (``datasets`` resolves them to
    ``hf://datasets/<repo>@<revision>/<file>``), each fetched with ``huggingface_hub`` (its cache, its
    offline mode). The revision is part of the cached path, so a new revision is another source."""
    import datasets
    from huggingface_hub import hf_hub_download

    try:
        builder = datasets.load_dataset_builder(dataset, config)
    except (ValueError, FileNotFoundError, ConnectionError) as err:  # an unknown config or dataset, offline
        raise ComPreDDataError(f"{dataset}:{config}: could not be resolved on the Hub: {err}") from err
    try:
        urls = list(builder.config.data_files[split])
    except KeyError:
        raise ComPreDDataError(f"{dataset}:{config} has no split {split!r}") from None
    files = []
    for url in urls:
        match = _HF_URL.match(str(url))
        if match is None:
            raise ComPreDDataError(f"{dataset}:{config}/{split}: unexpected data file {url}")
        repo, revision, filename = match.groups()
        files.append(Path(hf_hub_download(repo, filename, repo_type="dataset", revision=revision)))
    if not files:
        raise ComPreDDataError(f"{dataset}:{config}/{split}: no data files")
    return files


_HF_URL = re.compile(r"hf://datasets/([^@]+?)@([^/]+)/(.+)$")


def load_split(dataset: str, subset: str, split: str) -> pa.Table:
    """One split of one subset, validated, whole, in memory (for small data and tests; preparation streams)."""
    schema = schema_of(split)
    parts = [t for f in source_files(dataset, subset, split) for _, t in read_chunks(f, schema)]
    return pa.concat_tables(parts)
