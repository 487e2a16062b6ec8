"""The LightningCLI of personalm: ``python -m personalm fit|validate|test|predict --config ...``."""

from __future__ import annotations

from lightning.pytorch.cli import LightningCLI

from personalm.datamodule import ComPreDDataModule
from personalm.lm_module import CausalLMModule
from personalm.predict_writer import JsonlPredictionWriter


class PersonalmCLI(LightningCLI):
    """Subclass mode for the model (a config picks SFTModule, DPOModule, ...); one DataModule."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("model_class", CausalLMModule)
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("datamodule_class", ComPreDDataModule)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("auto_configure_optimizers", False)  # modules own optimizer + schedule
        super().__init__(*args, **kwargs)

    def before_fit(self) -> None:
        """Refuse precision settings that cannot train before the data are prepared (minutes on real data)."""
        check = getattr(self.model, "check_training_precision", None)
        if check is not None:
            check(str(self.trainer.precision))

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.init_args.model_name_or_path", "data.tokenizer")
        parser.add_lightning_class_args(JsonlPredictionWriter, "predictions")
        if "return_predictions" in parser.get_defaults():  # the writer holds them; don't keep all in RAM
            parser.set_defaults({"return_predictions": False})


def main(args=None) -> PersonalmCLI:
    import personalm.dpo  # noqa: F401  (register the modules for short class names in configs)
    import personalm.reward  # noqa: F401
    import personalm.sft  # noqa: F401

    return PersonalmCLI(args=args)
