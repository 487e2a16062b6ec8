"""DPO's frozen reference: a copy of the starting weights, or the policy with its LoRA adapters turned off.

The copy is kept out of the module tree (not in the optimizer, the checkpoint or DDP's wrapper), in eval
mode, without gradients, dropout off, sharded under FSDP2 like the policy, and loaded without touching
the global RNG. Where it came from is recorded with a DPO export (``personalm_dpo.json``), so evaluating
the export later measures rewards against the reference it was trained against, in the dtype it had.
"""

from __future__ import annotations

import gc
import hashlib
import json
from pathlib import Path
from typing import Optional

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from personalm.models import load_causal_lm, load_tokenizer, merge_lora_in_fp32, resolve
from personalm.models.rng import rng_untouched
from personalm.paths import is_embedded
from personalm.training.attention import use_attention
from personalm.training.logprobs import SequenceLogprobs, sequence_logps
from personalm.training.sharded_loading import empty_for_shards, fill_shards
from personalm.training.sharding import data_parallel_mesh, reshard, shard

TRAINED_AGAINST = "personalm_dpo.json"  # in a DPO export: the reference it was trained against


def disable_dropout(model: nn.Module) -> None:
    """Dropout off (as trl does), so policy and reference agree at step 0 and the first loss is ln 2."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    for key in ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if hasattr(getattr(model, "config", None), key):
            setattr(model.config, key, 0.0)


def model_fingerprint(model: nn.Module, skip: str = None) -> str:
    """Content fingerprint of a model's full weights (names, shapes, dtypes, sums and leading values); weights
    whose name holds ``skip`` left out."""
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        if skip and skip in name:
            continue
        t = tensor.detach()
        h.update(f"{name}{tuple(t.shape)}{t.dtype}{float(t.double().sum()):.10e}".encode())
        h.update(t.flatten()[:64].float().cpu().numpy().tobytes())
    return h.hexdigest()[:32]


def frozen_logprobs(model: nn.Module, seqs: dict, chunk) -> SequenceLogprobs:
    """Sequence log-probs of a frozen model; under FSDP2 its root's weights are sharded again afterwards."""
    out = sequence_logps(model, seqs, chunk)
    reshard(model)
    return out


class Reference:
    """The reference of a ``DPOModule`` (its settings, its trainer, its policy): what to load, the model
    itself (``copy``) or the policy without adapters (``adapters_off``), its log-probs and its record."""

    def __init__(self, module):
        self.module = module
        self._frozen: list[nn.Module] = []  # in a list: a module attribute would join the module tree
        self.fingerprint: Optional[str] = None  # of the full weights, taken before sharding (cache key)

    @property
    def adapters_off(self) -> bool:
        """The policy with its LoRA adapters disabled: only while training from the SFT weights. A trained
        export evaluated later gets a copy of the reference it was trained against."""
        return self.module.hparams.reference == "adapters_off" and self.module.training_run

    @property
    def loaded(self) -> bool:
        return bool(self._frozen)

    def trained_against(self) -> Optional[dict]:
        """When evaluating a DPO export: the record of the reference it was trained against."""
        record = Path(resolve(self.module.hparams.model_name_or_path)) / TRAINED_AGAINST
        if self.module.training_run or not record.is_file():
            return None
        return json.loads(record.read_text())

    @property
    def source(self) -> str:
        """``reference_name_or_path`` if set; else, evaluating a DPO export, the reference it was trained
        against; else the policy's own starting weights."""
        hp = self.module.hparams
        if hp.reference_name_or_path:
            return hp.reference_name_or_path
        record = self.trained_against()
        if record is None:
            return hp.model_name_or_path
        try:
            resolve(record["reference"])
        except FileNotFoundError:
            raise FileNotFoundError(f"{hp.model_name_or_path} was trained against the reference {record['reference']} "
                                    f"(see {record}), which is gone; pass reference_name_or_path") from None
        return record["reference"]

    @property
    def dtype(self) -> Optional[str]:
        """``dtype`` in training. Evaluating: ``eval_dtype`` or the compute dtype, as for the policy (bf16 under
        ``bf16-mixed``); under ``32-true`` a DPO export's reference in the dtype it had in training."""
        if self.module.training_run or self.module.load_dtype is not None:
            return self.module.load_dtype
        record = self.trained_against()
        if record is not None and "reference_dtype" in record and not self.module.hparams.reference_name_or_path:
            return record["reference_dtype"]
        return None

    def check_tokenizer(self, tokenizer) -> None:
        if self.source == self.module.hparams.model_name_or_path:
            return
        if load_tokenizer(self.source).get_vocab() != tokenizer.get_vocab():
            raise ValueError(f"reference {self.source} has another tokenizer/vocabulary than the policy "
                             f"{self.module.hparams.model_name_or_path}: their log-probabilities are not comparable")

    def note_policy(self, policy: nn.Module) -> None:
        """With ``adapters_off`` the reference is the policy at its start: fingerprint it before sharding."""
        if self.adapters_off:  # the adapters are off in the reference: their random start does not count
            self.fingerprint = "adapters_off:" + model_fingerprint(policy, skip="lora_")

    @property
    def model(self) -> Optional[nn.Module]:
        """The frozen copy, loaded on first use (None with ``adapters_off``)."""
        if self.adapters_off:
            return None
        m = self.module
        if not self._frozen:
            mesh = data_parallel_mesh(m)
            # FSDP2: filled shard by shard from its files (not when precomputing: the cache key needs it whole)
            empty = empty_for_shards(self.source, self.dtype) \
                if mesh is not None and not m.hparams.precompute_reference else None
            if empty is not None:
                ref = empty.model
            else:
                with rng_untouched(m.device):  # loading the reference must not change the training's randomness
                    ref = load_causal_lm(self.source, self.dtype)
            if hasattr(ref, "peft_config"):  # an adapter-only SFT export: the reference is base + adapter
                ref = merge_lora_in_fp32(ref)
            use_attention(ref, m.hparams.get("attention"))  # the policy's attention implementation
            if ref.get_input_embeddings().num_embeddings != m.model.get_input_embeddings().num_embeddings:
                raise ValueError("reference and policy have different vocabulary sizes")
            if m.hparams.disable_dropout:
                disable_dropout(ref)
            ref.eval().requires_grad_(False)
            if m.hparams.precompute_reference:
                self.fingerprint = model_fingerprint(ref)
            if mesh is not None:  # FSDP2: each process holds 1/N of the reference too
                shard(ref, mesh, m.bf16_compute)
                rank_zero_info(f"[personalm] the reference is sharded over {mesh.size()} processes (FSDP2)")
            if empty is not None:
                fill_shards(ref, empty.files, m.shard_device)
            self._frozen.append(ref)
        ref = self._frozen[0]
        if ref.device != m.device:
            ref.to(m.device)
        return ref

    @torch.no_grad()
    def logprobs(self, seqs: dict) -> SequenceLogprobs:
        chunk = self.module.hparams.logprob_chunk
        if not self.adapters_off:
            return frozen_logprobs(self.model, seqs, chunk)
        policy = self.module.model
        was_training = policy.training
        policy.eval()
        with policy.disable_adapter():
            out = sequence_logps(policy, seqs, chunk)
        policy.train(was_training)
        return out

    def free(self) -> None:
        self._frozen.clear()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def record(self) -> dict:
        """What a DPO export records of its reference (``personalm_dpo.json``)."""
        hp = self.module.hparams
        local = Path(resolve(self.source))
        source = str(local.resolve()) if local.exists() and not is_embedded(self.source) else self.source
        return {"reference": source, "reference_dtype": hp.dtype, "beta": hp.beta, "loss_type": hp.loss_type}
