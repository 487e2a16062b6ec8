"""How group-robust DPO's eta and decay were chosen: grids on the hard subset's validation split (never its test split).

    python benchmarks/minority_eta.py --root /tmp/minority-eta                    # seeds 42 and 43: ~30 min, 2 cores
    python benchmarks/minority_eta.py --root /tmp/minority-eta --eta-per step --etas 0.01 0.02 0.05 0.1 0.2 0.5 2 8
    # the shipped default (eta 8, decay 4 per epoch): four seeds, 2 points
    python benchmarks/minority_eta.py --root /tmp/minority-eta --seeds 42 43 44 45 --etas 2 --tolerance 2 \
        --summary summary-4seeds-decay0.md
    python benchmarks/minority_eta.py --root /tmp/minority-eta --seeds 42 43 44 45 --decay 4 --etas 4 8 16 \
        --tolerance 2 --summary summary-4seeds-decay4.md

Per seed: the demo's SFT recipe on ``embedded:compred-minority``, then from that export the demo's DPO recipe with
``group_robust: {eta, eta_per, decay}`` for each eta (0: plain DPO), twice: under the cap of 800 pairs drawn with
``cap_floor: 100`` (as shipped) and on every training pair; plain DPO under the uniform cap too, for reference. Each
DPO run is scored once at its end on every validation pair (180 per community, the true community in the prompt).
A finished run is skipped when the command is run again (an unfinished one starts again).

Prints, per eta and as the mean over seeds: under the cap, the small community's validation accuracy, macro and the
worst community; on every pair, each community's change against plain DPO on every pair. Then the largest eta whose
run on every pair lowers no community by more than ``--tolerance`` points (mean over seeds). The shipped default was
chosen across the two 4-seed summaries above: among the settings within 2 points, the one with the highest small
community under the cap (README.md, "Measured on the hard subset", says how that rule came about).
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

SMALL = "r/financialindependence"
DATA = ["--data.dataset=embedded:compred-minority", '--data.subset=["minority"]']
VALIDATE = ["--data.max_eval_pairs=null", "--trainer.val_check_interval=1.0", "--data.conditioning_variants=false"]
PREFIX = "val/rewards/accuracies/"


def fit(config: str, out: Path, seed: int, extra: list[str]) -> dict:
    """One fit into ``out`` (skipped when done); its final validation accuracies {community or macro/worst: %}."""
    from personalm.cli import main

    done = out / "validation.json"
    if not done.exists():
        cli = main(["fit", "--config", str(REPO / "configs/trainer/cpu.yaml"), "--config", str(REPO / config),
                    "--trainer.enable_progress_bar=false", *DATA, f"--data.seed={seed}", f"--seed_everything={seed}",
                    f"--trainer.default_root_dir={out}", *extra])
        metrics = {k[len(PREFIX):]: round(100 * float(v), 1) for k, v in cli.trainer.callback_metrics.items()
                   if k.startswith(PREFIX)}
        done.write_text(json.dumps(metrics))
    return json.loads(done.read_text())


def gr(eta: float, per: str, decay: float) -> list[str]:
    return [] if eta == 0 else [
        f'--model.init_args.group_robust={{"eta": {eta}, "eta_per": "{per}", "decay": {decay}}}']


def run_seed(root: Path, seed: int, etas: list[float], per: str, decay: float) -> dict:
    from personalm.paths import runs

    fit("configs/demo/sft.yaml", root / f"sft-seed{seed}", seed, [])
    sft = f"--model.init_args.model_name_or_path={runs(root / f'sft-seed{seed}')[-1] / 'hf_model'}"
    dpo = lambda name, extra: fit("configs/demo/dpo.yaml", root / f"dpo-{name}-seed{seed}", seed,  # noqa: E731
                                  [sft, *VALIDATE, *extra])
    out = {"uniform cap": dpo("uniform-cap", [])}
    for eta in etas:
        name = f"eta{eta:g}" + ("" if eta == 0 else f"-per-{per}" + (f"-decay{decay:g}" if decay else ""))
        out[("cap", eta)] = dpo(f"cap-{name}", ["--data.cap_floor=100", *gr(eta, per, decay)])
        out[("every", eta)] = dpo(f"every-{name}", ["--data.max_train_pairs=null", *gr(eta, per, decay)])
    return out


def summarize(results: dict[int, dict], etas: list[float], tolerance: float) -> str:
    seeds = sorted(results)
    mean = lambda key, k: sum(results[s][key][k] for s in seeds) / len(seeds)  # noqa: E731
    communities = sorted(k for k in results[seeds[0]]["uniform cap"] if k.startswith("r_"))
    plain = ("every", 0.0)

    def change(eta: float, c: str) -> float:  # on every pair, against plain DPO there, mean over seeds
        return sum(results[s][("every", eta)][c] - results[s][plain][c] for s in seeds) / len(seeds)
    small = "r_" + SMALL[2:]
    lines = [f"Validation accuracy (%), mean over seeds {seeds}; plain DPO under the uniform cap: {SMALL} "
             f"{mean('uniform cap', small):.1f}, macro {mean('uniform cap', 'macro'):.1f}, worst "
             f"{mean('uniform cap', 'worst'):.1f}.", "",
             "| eta | cap 800, floor 100: small / macro / worst | every pair minus plain DPO on every pair: "
             + ", ".join(communities) + "; macro |", "|---|---|---|"]
    for eta in etas:
        cap = " / ".join(f"{mean(('cap', eta), k):.1f}" for k in (small, "macro", "worst"))
        if eta == 0:
            every = "plain DPO: " + ", ".join(f"{mean(plain, c):.1f}" for c in communities) + \
                    f"; {mean(plain, 'macro'):.1f}"
        else:
            every = ", ".join(f"{change(eta, c):+.1f}" for c in communities) + f"; {change(eta, 'macro'):+.1f}"
        lines.append(f"| {eta:g} | {cap} | {every} |")
    harmless = [eta for eta in etas if eta > 0 and min(change(eta, c) for c in communities) >= -tolerance]
    lines += ["", f"Largest eta lowering no community by more than {tolerance:g} points on every pair: "
              + (f"{max(harmless):g}" if harmless else "none")]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 43])
    parser.add_argument("--etas", type=float, nargs="+", default=[1.0, 2.0, 5.0, 10.0])
    parser.add_argument("--eta-per", choices=["epoch", "step"], default="epoch")
    parser.add_argument("--decay", type=float, default=0.0, help="group_robust.decay of every run with eta > 0")
    parser.add_argument("--tolerance", type=float, default=3.0, help="points a community may lose on every pair")
    parser.add_argument("--summary", help="the summary's file name in --root (default: from --eta-per and --decay)")
    args = parser.parse_args()
    etas = sorted(set([0.0, *args.etas]))
    results = {seed: run_seed(Path(args.root), seed, etas, args.eta_per, args.decay) for seed in args.seeds}
    decay = f"decay {args.decay:g}" if args.decay else "no decay"
    text = f"eta per {args.eta_per}, {decay}. " + summarize(results, etas, args.tolerance)
    name = args.summary or f"summary-per-{args.eta_per}" + (f"-decay{args.decay:g}" if args.decay else "") + ".md"
    (Path(args.root) / name).write_text(text + "\n")
    print(text, flush=True)


if __name__ == "__main__":
    main()
