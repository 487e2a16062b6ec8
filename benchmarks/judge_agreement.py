"""How often does the study's reward judge agree with the truth? On the synthetic data each community's taste is
known (``personalm.evaluation.synthetic_judge``), so the reward judge's verdicts can be checked post by post.

    python benchmarks/judge_agreement.py --root /tmp/minority --seeds 0 1 2 3 4

For each seed's study (``<root>/seed<k>``, as ``benchmarks/minority_study.py`` writes them): every DPO run's
generations (``predict_<run>``, the model with context and each variant) against the model without context's, as the
study compares them, judged by that study's reward model (as the study's reward judge: ``judge_max_length`` of the
study config, the reward recipe's compute dtype) and by the synthetic judge. Printed per seed and run: the posts
compared, how often the two verdicts are the same (of all posts, and of the posts the truth decides: not a tie, i.e.
two responses of different styles or one of no style; a failed reward verdict counts as different), and each judge's
win rate. Then, over all seeds, the same per run. Nothing is trained.
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


def compare(items: list, judge, truth) -> dict:
    """Verdicts of ``judge`` and of ``truth`` on the same items: counts of agreement and both win rates."""
    from personalm.evaluation.judge import outcomes, run_judge

    said, true = run_judge(items, judge), run_judge(items, truth)  # the truth never fails
    decided = [(s, t) for s, t in zip(said, true) if t != "tie"]
    scored = outcomes(said)  # a failed reward verdict (a post too long to score) is left out of its win rate
    return {"posts": len(items), "agree": sum(s == t for s, t in zip(said, true)),
            "decided": len(decided), "agree_decided": sum(s == t for s, t in decided),
            "win_judge": float(scored.mean()) if scored.size else float("nan"),
            "win_truth": float(outcomes(true).mean())}


def runs(study_root: Path) -> dict[str, list]:
    """Each run's items against the model without context: run name -> the aligned comparisons."""
    from personalm.evaluation import judge as judging

    if not (study_root / "predict_no_context" / "done.json").is_file():
        raise FileNotFoundError(f"{study_root}: predict_no_context has not finished")
    base = study_root / "predict_no_context" / "predictions.jsonl"
    out = {}
    for folder in sorted(study_root.glob("predict_*")):
        name = folder.name[len("predict_"):]
        if name in ("no_context", "random") or ".stale-" in name or not (folder / "done.json").is_file():
            continue
        path = folder / "predictions.jsonl"
        out[name] = judging.align(judging.read_predictions(path), judging.read_predictions(base), path, base)[0]
    return out


def table(rows: list[tuple[str, str, dict]]) -> str:
    lines = ["| seed | run | posts | same verdict | same where the truth decides | win rate: reward judge | "
             "win rate: truth |", "|---|---|---:|---:|---:|---:|---:|"]
    for seed, run, r in rows:
        decided = f"{r['agree_decided']}/{r['decided']} ({100 * r['agree_decided'] / r['decided']:.0f}%)" \
            if r["decided"] else "0/0"
        lines.append(f"| {seed} | {run} | {r['posts']} | {r['agree']}/{r['posts']} "
                     f"({100 * r['agree'] / r['posts']:.0f}%) | {decided} | {r['win_judge']:.3f} | "
                     f"{r['win_truth']:.3f} |")
    return "\n".join(lines)


def pooled(rows: list[tuple[str, str, dict]]) -> list[tuple[str, str, dict]]:
    """Per run over seeds: counts added, win rates averaged over seeds."""
    by: dict[str, list[dict]] = {}
    for _, run, r in rows:
        by.setdefault(run, []).append(r)
    out = []
    for run, rs in by.items():
        total = {k: sum(r[k] for r in rs) for k in ("posts", "agree", "decided", "agree_decided")}
        total.update({k: sum(r[k] for r in rs) / len(rs) for k in ("win_judge", "win_truth")})
        out.append((f"{len(rs)} seeds", run, total))
    return out


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--config", default=str(REPO / "configs" / "study" / "minority.yaml"))
    args = parser.parse_args(argv)

    from personalm import study
    from personalm.evaluation.reward_judge import RewardJudge
    from personalm.evaluation.synthetic_judge import SyntheticJudge
    from personalm.study.steps import Steps

    settings = study.parse(["--config", args.config])
    dtype = Steps(settings).reward_dtype()
    truth = SyntheticJudge(settings.subsets)
    rows = []
    for seed in args.seeds:
        root = Path(args.root) / f"seed{seed}"
        model = root / "reward" / json.loads((root / "reward" / "done.json").read_text())["outputs"]["model"]
        judge = RewardJudge(str(model), max_length=settings.judge_max_length, dtype=dtype)
        rows += [(str(seed), run, compare(items, judge, truth)) for run, items in runs(root).items()]
    out = table(rows) + "\n\nOver the seeds (counts added, win rates averaged):\n\n" + table(pooled(rows))
    print("\n[judge_agreement]\n" + out, flush=True)
    return out


if __name__ == "__main__":
    main()
