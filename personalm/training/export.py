"""``python -m personalm export``: a Hugging Face export from any personalm checkpoint.

    python -m personalm export --ckpt_path <run>/checkpoints/epoch=0-step=500.ckpt [--output_dir DIR]
        [--config <the run's config> ...] [--model.init_args.<name> <value> ...]

The checkpoint may be a Lightning ``.ckpt`` file (single device, DDP, FSDP1 with ``state_dict_type: full``),
a distributed checkpoint folder (FSDP2 / ``ModelParallelStrategy``: ``*.distcp`` shards plus ``meta.pt``),
or a DeepSpeed checkpoint folder (ZeRO 2 or 3: its fp32 master weights are rebuilt). It runs in one
process on the CPU. The module is rebuilt from the hyperparameters the checkpoint records (its class and
arguments); a config or ``--model.init_args.*`` overrides them (e.g. a base model that moved). The export is
the one ``fit`` writes: LoRA merged in fp32, weights in ``export_dtype``, ``personalm_export.json``, and for
DPO the record of the reference it was trained against.
"""

from __future__ import annotations

import copy
import importlib
import tempfile
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from personalm.configs import arguments, compose, merge


def load_hyperparameters(ckpt_path: Path) -> dict:
    """The module's class path and arguments as the checkpoint recorded them."""
    if ckpt_path.is_dir():
        if (ckpt_path / "meta.pt").is_file():  # FSDP2 distributed checkpoint
            meta = torch.load(ckpt_path / "meta.pt", map_location="cpu", weights_only=False)
        elif _is_deepspeed(ckpt_path):
            meta = torch.load(_deepspeed_model_states(ckpt_path), map_location="cpu", weights_only=False)
        else:
            raise ValueError(f"{ckpt_path} is a folder but neither a distributed checkpoint (meta.pt) nor a "
                             "DeepSpeed checkpoint")
    elif ckpt_path.is_file():
        meta = torch.load(ckpt_path, map_location="cpu", weights_only=False, mmap=True)
    else:
        raise FileNotFoundError(f"checkpoint {ckpt_path} does not exist")
    hp = meta.get("hyper_parameters")
    if not hp or "_class_path" not in hp:
        raise ValueError(f"{ckpt_path} records no module class (hyper_parameters._class_path); was it written by "
                         "python -m personalm fit? Pass --config with the run's model section")
    return dict(hp)


def build_module(hparams: dict, overrides: Optional[dict] = None):
    """The LightningModule of the checkpoint, its model loaded as ``fit`` loads it (base, LoRA, fp32
    trainable weights), ready to receive the trained weights."""
    hp = {k: asdict(v) if is_dataclass(v) and not isinstance(v, type) else v for k, v in hparams.items()}
    hp = merge(copy.deepcopy(hp), overrides or {})  # lora.dropout overrides one field of lora
    module_name, _, class_name = hp.pop("_class_path").rpartition(".")
    hp.pop("_instantiator", None)
    cls = getattr(importlib.import_module(module_name), class_name)
    module = cls(**hp)
    module.configure_model()
    return module


def load_trained_weights(module, ckpt_path: Path) -> None:
    """Copy the checkpoint's weights into ``module`` (strict: every weight must be there)."""
    if ckpt_path.is_dir() and (ckpt_path / "meta.pt").is_file():
        import torch.distributed.checkpoint as dcp

        state = {"state_dict": module.state_dict()}  # tensors that share the module's storage: loaded in place
        dcp.load(state, checkpoint_id=str(ckpt_path))
        module.load_state_dict(state["state_dict"])
        return
    if ckpt_path.is_dir():  # DeepSpeed
        from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

        with tempfile.TemporaryDirectory() as tmp:
            state = convert_zero_checkpoint_to_fp32_state_dict(ckpt_path, Path(tmp) / "fp32.pt")["state_dict"]
    else:
        state = torch.load(ckpt_path, map_location="cpu", weights_only=False, mmap=True)["state_dict"]
    module.load_state_dict(state)


def export_checkpoint(ckpt_path: str, output_dir: Optional[str] = None, overrides: Optional[dict] = None) -> Path:
    """Write the Hugging Face export of a checkpoint; returns its folder (default: ``hf_model-<checkpoint>``
    beside the checkpoints folder, next to the ``hf_model`` that ``fit`` wrote, never over it)."""
    path = Path(ckpt_path).expanduser()
    module = build_module(load_hyperparameters(path), overrides)
    load_trained_weights(module, path)
    out = Path(output_dir) if output_dir else path.resolve().parent.parent / f"hf_model-{path.stem}"
    module.export(out)
    print(f"[personalm] exported {path} (Hugging Face format) to {out}", flush=True)
    return out


def _is_deepspeed(folder: Path) -> bool:
    return (folder / "latest").is_file() or (folder / "checkpoint").is_dir()


def _deepspeed_model_states(folder: Path) -> Path:
    found = sorted(folder.rglob("*model_states.pt"))
    if not found:
        raise ValueError(f"no DeepSpeed model states under {folder}")
    return found[0]


def main(argv: Optional[Sequence[str]] = None) -> Path:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m personalm export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt_path", required=True, help="a .ckpt file, or a distributed/DeepSpeed checkpoint folder")
    parser.add_argument("--output_dir", default=None,
                        help="default: hf_model-<checkpoint name> beside the checkpoints folder")
    parser.add_argument("--config", action="append", default=[],
                        help="a run config (YAML): its model.init_args override the checkpoint's (repeatable)")
    args, rest = parser.parse_known_args(list(argv) if argv is not None else None)
    settings = [f"--{key}={value}" for key, value in arguments(rest)]
    for key in (s.split("=", 1)[0] for s in settings):
        if not key.startswith("--model.init_args."):
            parser.error(f"unknown argument {key} (only --model.init_args.<name> may override the checkpoint)")
    composed = compose(args.config, settings)
    return export_checkpoint(args.ckpt_path, args.output_dir, (composed.get("model") or {}).get("init_args") or {})
