"""One LightningDataModule for every stage: SFT rows, preference rows, generation prompts."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Literal, Optional, Union

import datasets
import lightning.pytorch as L
import torch
from torch.utils.data import DataLoader, DistributedSampler

from personalm.data import compred
from personalm.data.batching import (
    CommunityBalancedSampler,
    LengthGroupedSampler,
    by_length,
    community_codes,
    row_lengths,
)
from personalm.data.collate import collate_preference, collate_prompts, collate_sft
from personalm.data.encoding import prompt_budget
from personalm.data.prepared_splits import PreparedSplits


class ComPreDDataModule(PreparedSplits, L.LightningDataModule):
    """ComPreD (or a local copy in the Hub layout, or ``embedded:compred``) for SFT, DPO and generation.

    Args:
        dataset: Hub id (``allenai/compred``), a local folder in the Hub layout, or ``embedded:compred``
            (the synthetic demo data, NOT real Reddit data).
        subset: one subset (``finance``) or a list (``[finance, history]``) trained together.
        rows: what fit/validate/test serve: ``sft`` (prompt + preferred response, loss on the response)
            or ``preference`` (prompt, chosen, rejected, community). Predict always serves one prompt
            per ``post_id`` of the test prompts.
        tokenizer: tokenizer name or path; the CLI links it to the model's ``model_name_or_path``.
        contextualize: ``r/<subreddit>`` in the prompt (true) or ``Reddit`` (false).
        random_community: ablation: a different community from the same split, drawn reproducibly
            per post under ``seed`` (needs ``contextualize: true``).
        conditioning_variants: preference rows also carry the prompt with no community and with a
            random one, so evaluation can score the same pairs under each (validate/test only).
        min_score_ratio: training pairs need ``score_ratio >=`` this (paper: 2). None keeps all.
        max_pairs_per_post: at most this many training pairs per post, drawn under ``seed`` (paper: 5).
        max_train_pairs: optional seeded cap on training rows after subsampling (quick runs).
        max_eval_pairs: optional seeded cap on validation/test rows.
        cap_floor: the caps (``max_train_pairs``, ``max_eval_pairs``) drawn per community: each community keeps at
            least this many pairs (or all it has), the rest of the cap goes to the communities in proportion to the
            pairs they have left (``personalm.data.pairs.allocate``). None: drawn over all pairs, so a cap removes a
            small community's pairs in proportion to its size.
        community_tau: training draws by community (``CommunityBalancedSampler``): community g with probability
            proportional to n_g ** tau (1: as often as its share of the pairs, with replacement; 0: every community
            equally often), an epoch being as many draws as the split has pairs. None: a plain shuffle of the pairs.
        max_length: tokens of prompt + response; a response's tail is cut to fit.
        max_prompt_length: tokens the prompt may take (paper's DPO: 512); markers, community and title stay
            whole, the post body is shortened from its end. Default: half of ``max_length``.
        batch_size: training batch size (pairs for preference rows).
        eval_batch_size: validation/test/predict batch size (default: ``batch_size``).
        num_workers: DataLoader workers (0 is fastest for the tiny demo on CPU).
        pair_packing: how preference batches carry their pairs packed into rows (``personalm.data.packing``;
            a batch stays ``batch_size`` pairs): ``prefix_shared``, one ``[prompt | chosen | rejected]`` span per
            pair, the post run through the model once per pair; ``two_spans``, ``[prompt | chosen]`` and
            ``[prompt | rejected]`` apart (the peer design, for comparison); ``none``, two padded rows per pair.
        pack_sft: SFT batches also carry their examples packed into rows (attention within each example).
        pack_tokens: token budget of a packed row (default: the batch's longest span, so no row is wider
            than that span; larger packs more spans per row, at attention's quadratic cost).
        group_by_length: validation/test/predict rows in order of decreasing length, so batches are not
            padded to an outlier (metrics and predictions are keyed by row, so the order is free).
        train_group_by_length: training batches of similar length (``LengthGroupedSampler``, seeded), for
            rows that are not packed: the reward model's (its paper recipe sets it).
        seed: subsampling, caps and random communities.
        cache_dir: folder of the prepared splits (default: ``$PERSONALM_CACHE/prepared``); one per split and
            settings, memory-mapped by every process and run that asks for the same. On a cluster, a folder
            every node sees (with ``trainer.prepare_data_per_node: false``) prepares once for all.
        num_proc: processes that tokenize (default: the cores this process may use, at most 16); 1 tokenizes
            in this process. Any value gives the same rows, ids and order.
    """

    def __init__(
        self,
        dataset: str = "allenai/compred",
        subset: Union[str, list[str]] = "finance",
        rows: Literal["sft", "preference"] = "sft",
        tokenizer: str = "embedded:tiny-llama",
        contextualize: bool = True,
        random_community: bool = False,
        conditioning_variants: bool = False,
        min_score_ratio: Optional[float] = 2.0,
        max_pairs_per_post: Optional[int] = 5,
        max_train_pairs: Optional[int] = None,
        max_eval_pairs: Optional[int] = None,
        cap_floor: Optional[int] = None,
        community_tau: Optional[float] = None,
        max_length: int = 1024,
        max_prompt_length: Optional[int] = None,
        batch_size: int = 8,
        eval_batch_size: Optional[int] = None,
        num_workers: int = 0,
        seed: int = 42,
        cache_dir: Optional[str] = None,
        num_proc: Optional[int] = None,
        pair_packing: Literal["prefix_shared", "two_spans", "none"] = "prefix_shared",
        pack_sft: bool = True,
        pack_tokens: Optional[int] = None,
        group_by_length: bool = True,
        train_group_by_length: bool = False,
    ):
        super().__init__()
        if not isinstance(contextualize, bool) or not isinstance(random_community, bool):
            raise TypeError("contextualize and random_community must be true or false (YAML booleans)")
        if random_community and not contextualize:
            raise ValueError("random_community replaces the community name, so it needs contextualize: true")
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2 tokens, got {max_length}")
        prompt_budget(max_length, max_prompt_length)  # max_prompt_length >= max_length fails here, at start-up
        for name, value in (("max_pairs_per_post", max_pairs_per_post), ("max_train_pairs", max_train_pairs),
                            ("max_eval_pairs", max_eval_pairs)):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1 (or null for no cap), got {value}")
        if cap_floor is not None and cap_floor < 0:
            raise ValueError(f"cap_floor must be >= 0 (or null for caps drawn over all pairs), got {cap_floor}")
        if community_tau is not None and community_tau < 0:
            raise ValueError(f"community_tau must be >= 0 (or null for a plain shuffle), got {community_tau}")
        if community_tau is not None and train_group_by_length:
            raise ValueError("community_tau and train_group_by_length each set the training order: choose one")
        if num_proc is not None and num_proc < 1:
            raise ValueError(f"num_proc must be at least 1 (or null for the cores available), got {num_proc}")
        self.save_hyperparameters()
        self.subsets = [subset] if isinstance(subset, str) else list(subset)
        self.splits: dict[str, datasets.Dataset] = {}
        self.stats: dict[str, compred.PrepStats] = {}
        self._tokenizer = None
        self._reported: dict[str, Path] = {}  # the folder each split's log line named
        self._predict_batch_size: Optional[int] = None  # set by a module whose backend takes more (vLLM)
        self._skip_predict: set = set()  # posts an interrupted predict already wrote

    # -- loaders ----------------------------------------------------------------------------------

    def collate_fn(self, split: str):
        """The collate function for a split: prompts (left-padded), preference pairs or SFT rows."""
        pad = self.tokenizer.pad_token_id
        if split == compred.PROMPT_SPLIT:
            return partial(collate_prompts, pad_id=pad)
        hp = self.hparams
        if hp.rows == "preference":
            return partial(collate_preference, pad_id=pad, pair_packing=hp.pair_packing, pack_tokens=hp.pack_tokens)
        return partial(collate_sft, pad_id=pad, pack=hp.pack_sft, pack_tokens=hp.pack_tokens)

    @property
    def eval_batch_size(self) -> int:
        return self.hparams.eval_batch_size or self.hparams.batch_size

    def _loader(self, split: str, shuffle: bool, batch_size: int) -> DataLoader:
        self._open(split)
        ds = by_length(self.splits[split]) if self.hparams.group_by_length and not shuffle else self.splits[split]
        return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, collate_fn=self.collate_fn(split),
                          num_workers=self.hparams.num_workers)

    def train_dataloader(self):
        """A ``StatefulDataLoader`` (its position in the epoch is saved in checkpoints, so a resumed run goes
        on from the batch it stopped at), shuffled anew each epoch from (seed, epoch) alone, never from the
        global RNG (which a resume restores as it was at the checkpoint)."""
        from torchdata.stateful_dataloader import StatefulDataLoader

        split = "train_pref"
        ds, trainer = self._open(split), self.trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        # a DistributedSampler even on one process: Lightning keeps it, and it is built here already at the
        # epoch a resumed run is in (Lightning sets a sampler's epoch only after the loader's first iterator)
        if self.hparams.train_group_by_length:
            sampler = LengthGroupedSampler(ds, row_lengths(ds), self.hparams.batch_size, world, rank, self.hparams.seed)
        elif self.hparams.community_tau is not None:
            _, codes = community_codes(ds)
            sampler = CommunityBalancedSampler(ds, codes, self.hparams.community_tau, world, rank, self.hparams.seed)
        else:
            sampler = DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=True, seed=self.hparams.seed)
        sampler.set_epoch(trainer.current_epoch if trainer is not None else 0)
        return StatefulDataLoader(ds, batch_size=self.hparams.batch_size, sampler=sampler,
                                  generator=torch.Generator().manual_seed(self.hparams.seed),  # workers' seeds
                                  collate_fn=self.collate_fn(split), num_workers=self.hparams.num_workers)

    def val_dataloader(self):
        return self._loader("validation_pref", False, self.eval_batch_size)

    def test_dataloader(self):
        return self._loader("test_pref", False, self.eval_batch_size)

    def set_predict_batch_size(self, size: int) -> None:
        """``predict``'s batch size instead of ``eval_batch_size`` (the vLLM backend takes many prompts at once)."""
        self._predict_batch_size = size

    def skip_predictions(self, indices) -> None:
        """Posts (by ``index``) whose predictions an interrupted run already wrote: ``predict`` leaves them out."""
        self._skip_predict = set(indices)

    def predict_dataloader(self):
        """Several processes: a padded ``DistributedSampler``, so every process runs as many batches (Lightning's
        default for predict gives some processes one batch fewer, and a sharded model's processes must run the
        same forward passes); the predictions writer keeps each post once. Posts already predicted by an
        interrupted run are left out (all of them: the last is predicted again, so the run still ends)."""
        loader = self._loader(compred.PROMPT_SPLIT, False, self._predict_batch_size or self.eval_batch_size)
        skip = self._skip_predict
        if skip:
            ds = loader.dataset
            keep = [i for i, index in enumerate(ds["index"]) if index not in skip] or [len(ds) - 1]
            loader = DataLoader(ds.select(keep), batch_size=loader.batch_size, collate_fn=loader.collate_fn,
                                num_workers=loader.num_workers)
        trainer = self.trainer
        if trainer is None or trainer.world_size <= 1:
            return loader
        sampler = DistributedSampler(loader.dataset, num_replicas=trainer.world_size, rank=trainer.global_rank,
                                     shuffle=False, drop_last=False)
        return DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=sampler, collate_fn=loader.collate_fn,
                          num_workers=loader.num_workers)
