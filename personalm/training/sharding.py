"""Sharded training: FSDP2 over Lightning's device mesh, and the full weights gathered from any strategy.

FSDP2 (``torch.distributed.fsdp.fully_shard``) is applied in ``configure_model`` under ``FSDP2Strategy``
(Lightning's ``ModelParallelStrategy`` with every process in the data-parallel dimension): one FSDP unit
per decoder layer plus the root, parameters kept in their own dtype (fp32 where trained), gathered in bf16
for bf16-mixed and gradients reduced in fp32. A frozen DPO reference is sharded the same way, so a 7B
reference costs each of N GPUs 1/N of its weights. ``FSDP2Strategy`` settings: HSDP (``replicas``) and gradient
sync once per accumulation (``reduce_every_micro_batch``); loading straight into the shards is in
``sharded_loading``. Public torch APIs throughout except where torch has none (``initialize`` says which).

``full_state_dict`` gathers the trained weights to the first process (full tensors on the CPU) under FSDP2,
FSDP1 and DeepSpeed alike, so ``fit`` writes the same Hugging Face export under every strategy.
"""

from __future__ import annotations

import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Literal, Optional, Union

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from personalm.paths import run_folder


class FSDP2Strategy(ModelParallelStrategy):
    """``ModelParallelStrategy`` for fully sharded data parallel: every process of every node in the
    data-parallel dimension (the parent's default puts only the nodes there and the GPUs of a node in a
    tensor-parallel dimension, which personalm does not use: each process would then read the same
    batches and train its own replica).

    Args:
        replicas: ``1`` (default): FSDP, every weight sharded over all processes. ``"nodes"``: HSDP, one replica
            of the model per node, sharded over that node's GPUs: the weights' all-gathers and reduce-scatters
            stay on the node's fast links and only one all-reduce of the gradient shards per step crosses
            nodes; each GPU holds 1/(GPUs per node) of the weights, gradients and optimizer state instead of
            1/(all GPUs). An int ``r``: ``r`` replicas of ``world size / r`` consecutive processes each. The
            samplers span every process either way, the whole data-parallel group (the datamodule's training
            sampler over ``trainer.world_size``; Lightning's over the strategy's own ``data_parallel`` mesh
            dimension, which stays all processes: only the model is sharded over the HSDP mesh).
        reduce_every_micro_batch: with ``trainer.accumulate_grad_batches`` > 1, ``True`` (default) reduce-
            scatters the gradients after every micro-batch (each process keeps only its shard). ``False``
            reduces only after the last micro-batch of an accumulation (FSDP2's
            ``set_requires_gradient_sync(False)`` on the others: one reduce-scatter per optimizer step instead
            of one per micro-batch), at the cost of holding the unsharded gradients of the trained weights
            meanwhile: a whole copy per process (28 GB in fp32 for a fully trained 7B; LoRA's are small).
        data_parallel_size, tensor_parallel_size, save_distributed_checkpoint: Lightning's (tensor parallel
            is not supported: keep 1).
    """

    def __init__(self, data_parallel_size: Union[str, int] = "auto", tensor_parallel_size: Union[str, int] = 1,
                 save_distributed_checkpoint: bool = True, replicas: Union[int, Literal["nodes"]] = 1,
                 reduce_every_micro_batch: bool = True, **kwargs):
        super().__init__(data_parallel_size=data_parallel_size, tensor_parallel_size=tensor_parallel_size,
                         save_distributed_checkpoint=save_distributed_checkpoint, **kwargs)
        if replicas != "nodes" and (not isinstance(replicas, int) or replicas < 1):
            raise ValueError(f"replicas: 1, 'nodes' or a positive int, not {replicas!r}")
        self.replicas = replicas
        self.reduce_every_micro_batch = reduce_every_micro_batch

    def setup_environment(self) -> None:
        if self._data_parallel_size == "auto":
            self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()
        replicas = self.num_nodes if self.replicas == "nodes" else self.replicas
        if replicas > 1:  # HSDP: the module shards over a (replicate, shard) mesh; Lightning keeps its own
            from torch.distributed.device_mesh import init_device_mesh

            if self.world_size % replicas:
                raise ValueError(f"replicas: {replicas} does not divide the {self.world_size} processes")
            self.lightning_module._device_mesh = init_device_mesh(
                self.root_device.type, (replicas, self.world_size // replicas), mesh_dim_names=HSDP_DIMS)
            rank_zero_info(f"[personalm] HSDP: {replicas} replicas, each sharded over "
                           f"{self.world_size // replicas} processes")

    @contextmanager
    def block_backward_sync(self) -> Iterator[None]:
        """Lightning runs the micro-batches of an accumulation but the last inside this: with
        ``reduce_every_micro_batch: false`` their gradients are accumulated unsharded and unreduced."""
        if self.reduce_every_micro_batch:
            yield
            return
        from torch.distributed.fsdp import FSDPModule

        modules = [m for m in self.lightning_module.modules() if isinstance(m, FSDPModule)]
        for m in modules:
            m.set_requires_gradient_sync(False, recurse=False)
        try:
            yield
        finally:
            for m in modules:
                m.set_requires_gradient_sync(True, recurse=False)


HSDP_DIMS = ("replicate", "shard")


def data_parallel_mesh(module) -> Optional["torch.distributed.device_mesh.DeviceMesh"]:
    """The mesh to shard over when the trainer's strategy is FSDP2 (a ``ModelParallelStrategy``), else None."""
    mesh = getattr(module, "_device_mesh", None)
    if mesh is None:
        return None
    if tuple(mesh.mesh_dim_names or ()) == HSDP_DIMS:  # FSDP2Strategy(replicas=...): replicate dim 0, shard dim 1
        return mesh
    if "tensor_parallel" in (mesh.mesh_dim_names or ()) and mesh["tensor_parallel"].size() > 1:
        raise ValueError("personalm shards with FSDP2 only (data parallel); set tensor_parallel_size: 1 "
                         "(personalm.training.sharding.FSDP2Strategy does)")
    return mesh["data_parallel"] if "data_parallel" in (mesh.mesh_dim_names or ()) else mesh


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a Hugging Face model (peft-wrapped or not): one FSDP unit each.

    Found by the class names the model declares unsplittable (``_no_split_modules``: ``LlamaDecoderLayer``,
    ``MistralDecoderLayer``, ...), so any architecture transformers knows is covered.
    """
    names: set[str] = set()
    for m in model.modules():
        names.update(getattr(m, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"no decoder layers found to shard in {type(model).__name__} (looked for {sorted(names)})")
    return layers


def shard(model: nn.Module, mesh, bf16_compute: bool) -> nn.Module:
    """``fully_shard`` each decoder layer, then the root, in place. Parameters stay in their dtype (the
    trained ones fp32); with ``bf16_compute`` they are gathered in bf16 and gradients reduced in fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16_compute \
        else MixedPrecisionPolicy()
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def reshard(model: nn.Module) -> None:
    """Shard a model's root parameters again (embeddings, final norm, head). FSDP2 keeps them gathered after the
    root's forward for the backward that follows; a frozen model (DPO's reference) has no backward, so after it
    was scored (the head is applied after the forward, chunk by chunk) this frees them, or they would stay whole
    on every process for the whole run."""
    if hasattr(model, "reshard"):  # an FSDPModule
        model.reshard()


def initialize(model: nn.Module) -> None:
    """Run FSDP2's lazy initialisation now, with every parameter in play.

    FSDP2 initialises at the root's first forward. When that forward leaves some parameters out (a DPO
    reference scored with the LoRA adapters turned off, before any training step), torch 2.13 then
    refuses the adapters' bf16 gradients ("grad_dtype 'Float'") in the first backward. Torch has no public
    call for the initialisation itself; ``unshard`` (public) runs it for each FSDP unit's parameters, which is
    what the first backward needs. One unit at a time, so no more than one is gathered at once.
    """
    from torch.distributed.fsdp import FSDPModule

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.unshard()
                module.reshard()


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def full_state_dict(module) -> Optional[dict[str, torch.Tensor]]:
    """The trained model's full weights (keys of ``module.model``), on the CPU of the first process, gathered
    from whatever strategy trained them; ``{}`` on the other processes. None when ``module.model`` already
    holds full weights in every process (single device, DDP): export it as it is.

    Every process must call this (the gathers are collectives).
    """
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

    strategy = module.trainer.strategy
    if is_sharded(module.model):  # FSDP2
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(module.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if isinstance(strategy, FSDPStrategy):  # FSDP1: a full state dict on rank 0, whatever state_dict_type says
        from lightning.fabric.strategies.fsdp import _get_full_state_dict_context

        with _get_full_state_dict_context(strategy.model, world_size=strategy.world_size):
            state = strategy.model.state_dict()
        return _strip(state, "model.") if module.trainer.is_global_zero else {}
    if isinstance(strategy, DeepSpeedStrategy):  # the fp32 master weights live in the optimizer (ZeRO 2 and 3)
        return _deepspeed_fp32_state_dict(module)
    return None


def _strip(state: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _deepspeed_fp32_state_dict(module) -> dict:
    """Save a DeepSpeed checkpoint and rebuild the fp32 weights from it (DeepSpeed's zero_to_fp32, in memory):
    under ZeRO the module holds bf16 copies; the fp32 masters are partitioned in the optimizer. Not run in
    this repository's CI (DeepSpeed needs a GPU)."""
    import shutil

    trainer = module.trainer
    run = run_folder(trainer)  # a collective the first time: every process asks
    made = tempfile.mkdtemp(prefix="personalm-zero-", dir=run) if trainer.is_global_zero else None
    folder = Path(trainer.strategy.broadcast(made))
    trainer.save_checkpoint(folder / "last.ckpt")
    state = {}
    if trainer.is_global_zero:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        full = get_fp32_state_dict_from_zero_checkpoint(str(folder / "last.ckpt"))
        full = {k.partition("_forward_module.")[2] or k: v for k, v in full.items()}  # Lightning's wrapper
        state = _strip(full, "model.")
    trainer.strategy.barrier()
    if trainer.is_global_zero:
        shutil.rmtree(folder, ignore_errors=True)
    return state
