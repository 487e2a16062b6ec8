"""The study's report as data (``StudyReport``): the per-community accuracy table and the judged win rates.

``report.md``, ``report.json`` and the closing summary printed by the study are all rendered from the same
``StudyReport``; nothing is parsed back out of Markdown.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from personalm.data.prompt import subreddit
from personalm.evaluation import judge as judging
from personalm.evaluation.metrics import wilson_interval
from personalm.paths import write_text

# the accuracy table's columns: (header, which test, conditioning variant)
COLUMNS = [("DPO with context", "context", "true"), ("same, no community", "context", "none"),
           ("same, random community", "context", "random"), ("DPO without context", "no_context", "true"),
           ("reward model", "reward", "true")]


@dataclass
class AccuracyRow:
    label: str  # r/<community>, "all pairs", "macro" or "worst"
    values: list  # one accuracy (0-1) or None per column of COLUMNS
    pairs: list  # the pairs each value is over (None for macro and worst, which are over communities)
    ci95: list  # [low, high] per column (Wilson score interval over those pairs), or None


@dataclass
class StudyReport:
    subsets: list
    base_model: str
    data_note: str
    judge_note: str
    n_boot: int
    seed: int
    accuracy: list  # of AccuracyRow
    comparisons: list  # judge results (personalm.evaluation.judge.compare), context vs each baseline
    variants: list = field(default_factory=list)  # of Variant: plain DPO with context, then each dpo_variant

    @staticmethod
    def load(path: Path) -> "StudyReport":
        data = json.loads(Path(path).read_text())
        data["accuracy"] = [AccuracyRow(**row) for row in data["accuracy"]]
        data["variants"] = [Variant(**v) for v in data.get("variants", [])]
        return StudyReport(**data)


@dataclass
class Variant:
    """One DPO run with context, for the side-by-side table: per community [accuracy, pairs, low, high] (and
    macro, worst), its weights alpha at the end (group-robust runs) and its win rates against the model without
    context, per community [rate, low, high, posts]."""

    name: str
    accuracy: dict
    alpha: Optional[dict]
    win_rates: dict


def variant(name: str, metrics: dict, alpha: Optional[dict], judged: dict) -> Variant:
    true = metrics["conditioning"]["true"]
    names = sorted(k.split("/r_", 1)[1] for k in true if k.startswith("rewards/accuracies/r_"))
    accuracy = {}
    for label, key, count in [*((subreddit(n), f"rewards/accuracies/r_{n}", f"pairs/r_{n}") for n in names),
                              ("all pairs", "rewards/accuracies", "pairs")]:
        value, n = true[key], true.get(count)
        accuracy[label] = [value, n, *(wilson_interval(value, n) if n else (None, None))]
    accuracy["macro"] = [true["rewards/accuracies/macro"], None, None, None]
    accuracy["worst"] = [true["rewards/accuracies/worst"], None, None, None]
    rates = {c: [r["win_rate"], *r["ci95"], r["n"]] for c, r in judged["communities"].items()}
    rates["all"] = [judged["overall"]["win_rate"], *judged["overall"]["ci95"], judged["overall"]["n"]]
    return Variant(name, accuracy, alpha, rates)


def variants_markdown(variants: list) -> str:
    """Per community: each run's test accuracy (%, 95% interval), then alpha at the end, then the win rates
    against the model without context."""
    names = [v.name for v in variants]
    rows = list(variants[0].accuracy)
    lines = ["| community | pairs | " + " | ".join(names) + " |", "|---|---:" + "|---" * len(names) + "|"]
    for row in rows:
        n = variants[0].accuracy[row][1]
        cells = [_cell(v.accuracy[row][0], v.accuracy[row][2:] if v.accuracy[row][2] is not None else None)
                 for v in variants]
        lines.append(f"| {row} | {'' if n is None else n} | " + " | ".join(cells) + " |")
    weighted = [v for v in variants if v.alpha]
    if weighted:
        lines += ["", "Weights alpha at the end of training:", "",
                  "| community | " + " | ".join(v.name for v in weighted) + " |", "|---" * (len(weighted) + 1) + "|"]
        for community in weighted[0].alpha:
            lines.append(f"| {subreddit(community)} | " + " | ".join(f"{v.alpha.get(community, float('nan')):.3f}"
                                                             for v in weighted) + " |")
    lines += ["", "Win rates against the model without context (95% bootstrap interval):", "",
              "| community | posts | " + " | ".join(names) + " |", "|---|---:" + "|---" * len(names) + "|"]
    for community in variants[0].win_rates:
        rate = lambda r: "n/a" if r[0] is None else f"{r[0]:.3f} [{r[1]:.3f}, {r[2]:.3f}]"  # noqa: E731
        lines.append(f"| {community} | {variants[0].win_rates[community][3]} | "
                     + " | ".join(rate(v.win_rates[community]) for v in variants) + " |")
    return "\n".join(lines)


def accuracy_rows(tests: dict) -> list[AccuracyRow]:
    """Rows per community, then all pairs, macro and worst, from the ``test_metrics.json`` of each test
    (``tests``: context, no_context, reward): each accuracy with its number of pairs and its 95% interval."""
    true = tests["context"]["conditioning"]["true"]
    names = sorted(k.split("/r_", 1)[1] for k in true if k.startswith("rewards/accuracies/r_"))
    keys = [*((subreddit(n), f"rewards/accuracies/r_{n}", f"pairs/r_{n}") for n in names),
            ("all pairs", "rewards/accuracies", "pairs"), ("macro", "rewards/accuracies/macro", None),
            ("worst", "rewards/accuracies/worst", None)]
    rows = []
    for label, key, count in keys:
        figures = [tests[test]["conditioning"].get(variant, {}) for _, test, variant in COLUMNS]
        values = [f.get(key) for f in figures]
        pairs = [f.get(count) if count else None for f in figures]
        ci = [list(wilson_interval(v, n)) if v is not None and n else None for v, n in zip(values, pairs)]
        rows.append(AccuracyRow(label, values, pairs, ci))
    return rows


def _pct(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}"


def _cell(value: Optional[float], ci: Optional[list]) -> str:
    return _pct(value) + (f" ({_pct(ci[0])}-{_pct(ci[1])})" if ci else "")


def accuracy_markdown(rows: list[AccuracyRow]) -> str:
    """The accuracy table: percent with its 95% interval, and the pairs of the DPO tests and of the reward model's."""
    reward = len(COLUMNS) - 1
    lines = ["| community | pairs | " + " | ".join(h for h, _, _ in COLUMNS[:reward]) + " | reward pairs | "
             + COLUMNS[reward][0] + " |", "|---|---:" + "|---" * reward + "|---:|---|"]
    for r in rows:
        n = lambda i: "" if r.pairs[i] is None else str(r.pairs[i])  # noqa: E731
        cells = [_cell(v, ci) for v, ci in zip(r.values, r.ci95)]
        lines.append(f"| {r.label} | {n(0)} | " + " | ".join(cells[:reward]) + f" | {n(reward)} | {cells[reward]} |")
    return "\n".join(lines)


def win_rate_line(result: dict) -> str:
    """One line for the closing summary; rate and CI are None when every verdict failed (an LLM judge)."""
    overall = result["overall"]
    rate = "n/a" if overall["win_rate"] is None else f"{overall['win_rate']:.3f}"
    ci = "n/a" if overall["ci95"][0] is None else "{:.3f}-{:.3f}".format(*overall["ci95"])
    stats = (result.get("judge") or {}).get("stats") or {}
    both = ", each in both orders" if stats.get("orders") == "both" else ""
    counts = style_counts(result)
    odd = f", {counts}" if counts else ""
    return (f"Win rate, {result['a']} vs {result['b']}: {rate} (95% CI {ci}, {overall['n']} posts{both}, "
            f"{overall['failed']} failed verdicts{odd}); per community in the report")


def style_counts(result: dict) -> str:
    """How many responses of each side the synthetic judge found in none of the data's styles, and how many opened a
    style without completing one of its templates ("" for the other judges)."""
    stats = (result.get("judge") or {}).get("stats") or {}
    if "no_style" not in stats:
        return ""
    a, b = result["a"], result["b"]
    return (f"responses of no style: {stats['no_style']['a']} of {a}'s, {stats['no_style']['b']} of {b}'s; "
            f"opening a style but not one of its comments in full: {stats['incomplete']['a']} of {a}'s, "
            f"{stats['incomplete']['b']} of {b}'s")


def _section(result: dict) -> str:
    """One comparison's table in the report, with the synthetic judge's counts under it."""
    counts = style_counts(result)
    return (f"### {result['a'].capitalize()} vs {result['b']}\n\n{judging.format_table(result)}"
            + (f"\n\nThe judge found {counts}." if counts else ""))


def markdown(report: StudyReport) -> str:
    sections = "\n\n".join(_section(c) for c in report.comparisons)
    return f"""# personalm study report

Subsets: {', '.join(report.subsets)}; base model: `{report.base_model}`; {report.data_note}.

## Preference accuracy on test_pref (%)

Share of test pairs where the model's implicit reward ranks the community's preferred comment first, with its
95% interval (Wilson score, over the pairs counted in `pairs`; the reward model's over `reward pairs`). The
context model is also scored with the community removed ("Reddit") and with a random wrong one.

{accuracy_markdown(report.accuracy)}

## Win rates of generations

Judge: {report.judge_note}. Win rate = (wins + ties / 2) / decided posts; 95% bootstrap intervals over posts
({report.n_boot} resamples, seed {report.seed}).

{sections}

![win rates](win_rates.png)
""" + (f"""
## DPO variants, side by side

Each run with context from the same SFT model; test preference accuracy (%, 95% Wilson interval) per community,
macro (the mean over communities) and worst, then (group-robust runs) the weights alpha at the end, then the win
rates of each run's generations against the model without context.

{variants_markdown(report.variants)}
""" if report.variants else "")


def write(folder: Path, report: StudyReport) -> dict:
    """``report.md``, ``report.json`` (the same data) and ``win_rates.png``; returns the stage's outputs."""
    judging.plot_win_rates(report.comparisons, folder / "win_rates.png",
                           title="Win rate of the context model, per community")
    write_text(folder / "report.json", json.dumps(asdict(report), indent=2))
    write_text(folder / "report.md", markdown(report))
    return {"report": "report.md", "data": "report.json", "chart": "win_rates.png"}
