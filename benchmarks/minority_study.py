"""The hard subset's evidence: the study on ``embedded:compred-minority`` over several seeds, plain DPO with context
and each remedy side by side, summarized with 95% intervals.

    python benchmarks/minority_study.py --root /tmp/minority                 # 5 seeds, ~90 min on 2 CPU cores
    python benchmarks/minority_study.py --root /tmp/minority --seeds 0       # one seed
    python benchmarks/minority_study.py --root /tmp/minority --seeds 5 6 7 8 9 \
        --study-args='--dpo_variants={"every_pair": [...], "every_pair_shipped": [...]}'   # some runs only
    python benchmarks/minority_study.py --root /tmp/minority --seeds 0 1 2 3 4 5 6 7 8 9 --summary-only

Each seed is one run of ``python -m personalm.study --config configs/study/minority.yaml`` (its ``dpo_variants``:
each remedy alone, the shipped combination, and every training pair with and without it, with two controls) with
``--data.seed`` and ``--seed_everything`` set to the seed (the subsample, the cap's draw and the shuffle change; the
test pairs do not). A seed's finished stages are skipped when it is run again. The summary, per DPO run: the small
community's test accuracy, the macro and the worst, each as the mean over seeds with a 95% t interval over the seeds
and the pooled Wilson interval over all seeds' pairs, then each seed's figure; the change against plain DPO per
seed; the win rate against the model without context (the study's judge; the config's: the synthetic data's own
tastes), overall and on the small community; for each run given every pair (``every_pair_<remedy>``), its change
against plain DPO given every pair, per community. Over seeds whose studies ran different runs, the summary has the
runs every seed has.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from a checkout without installing personalm
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SMALL = "r/financialindependence"
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093, 20: 2.086,
        21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060, 26: 2.056, 27: 2.052, 28: 2.048, 29: 2.045}
# the t distribution's 97.5% quantile by degrees of freedom; from 30 on its expansion around the normal's 1.96


def t975(df: int) -> float:
    z = 1.959964
    return T975.get(df) or z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


def interval(values: list[float]) -> tuple[float, float, float]:
    """Mean and 95% t interval over seeds (the interval is the mean alone for one seed)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, mean, mean
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t975(n - 1) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def run_seed(config: str, root: Path, seed: int, extra: list[str]) -> dict:
    from personalm import study

    args = {"all": [f"--data.seed={seed}", f"--seed_everything={seed}"]}
    settings = study.parse(["--config", config])
    for kind, values in settings.args.items():  # the config's own per-step arguments stay, the seed's come first
        args[kind] = args.get(kind, []) + values
    study.main(["--config", config, f"--root={root / f'seed{seed}'}", "--progress=false",
                f"--args={json.dumps(args)}", *extra])
    return read_report(root, seed)


def read_report(root: Path, seed: int) -> dict:
    return json.loads((root / f"seed{seed}" / "report" / "report.json").read_text())


def summarize(reports: dict[int, dict]) -> str:
    from personalm.evaluation.metrics import wilson_interval

    seeds = sorted(reports)
    by = {s: {v["name"]: v for v in reports[s]["variants"]} for s in seeds}
    names = [n for n in by[seeds[0]] if all(n in by[s] for s in seeds)]  # the runs every seed has
    pct = lambda x: f"{100 * x:.1f}"  # noqa: E731
    lines = [f"Seeds {seeds}; {SMALL}: {by[seeds[0]]['context']['accuracy'][SMALL][1]} test pairs per seed.", "",
             f"| DPO run | {SMALL} | vs plain | macro | vs plain | worst | win rate vs no context | on {SMALL} |",
             "|---|---|---|---|---|---|---|---|"]
    for name in names:
        cells = []
        for key in (SMALL, "macro"):
            values = [by[s][name]["accuracy"][key][0] for s in seeds]
            mean, low, high = interval(values)
            cell = f"{pct(mean)} ({pct(low)} to {pct(high)})"
            if key == SMALL:
                n = sum(by[s][name]["accuracy"][key][1] for s in seeds)
                k = sum(by[s][name]["accuracy"][key][0] * by[s][name]["accuracy"][key][1] for s in seeds)
                pooled = wilson_interval(k / n, n)
                cell += f" [pooled {pct(pooled[0])} to {pct(pooled[1])}]"
            cells.append(cell + "; seeds " + ", ".join(pct(v) for v in values))
            diffs = [by[s][name]["accuracy"][key][0] - by[s]["context"]["accuracy"][key][0] for s in seeds]
            mean, low, high = interval(diffs)
            cells.append("" if name == "context" else f"{100 * mean:+.1f} ({100 * low:+.1f} to {100 * high:+.1f})")
        worst = interval([by[s][name]["accuracy"]["worst"][0] for s in seeds])
        rates = [interval([by[s][name]["win_rates"][key][0] for s in seeds]) for key in ("all", SMALL)]
        lines.append(f"| {name} | {cells[0]} | {cells[1]} | {cells[2]} | {cells[3]} | {pct(worst[0])} | "
                     + " | ".join(f"{r[0]:.3f} ({r[1]:.3f} to {r[2]:.3f})" for r in rates) + " |")
    lines += ["", "Per community, mean over seeds (%):", "",
              "| community | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for community in by[seeds[0]]["context"]["accuracy"]:
        means = [interval([by[s][n]["accuracy"][community][0] for s in seeds])[0] for n in names]
        lines.append(f"| {community} | " + " | ".join(pct(m) for m in means) + " |")
    for name in [n for n in names if n.startswith("every_pair_")]:  # a remedy given every pair, per community
        lines += ["", f"With every training pair, {name} minus every_pair per community (points; mean over seeds, "
                  "95% t interval, each seed):", "", "| community | change | seeds |", "|---|---|---|"]
        for community in by[seeds[0]]["context"]["accuracy"]:
            diffs = [by[s][name]["accuracy"][community][0] - by[s]["every_pair"]["accuracy"][community][0]
                     for s in seeds]
            mean, low, high = interval(diffs)
            lines.append(f"| {community} | {100 * mean:+.1f} ({100 * low:+.1f} to {100 * high:+.1f}) | "
                         + ", ".join(f"{100 * d:+.1f}" for d in diffs) + " |")
    return "\n".join(lines)


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--config", default=str(REPO / "configs" / "study" / "minority.yaml"))
    parser.add_argument("--study-args", nargs="*", default=[], help="more arguments for each study run")
    parser.add_argument("--summary-only", action="store_true", help="summarize the seeds' reports, run nothing")
    args = parser.parse_args(argv)
    root = Path(args.root)
    if args.summary_only:
        reports = {seed: read_report(root, seed) for seed in args.seeds}
    else:
        reports = {seed: run_seed(args.config, root, seed, args.study_args) for seed in args.seeds}
    table = summarize(reports)
    print("\n[minority_study]\n" + table, flush=True)
    (root / "summary.md").write_text(table + "\n")
    return table


if __name__ == "__main__":
    main()
