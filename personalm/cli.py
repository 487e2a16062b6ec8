"""The LightningCLI of personalm: ``python -m personalm fit|validate|test|predict --config ...``."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Optional

import torch
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from personalm.data.datamodule import ComPreDDataModule
from personalm.evaluation.predict_writer import JsonlPredictionWriter
from personalm.paths import RUNS, go_on_in, run_folder
from personalm.training.base import CausalLMModule
from personalm.training.callbacks import LoggingStepProgressBar
from personalm.training.checkpoints import Checkpoints, last_checkpoint


class PersonalmCLI(LightningCLI):
    """Subclass mode for the model (a config picks SFTModule, DPOModule, ...); one DataModule."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("model_class", CausalLMModule)
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("datamodule_class", ComPreDDataModule)
        kwargs.setdefault("save_config_callback", SaveRunConfig)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True, "save_to_log_dir": False})
        kwargs.setdefault("auto_configure_optimizers", False)  # modules own optimizer + schedule
        self._resumed: Optional[Path] = None  # the run folder ``--ckpt_path last`` goes on in
        super().__init__(*args, **kwargs)

    def _parse_ckpt_path(self) -> None:
        """``fit --ckpt_path last``: the newest ``last.ckpt`` of the run's root, resumed into its own run folder
        (checkpoints and export go on where the killed run left them, under any logger; a TensorBoard or CSV
        logger whose folder is the run's logs on there too, any other logger as it does); none yet: start from the
        beginning.

        Then as LightningCLI does (the checkpoint's hyperparameters fill the model's settings)."""
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path == "last" and subcommand == "fit":
            ckpt_path = self._resume_last()
        if not ckpt_path or not Path(ckpt_path).is_file():
            return
        hparams = dict(torch.load(ckpt_path, weights_only=True, map_location="cpu").get("hyper_parameters", {}))
        hparams.pop("_instantiator", None)
        if not hparams:
            return
        if "_class_path" in hparams:
            hparams = {"class_path": hparams.pop("_class_path"), "dict_kwargs": hparams}
        self.config = self.parser.parse_object({subcommand: {"model": hparams}}, self.config)

    def _resume_last(self):
        sub = self.config.subcommand
        root = Path(self.config[sub].trainer.default_root_dir or ".")
        found = last_checkpoint(root)
        if found is None:
            print(f"[personalm] --ckpt_path last: no checkpoint under {root}/{RUNS} yet; starting from the "
                  "beginning", flush=True)
            self.config[sub].ckpt_path = None
            return None
        link, version = found
        step = link.resolve().stem.split("=")[-1]
        print(f"[personalm] --ckpt_path last: resuming from {link.resolve()} (step {step}), going on in "
              f"{link.parent.parent}", flush=True)
        self.config[sub].ckpt_path = str(link)
        self._resumed = link.parent.parent
        loggers = self.config[sub].trainer.logger
        if loggers in (None, True):  # the default logger, into the killed run's folder
            logger = {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                      "init_args": {"save_dir": str(root), "version": version}}
            self.config = self.parser.parse_object({sub: {"trainer": {"logger": logger}}}, self.config)
        else:  # a TensorBoard or CSV logger whose folder is the run's (no version set): on in the killed run's
            for logger in loggers if isinstance(loggers, list) else [loggers] if loggers else []:
                if _logs_in_run_folders(logger, root) and logger.init_args.version is None:
                    logger.init_args.version = version
        return str(link)

    def _instantiate_trainer(self, config, callbacks):
        """``enable_checkpointing: false`` (benchmarks, throwaway runs) also drops the ``checkpoints`` block,
        which Lightning would otherwise refuse as a checkpoint callback with checkpointing disabled. The progress
        bar is ``LoggingStepProgressBar`` unless the config names one."""
        if config.get("enable_checkpointing") is False:
            callbacks = [c for c in callbacks if not isinstance(c, ModelCheckpoint)]
        if config.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in
                                                                       [*callbacks, *(config.get("callbacks") or [])]):
            callbacks = [*callbacks, LoggingStepProgressBar()]  # its figures read at logging steps only
        trainer = super()._instantiate_trainer(config, callbacks)
        if self._resumed is not None:
            go_on_in(trainer, self._resumed)
        return trainer

    def before_fit(self) -> None:
        """Refuse precision settings that cannot train before the data are prepared (minutes on real data)."""
        check = getattr(self.model, "check_training_precision", None)
        if check is not None:
            check(str(self.trainer.precision))

    def before_predict(self) -> None:
        """``generation.backend: vllm`` without vLLM fails here, in one line, before any data is prepared."""
        settings = getattr(self.model, "generation_settings", None)
        if settings is not None and settings.backend == "vllm":
            from personalm.training.vllm_generation import VLLMUnavailable, require_vllm

            try:
                require_vllm()
            except VLLMUnavailable as err:
                raise SystemExit(f"[personalm] {err}") from None

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.init_args.model_name_or_path", "data.tokenizer")
        parser.add_lightning_class_args(JsonlPredictionWriter, "predictions")
        parser.add_lightning_class_args(Checkpoints, "checkpoints")
        if "return_predictions" in parser.get_defaults():  # the writer holds them; don't keep all in RAM
            parser.set_defaults({"return_predictions": False})


class SaveRunConfig(SaveConfigCallback):
    """``config.yaml`` in the run's folder (``personalm.paths.run_folder``), not in the first logger's (which
    for W&B or MLflow every run shares)."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        self.folder = run_folder(trainer)  # every process asks (a broadcast); the first one writes
        super().setup(trainer, pl_module, stage)

    def save_config(self, trainer, pl_module, stage: str) -> None:
        self.parser.save(self.config, str(self.folder / self.config_filename), skip_none=False,
                         overwrite=self.overwrite, multifile=self.multifile)


def _logs_in_run_folders(logger, root: Path) -> bool:
    """A logger's config (class path and arguments) names a TensorBoard or CSV logger that writes its versions
    into the run folders (``<root>/lightning_logs``): its version folder is the run's."""
    module, _, name = str(getattr(logger, "class_path", "")).rpartition(".")
    cls = getattr(importlib.import_module(module), name, None) if module else None
    if not (isinstance(cls, type) and issubclass(cls, (TensorBoardLogger, CSVLogger))):
        return False
    args = logger.init_args
    folder = Path(args.save_dir or root) / (args.name or "")
    return folder.resolve() == (root / RUNS).resolve()


def main(args=None) -> PersonalmCLI:
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    import personalm.training.dpo  # noqa: F401  (register the modules for short class names in configs)
    import personalm.training.reward  # noqa: F401
    import personalm.training.sft  # noqa: F401

    try:
        return PersonalmCLI(args=args)
    except SIGTERMException:  # Lightning's stop on SIGTERM is a SystemExit with status 0: a script (or the
        raise SystemExit(STOPPED_BY_SIGNAL) from None  # study) must not take a stopped run for a finished one


STOPPED_BY_SIGNAL = 143  # 128 + SIGTERM, as a shell reports a process SIGTERM ended
