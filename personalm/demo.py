"""The demo on the embedded default (tiny model, synthetic data), offline on a CPU in a few minutes.

    python -m personalm.demo [--root .]      (logs and outputs under <root>/lightning_logs)

SFT on the synthetic ComPreD-format data with the community in the prompt, then one generated response
per test post with the exported model. Every step is the ordinary CLI (``python -m personalm ...``) run
in this process, so the printed commands reproduce any step alone.
"""

from __future__ import annotations

import argparse
import os
import shlex
import time
from pathlib import Path

from personalm.predict_writer import JsonlPredictionWriter

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def run_cli(args: list[str]):
    """``python -m personalm <args>`` in this process; returns the LightningCLI object."""
    from personalm.cli import main

    print(f"\n$ python -m personalm {shlex.join(args)}", flush=True)
    return main(args)


def config(name: str) -> str:
    path = CONFIGS / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the demo from a clone of the personalm repository")
    return str(path)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default=".", help="logs and outputs go to <root>/lightning_logs/version_N")
    parser.add_argument("--progress", default=True, action=argparse.BooleanOptionalAction)
    opts = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import datasets

    datasets.disable_progress_bars()  # tiny splits: Lightning's bars show the progress that matters
    root = Path(opts.root).resolve()
    common = [f"--trainer.default_root_dir={root}", f"--trainer.enable_progress_bar={str(opts.progress).lower()}"]
    start = time.perf_counter()

    sft = run_cli(["fit", "--config", config("demo/sft.yaml"), *common])
    sft_dir = Path(sft.trainer.log_dir)
    export = sft.model.export_path
    pred = run_cli(["predict", "--config", config("demo/sft.yaml"), *common,
                    f"--model.init_args.model_name_or_path={export}"])
    predictions = next(c.path for c in pred.trainer.callbacks if isinstance(c, JsonlPredictionWriter))

    val = sft.trainer.callback_metrics.get("val/loss")
    summary = {
        "logs": str(sft_dir), "checkpoint": str(sft.trainer.checkpoint_callback.best_model_path or
                                               sft.trainer.checkpoint_callback.last_model_path),
        "model": export, "predictions": str(predictions),
        "final_val_loss": float(val) if val is not None else None,
        "seconds": round(time.perf_counter() - start, 1),
    }
    print(f"""
personalm demo finished in {summary['seconds']} s (synthetic data, tiny model: not real Reddit results)
  TensorBoard logs : {summary['logs']}
  checkpoint       : {summary['checkpoint']}
  exported model   : {summary['model']}   (Hugging Face format)
  predictions      : {summary['predictions']}   (one line per test post)
  final val/loss   : {summary['final_val_loss']:.4f}
Open TensorBoard:  tensorboard --logdir {root / 'lightning_logs'}
""", flush=True)
    return summary


if __name__ == "__main__":
    main()
