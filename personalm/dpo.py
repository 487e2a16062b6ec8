"""DPO against a frozen reference, with per-community preference metrics and conditioning sensitivity."""

from __future__ import annotations

import gc
import hashlib
import json
import os
from pathlib import Path
from typing import Literal, Optional

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torch.utils.data import DataLoader, Subset

from personalm.dpo_loss import check_dpo_args, dpo_loss, response_start, sequence_logprobs
from personalm.files import write_text
from personalm.lm_module import CausalLMModule
from personalm.metrics import STAGE_SPLIT, add_stage_metrics, log_stage_metrics
from personalm.models import load_causal_lm, load_tokenizer, merge_lora_in_fp32, resolve
from personalm.sharding import data_parallel_mesh, initialize, is_sharded, shard

TRAINED_AGAINST = "personalm_dpo.json"  # in a DPO export: the reference it was trained against
VARIANTS = ("none", "random")  # the same pairs with no community / a wrong one (evaluation only)


def disable_dropout(model: nn.Module) -> None:
    """Dropout off (as trl does), so policy and reference agree at step 0 and the first loss is ln 2."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    for key in ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if hasattr(getattr(model, "config", None), key):
            setattr(model.config, key, 0.0)


def model_fingerprint(model: nn.Module) -> str:
    """Content fingerprint of a model's weights (names, shapes, dtypes, sums and leading values)."""
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        t = tensor.detach()
        h.update(f"{name}{tuple(t.shape)}{t.dtype}{float(t.double().sum()):.10e}".encode())
        h.update(t.flatten()[:64].float().cpu().numpy().tobytes())
    return h.hexdigest()[:32]


class DPOModule(CausalLMModule):
    """Direct Preference Optimization on ``ComPreDDataModule(rows="preference")`` batches.

    Args:
        beta: strength of the KL anchor to the reference (paper: 0.1).
        loss_type: ``sigmoid`` (DPO), ``ipo`` or ``hinge``; see ``personalm.dpo_loss``.
        label_smoothing: conservative DPO's assumed label-noise rate e in [0, 0.5) (sigmoid only).
        sft_weight: weight of an added NLL term (per-token mean) on the chosen response, as in RPO
            (Pang et al. 2024); 0: pure DPO. It keeps the chosen responses likely, so generations stay
            fluent. ``train/loss`` stays the preference loss alone (comparable across runs); the
            minimised total is logged as ``train/objective``.
        reference: ``copy``: a frozen copy of the starting weights (the paper's). ``adapters_off``: with
            LoRA, the policy with its adapters disabled: no second model in memory; only correct when
            the SFT weights were merged into the base (an adapter-only SFT export is refused).
        reference_name_or_path: reference weights if not the policy's starting point (must share the
            tokenizer and vocabulary).
        precompute_reference: score every pair with the reference once before training, cache the
            log-probs on disk (keyed by data and reference fingerprints) and free the reference.
        reference_cache: folder for those caches (default ``$PERSONALM_CACHE/reference_logps``).
        disable_dropout: dropout off in policy and reference (recommended for DPO).
        Other arguments: see ``CausalLMModule`` (paper's DPO: lr 2e-7, cosine, 1000 warmup steps).
    """

    def __init__(
        self,
        beta: float = 0.1,
        loss_type: Literal["sigmoid", "ipo", "hinge"] = "sigmoid",
        label_smoothing: float = 0.0,
        sft_weight: float = 0.0,
        reference: Literal["copy", "adapters_off"] = "copy",
        reference_name_or_path: Optional[str] = None,
        precompute_reference: bool = False,
        reference_cache: Optional[str] = None,
        disable_dropout: bool = True,
        **kwargs,
    ):
        check_dpo_args(beta, loss_type, label_smoothing)  # bad settings fail before anything loads
        if reference == "adapters_off" and kwargs.get("lora") is None:
            raise ValueError("reference: adapters_off needs LoRA (the policy's adapters are what it turns off)")
        if reference == "adapters_off" and reference_name_or_path:
            raise ValueError("reference: adapters_off uses the policy's own base weights; reference_name_or_path "
                             "needs reference: copy")
        super().__init__(**kwargs)
        self._frozen: list[nn.Module] = []  # the reference, kept out of the module tree: not in the
        # optimizer, not in checkpoints, not wrapped by DDP
        self._ref_logps: dict[str, dict[str, torch.Tensor]] = {}  # split -> variant -> [rows, 4]
        self._reference_fingerprint: Optional[str] = None  # of the reference's full weights (cache key)
        self.metrics = nn.ModuleDict()

    # -- models -----------------------------------------------------------------------------------

    def configure_model(self) -> None:
        if self.model is not None:
            return
        hp = self.hparams
        if hp.reference == "adapters_off" and self.training_run and \
                (Path(resolve(hp.model_name_or_path)) / "adapter_config.json").exists():
            raise ValueError(
                f"reference: adapters_off with an adapter-only SFT export ({hp.model_name_or_path}) would use the "
                "base model before SFT as reference. Export the SFT model merged (lora.merge_on_export: true) "
                "or use reference: copy.")
        super().configure_model()
        if self._fn() != "predict":  # generating needs no reference
            self._check_reference_tokenizer()

    def prepare_model(self) -> None:
        if self.hparams.disable_dropout:
            disable_dropout(self.model)
        if self.hparams.precompute_reference and self._adapters_off:  # before sharding: full weights
            self._reference_fingerprint = "adapters_off:" + model_fingerprint(self.model)

    @property
    def _adapters_off(self) -> bool:
        """The reference is the policy with its LoRA adapters disabled: only while training from the SFT
        weights. A trained export evaluated later gets a copy of the reference it was trained against."""
        return self.hparams.reference == "adapters_off" and self.training_run

    def _check_reference_tokenizer(self) -> None:
        name = self.reference_source
        if name == self.hparams.model_name_or_path:
            return
        ref_tok = load_tokenizer(name)
        if ref_tok.get_vocab() != self.tokenizer.get_vocab():
            raise ValueError(f"reference {name} has another tokenizer/vocabulary than the policy "
                             f"{self.hparams.model_name_or_path}: their log-probabilities are not comparable")

    @property
    def reference_source(self) -> str:
        """Where the reference comes from: ``reference_name_or_path`` if set; else, when evaluating a DPO
        export, the reference it was trained against (recorded next to its weights); else the policy's
        own starting weights."""
        hp = self.hparams
        if hp.reference_name_or_path:
            return hp.reference_name_or_path
        record = self._trained_against()
        if record is not None:
            source = record["reference"]
            try:
                resolve(source)
            except FileNotFoundError:
                raise FileNotFoundError(f"{hp.model_name_or_path} was trained against the reference {source} "
                                        f"(see {record}), which is gone; pass reference_name_or_path") from None
            return source
        return hp.model_name_or_path

    def _trained_against(self) -> Optional[dict]:
        """When evaluating a DPO export: the record of the reference it was trained against."""
        record = Path(resolve(self.hparams.model_name_or_path)) / TRAINED_AGAINST
        if self.training_run or not record.is_file():
            return None
        return json.loads(record.read_text())

    @property
    def reference_dtype(self) -> Optional[str]:
        """The reference's dtype: ``dtype`` in training; when evaluating a DPO export, the dtype its
        reference had in training (recorded), so its rewards are the ones it was trained on."""
        record = self._trained_against()
        if record is not None and "reference_dtype" in record and not self.hparams.reference_name_or_path:
            return record["reference_dtype"]
        return self.load_dtype

    @property
    def reference(self) -> Optional[nn.Module]:
        """The frozen reference (loaded on first use; None for ``adapters_off``)."""
        hp = self.hparams
        if self._adapters_off:
            return None
        if not self._frozen:
            with self._rng_untouched():  # loading the reference must not change the training's randomness
                ref = load_causal_lm(self.reference_source, self.reference_dtype)
            if hasattr(ref, "peft_config"):  # an adapter-only SFT export: the reference is base + adapter
                ref = merge_lora_in_fp32(ref)
            if ref.get_input_embeddings().num_embeddings != self.model.get_input_embeddings().num_embeddings:
                raise ValueError("reference and policy have different vocabulary sizes")
            if hp.disable_dropout:
                disable_dropout(ref)
            ref.eval().requires_grad_(False)
            if hp.precompute_reference:
                self._reference_fingerprint = model_fingerprint(ref)  # before sharding: full weights
            mesh = data_parallel_mesh(self)
            if mesh is not None:  # FSDP2: each process holds 1/N of the reference too
                shard(ref, mesh, self.bf16_compute)
            self._frozen.append(ref)
        ref = self._frozen[0]
        if ref.device != self.device:
            ref.to(self.device)
        return ref

    def _rng_untouched(self):
        """Whatever runs inside leaves the global RNG as it found it (data order, dropout), so the same run
        gives the same result with the reference loaded early, late, or precomputed."""
        return torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else [])

    def _free_reference(self) -> None:
        self._frozen.clear()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # -- log-probs ----------------------------------------------------------------------------------

    @staticmethod
    def _logps(model: nn.Module, seqs: dict):
        """Sequence log-probs. Only positions from the earliest response on need logits (the LM head and
        the log-softmax over the vocabulary are a large share of the work), so the model is asked for
        those alone (``logits_to_keep``); the result is the same as from all logits."""
        labels = seqs["labels"]
        start = response_start(labels)
        logits = model(input_ids=seqs["input_ids"], attention_mask=seqs["attention_mask"],
                       logits_to_keep=labels.size(1) - start).logits
        return sequence_logprobs(logits, labels[:, start:])

    @torch.no_grad()
    def _reference_logps(self, seqs: dict):
        if self._adapters_off:
            was_training = self.model.training
            self.model.eval()
            with self.model.disable_adapter():
                out = self._logps(self.model, seqs)
            self.model.train(was_training)
            return out
        return self._logps(self.reference, seqs)

    def _ref_table(self, seqs: dict) -> torch.Tensor:
        """[2B] sums and [2B] means of the reference log-probs, as columns of a [2B, 2] tensor."""
        out = self._reference_logps(seqs)
        return torch.stack([out.sum, out.mean], dim=1)

    def pair_losses(self, batch: dict, stage: str, variant: Optional[str] = None):
        """Preference losses, rewards and policy log-probs (sums) for one batch of pairs (chosen rows, then
        rejected), and the chosen responses' per-token mean log-prob (with its graph, for ``sft_weight``)."""
        hp = self.hparams
        seqs = batch if variant is None else batch[variant]
        n = len(batch["community"])
        policy = self._logps(self.model, seqs)
        cached = self._ref_logps.get(STAGE_SPLIT[stage], {}).get(variant or "true")
        if cached is not None:
            rows = cached[batch["index"].cpu()].to(self.device)  # [B, 4]: c_sum, r_sum, c_mean, r_mean
            ref = torch.cat([rows[:, [0, 2]], rows[:, [1, 3]]])
        else:
            ref = self._ref_table(seqs)
        col = 1 if hp.loss_type == "ipo" else 0  # IPO on per-token means, the others on sums
        pol = policy.mean if hp.loss_type == "ipo" else policy.sum
        losses, chosen_r, rejected_r = dpo_loss(pol[:n], pol[n:], ref[:n, col], ref[n:, col],
                                                hp.beta, hp.loss_type, hp.label_smoothing)
        return losses, chosen_r, rejected_r, policy.sum[:n].detach(), policy.sum[n:].detach(), policy.mean[:n]

    # -- precomputed reference ----------------------------------------------------------------------

    def _precompute(self, stage: str) -> None:
        """Score every pair of the stage's split with the reference once; cache on disk; all ranks."""
        split = STAGE_SPLIT[stage]
        dm = self.trainer.datamodule
        if split in self._ref_logps or dm is None or split not in getattr(dm, "splits", {}):
            return
        ds = dm.splits[split]
        variants = ["true"] + [v for v in VARIANTS if f"{v}_prompt_ids" in ds.column_names]
        ref_name = self.reference_source
        if not self._adapters_off:
            _ = self.reference  # loaded on first use, its fingerprint taken before any sharding
        meta = {"data": ds._fingerprint, "rows": len(ds), "variants": variants,
                "reference": self._reference_fingerprint, "reference_name": ref_name,
                "precision": str(self.trainer.precision)}
        key = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:24]
        folder = Path(self.hparams.reference_cache or Path(os.environ.get(
            "PERSONALM_CACHE", Path.home() / ".cache" / "personalm")) / "reference_logps").expanduser()
        path = folder / f"{split}-{key}.pt"
        if self.trainer.strategy.broadcast(path.exists()):  # every rank takes rank 0's answer
            saved = torch.load(path, map_location="cpu", weights_only=True)
            found = {k: saved["meta"].get(k) for k in meta}
            if found != meta:
                raise ValueError(f"reference log-prob cache {path} was made for other data or another reference "
                                 f"model ({found} != {meta}); delete it or point reference_cache elsewhere")
            self._ref_logps[split] = saved["logps"]
            rank_zero_info(f"[personalm] reference log-probs for {split} read from {path}")
            return
        table = self._score_split(ds, variants)
        if self.trainer.is_global_zero:
            folder.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + f".tmp{os.getpid()}")
            torch.save({"meta": meta, "logps": table}, tmp)
            os.replace(tmp, path)
            rank_zero_info(f"[personalm] reference log-probs for {len(ds)} {split} pairs cached in {path}")
        self.trainer.strategy.barrier()
        self._ref_logps[split] = table

    @torch.no_grad()
    def _score_split(self, ds, variants: list[str]) -> dict[str, torch.Tensor]:
        """Each rank scores rows rank, rank + world, ...; an all-gather gives every rank the whole table."""
        world, rank = self.trainer.world_size, self.trainer.global_rank
        mine = list(range(rank, len(ds), world)) or [0]  # fewer rows than processes: score row 0 again
        per_rank = -(-len(ds) // world)
        mine += mine[-1:] * (per_rank - len(mine))  # equal lengths for all_gather
        loader = DataLoader(Subset(ds, mine), batch_size=self.trainer.datamodule.eval_batch_size,
                            collate_fn=self.trainer.datamodule.collate_fn("test_pref"))
        parts = {v: [] for v in variants}
        for batch in loader:
            batch = self.trainer.strategy.batch_to_device(batch)
            n = len(batch["community"])
            for v in variants:
                with self.trainer.precision_plugin.forward_context():  # the same autocast as in training
                    t = self._ref_table(batch if v == "true" else batch[v])
                parts[v].append(torch.stack([t[:n, 0], t[n:, 0], t[:n, 1], t[n:, 1]], dim=1))
        index = torch.tensor(mine, device=self.device)
        all_index = self.all_gather(index).reshape(-1).cpu()
        tables = {}
        for v in variants:
            values = self.all_gather(torch.cat(parts[v])).reshape(-1, 4).cpu()
            table = torch.empty(len(ds), 4, dtype=torch.float32)
            table[all_index] = values.float()
            tables[v] = table
        return tables

    # -- Lightning hooks ----------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        super().setup(stage)
        dm = self.trainer.datamodule if self.trainer is not None else None
        if dm is not None and hasattr(dm, "splits"):
            add_stage_metrics(self.metrics, dm.splits, VARIANTS)

    def _maybe_precompute(self, stages) -> None:
        if self.hparams.precompute_reference:
            if self._adapters_off and is_sharded(self.model):
                initialize(self.model)  # before a forward that leaves the adapters out
            with self._rng_untouched():  # the scoring DataLoader draws a seed from the global RNG
                for stage in stages:
                    self._precompute(stage)
            if not self._adapters_off and self._frozen:
                self._free_reference()

    def on_fit_start(self) -> None:
        self._maybe_precompute(["train", "val"])

    def on_validation_start(self) -> None:
        self._maybe_precompute(["val"])

    def on_test_start(self) -> None:
        self._maybe_precompute(["test"])

    def _step(self, batch: dict, stage: str):
        out = self.pair_losses(batch, stage)
        if f"{stage}_true" in self.metrics:
            self.metrics[f"{stage}_true"].update(batch["community"], *out[:5])
        for v in VARIANTS:  # evaluation only: the same pairs with no community / a wrong one
            if stage != "train" and v in batch and f"{stage}_{v}" in self.metrics:
                self.metrics[f"{stage}_{v}"].update(batch["community"], *self.pair_losses(batch, stage, v)[:5])
        return out

    def training_step(self, batch, batch_idx):
        losses, chosen_r, rejected_r, chosen_lp, rejected_lp, chosen_mean_lp = self._step(batch, "train")
        loss = losses.mean()
        n = len(losses)
        self.log("train/loss", loss, prog_bar=True, batch_size=n)  # the preference loss (ln 2 at the start)
        if self.hparams.sft_weight:  # RPO-style: + weight * NLL (per token) of the chosen response
            nll = -chosen_mean_lp.mean()
            self.log_dict({"train/nll_chosen": nll, "train/objective": loss + self.hparams.sft_weight * nll},
                          batch_size=n)
            loss = loss + self.hparams.sft_weight * nll
        self.log_dict({"train/rewards/chosen": chosen_r.mean(), "train/rewards/rejected": rejected_r.mean(),
                       "train/rewards/margins": (chosen_r - rejected_r).mean(),
                       "train/rewards/accuracies": (chosen_r > rejected_r).float().mean(),
                       "train/logps/chosen": chosen_lp.mean(), "train/logps/rejected": rejected_lp.mean()},
                      batch_size=n)
        return loss

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._step(batch, "test")

    def on_train_epoch_end(self) -> None:
        log_stage_metrics(self, "train", skip_overall=True)  # overall train figures are logged every step

    def on_validation_epoch_end(self) -> None:
        log_stage_metrics(self, "val")

    def on_export(self, folder: Path) -> None:
        """Record next to the weights which reference they were trained against, so ``validate``/``test``
        of the export measure rewards against that reference."""
        record = {"reference": _absolute(self.reference_source), "reference_dtype": self.hparams.dtype,
                  "beta": self.hparams.beta, "loss_type": self.hparams.loss_type}
        (folder / TRAINED_AGAINST).write_text(json.dumps(record, indent=2))

    def on_test_epoch_end(self) -> None:
        write_test_metrics(self.trainer, self.hparams.model_name_or_path, log_stage_metrics(self, "test"))


def _absolute(name_or_path: str) -> str:
    local = Path(resolve(name_or_path))
    return str(local.resolve()) if local.exists() and not name_or_path.startswith("embedded:") else name_or_path


def write_test_metrics(trainer, model_name: str, results: dict) -> None:
    """``<log_dir>/test_metrics.json``: ``{"model", "conditioning": {variant: {metric: value}}}``, written
    atomically by the first process (the figures are already synced across processes)."""
    log_dir = trainer.log_dir  # a broadcast under DDP/FSDP: every process asks, or the first one waits forever
    if not trainer.is_global_zero or not log_dir:
        return
    path = Path(log_dir) / "test_metrics.json"
    write_text(path, json.dumps({"model": model_name, "conditioning": results}, indent=2))
    rank_zero_info(f"[personalm] per-community test metrics written to {path}")
