"""Why the hard subset keeps 2% label noise: does the demo's tiny model learn the small community at all, given
every training pair, as the share of flipped training labels grows?

    python benchmarks/minority_noise.py --root /tmp/minority-noise                        # 20%, 5%, 2%: ~12 min
    python benchmarks/minority_noise.py --root /tmp/minority-noise --noise 0.05 --sft-noise 0   # SFT on clean labels

For each noise level: ``embedded:compred-minority`` written with that share of training labels flipped (its own
cache folder), the demo's SFT recipe on it (or on the subset with ``--sft-noise`` flipped), then the demo's DPO
recipe from that SFT export on every training pair (no cap), then the test split (every pair, 360 per community).
Prints the test accuracy of each community, macro and worst. A run's finished steps are skipped when it is run
again.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from a checkout without installing personalm
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def register(noise: float) -> str:
    """An embedded dataset name for the hard subset with ``noise`` (as shipped but for the noise)."""
    from personalm.data import synthetic

    folder, written = synthetic.DATASETS["compred-minority"]
    name = f"compred-minority-noise{noise:g}"
    synthetic.DATASETS[name] = (f"{folder}-noise{noise:g}", {**written, "noise": noise})
    return f"embedded:{name}"


def run(subcommand: str, config: str, out: Path, dataset: str, seed: int, extra: list[str]) -> Path:
    """One CLI run into ``out`` (skipped when done); its run folder."""
    from personalm.cli import main
    from personalm.paths import runs

    if not (out / "done").exists():
        main([subcommand, "--config", str(REPO / "configs/trainer/cpu.yaml"), "--config", str(REPO / config),
              "--trainer.enable_progress_bar=false", f"--data.dataset={dataset}", '--data.subset=["minority"]',
              f"--data.seed={seed}", f"--seed_everything={seed}", f"--trainer.default_root_dir={out}", *extra])
        (out / "done").write_text("")
    return runs(out)[-1]


def measure(root: Path, noise: float, sft_noise: float, seed: int) -> dict:
    sft = run("fit", "configs/demo/sft.yaml", root / f"sft-noise{sft_noise:g}-seed{seed}", register(sft_noise), seed,
              [])
    name = f"noise{noise:g}-sft{sft_noise:g}-seed{seed}"
    data = register(noise)
    dpo = run("fit", "configs/demo/dpo.yaml", root / f"dpo-{name}", data, seed,
              [f"--model.init_args.model_name_or_path={sft / 'hf_model'}", "--data.max_train_pairs=null"])
    test = run("test", "configs/demo/dpo.yaml", root / f"test-{name}", data, seed,
               [f"--model.init_args.model_name_or_path={dpo / 'hf_model'}", "--data.max_eval_pairs=null"])
    metrics = json.loads((test / "test_metrics.json").read_text())["conditioning"]["true"]
    return {k.rsplit("/", 1)[-1]: 100 * v for k, v in metrics.items() if k.startswith("rewards/accuracies/")}


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", required=True)
    parser.add_argument("--noise", type=float, nargs="+", default=[0.2, 0.05, 0.02])
    parser.add_argument("--sft-noise", type=float, default=None, help="the SFT data's noise (default: the same)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rows = {n: measure(Path(args.root), n, n if args.sft_noise is None else args.sft_noise, args.seed)
            for n in args.noise}
    columns = list(next(iter(rows.values())))
    sft = "as DPO's" if args.sft_noise is None else f"{args.sft_noise:g}"
    lines = [f"Seed {args.seed}; SFT data noise: {sft}; DPO on every training pair; test accuracy (%):", "",
             "| DPO data noise | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    lines += [f"| {n:g} | " + " | ".join(f"{acc[c]:.1f}" for c in columns) + " |" for n, acc in rows.items()]
    table = "\n".join(lines)
    print("\n[minority_noise]\n" + table, flush=True)
    return table


if __name__ == "__main__":
    main()
