"""DPO's reference log-probs scored once before training and cached on disk (``precompute_reference``).

A split's pairs (and their "no community" / "random community" variants) are scored by every process on
its share of the rows, gathered, and saved by the first process under a key made of the data's
fingerprint, the reference's weights and the precision; a cache made for other data or another
reference is refused, never used. Rows are looked up by their ``index``, their position in the split.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Optional

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Subset

from personalm.data.compred import SPLIT_OF_PHASE
from personalm.models.rng import rng_untouched
from personalm.paths import cache_root, write_atomically
from personalm.training.dpo_loss import PairLogps
from personalm.training.sharding import initialize, is_sharded

COLUMNS = len(PairLogps._fields)  # a row's reference log-probs: chosen/rejected sums and means


class PrecomputedReference:
    """``tables[split][variant]``: the reference's ``PairLogps`` of every row of the split (CPU tensors, moved to the
    batches' device on first lookup)."""

    def __init__(self, folder: Optional[str] = None):
        self.folder = Path(folder).expanduser() if folder else cache_root() / "reference_logps"
        self.tables: dict[str, dict[str, PairLogps]] = {}
        self.seconds: dict[str, float] = {}  # per split: scoring or reading the cache

    def lookup(self, split: str, variant: str, index: torch.Tensor, device) -> Optional[PairLogps]:
        table = self.tables.get(split, {}).get(variant)
        if table is None:
            return None
        if table[0].device != index.device:  # moved once (a few floats per pair): no copy, no sync per step
            table = self.tables[split][variant] = PairLogps(*(column.to(index.device) for column in table))
        return PairLogps(*(column[index].to(device) for column in table))

    def prepare(self, module, phases, variants) -> None:
        """Every phase's split scored by ``module.reference`` once (or read from its cache), then the reference
        freed; ``variants``: the conditioning variants a split may carry (scored where it does)."""
        reference = module.reference
        if reference.adapters_off and is_sharded(module.model):
            initialize(module.model)  # before a forward that leaves the adapters out
        splits = getattr(module.trainer.datamodule, "splits", {})
        with rng_untouched(module.device):  # the scoring DataLoader draws a seed from the global RNG
            for split in (SPLIT_OF_PHASE[p] for p in phases if SPLIT_OF_PHASE[p] in splits):
                found = ["true"] + [v for v in variants if f"{v}_prompt_ids" in splits[split].column_names]
                if not reference.adapters_off:
                    _ = reference.model  # loaded on first use, its fingerprint taken before any sharding
                self.ensure(module, split, found, reference.fingerprint)
        if reference.loaded:
            reference.free()

    def ensure(self, module, split: str, variants: list[str], fingerprint: str) -> None:
        """Read the split's cache, or score it (every process) and write it (the first); all processes
        call this together."""
        if split in self.tables:
            return
        start = time.perf_counter()
        trainer, ds = module.trainer, module.trainer.datamodule.splits[split]
        meta = {"data": ds._fingerprint, "rows": len(ds), "variants": variants, "reference": fingerprint,
                "reference_name": module.reference.source, "precision": str(trainer.precision)}
        key = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:24]
        path = Path(trainer.strategy.broadcast(str(self.folder / f"{split}-{key}.pt")))  # the first one's key
        # read only if every process sees the file (a cache folder local to one node: the others score)
        if trainer.strategy.reduce_boolean_decision(path.exists(), all=True):
            saved = torch.load(path, map_location="cpu", weights_only=True)
            found = {k: saved["meta"].get(k) for k in meta}
            if found != meta:
                raise ValueError(f"reference log-prob cache {path} was made for other data or another reference "
                                 f"model ({found} != {meta}); delete it or point reference_cache elsewhere")
            self.tables[split] = {v: PairLogps(*t.unbind(1)) for v, t in saved["logps"].items()}
            rank_zero_info(f"[personalm] reference log-probs for {split} read from {path}")
        else:
            tables = score_split(module, ds, variants)
            if trainer.is_global_zero:
                stacked = {v: torch.stack(list(t), dim=1) for v, t in tables.items()}  # [rows, COLUMNS] on disk
                write_atomically(path, lambda tmp: torch.save({"meta": meta, "logps": stacked}, tmp))
                rank_zero_info(f"[personalm] reference log-probs for {len(ds)} {split} pairs cached in {path}")
            trainer.strategy.barrier()
            self.tables[split] = tables
        self.seconds[split] = time.perf_counter() - start


@torch.no_grad()
def score_split(module, ds, variants: list[str]) -> dict[str, PairLogps]:
    """Each process scores rows rank, rank + world, ...; an all-gather gives every process the whole table.
    Every process runs as many batches (rows repeated to even out), as collectives under FSDP2 require."""
    trainer = module.trainer
    world, rank = trainer.world_size, trainer.global_rank
    mine = list(range(rank, len(ds), world)) or [0]  # fewer rows than processes: score row 0 again
    per_rank = -(-len(ds) // world)
    mine += mine[-1:] * (per_rank - len(mine))  # equal lengths for all_gather
    dm = trainer.datamodule
    loader = DataLoader(Subset(ds, mine), batch_size=dm.eval_batch_size, collate_fn=dm.collate_fn("test_pref"))
    parts: dict[str, list[PairLogps]] = {v: [] for v in variants}
    for batch in loader:
        batch = trainer.strategy.batch_to_device(batch)
        n = len(batch["community"])
        for v in variants:
            with trainer.precision_plugin.forward_context():  # the same autocast as in training
                seqs = batch if v == "true" else batch[v]
                parts[v].append(PairLogps.from_sequences(module.reference.logprobs(seqs), n))
    all_index = module.all_gather(torch.tensor(mine, device=module.device)).reshape(-1).cpu()
    tables = {}
    for v in variants:
        mine_values = torch.cat([torch.stack(list(p), dim=1) for p in parts[v]])  # [rows of this process, COLUMNS]
        values = module.all_gather(mine_values).reshape(-1, COLUMNS).cpu()
        table = torch.empty(len(ds), COLUMNS, dtype=torch.float32)
        table[all_index] = values.float()
        tables[v] = PairLogps(*table.unbind(1))
    return tables
