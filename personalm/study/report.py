"""The study's report as data (``StudyReport``): the per-community accuracy table and the judged win rates.

``report.md``, ``report.json`` and the closing summary printed by the study are all rendered from the same
``StudyReport``; nothing is parsed back out of Markdown.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from personalm.evaluation import judge as judging
from personalm.paths import write_text

# the accuracy table's columns: (header, which test, conditioning variant)
COLUMNS = [("DPO with context", "context", "true"), ("same, no community", "context", "none"),
           ("same, random community", "context", "random"), ("DPO without context", "no_context", "true"),
           ("reward model", "reward", "true")]


@dataclass
class AccuracyRow:
    label: str  # r/<community>, "all pairs", "macro" or "worst"
    values: list  # one accuracy (0-1) or None per column of COLUMNS


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

    @staticmethod
    def load(path: Path) -> "StudyReport":
        data = json.loads(Path(path).read_text())
        data["accuracy"] = [AccuracyRow(**row) for row in data["accuracy"]]
        return StudyReport(**data)


def accuracy_rows(tests: dict) -> list[AccuracyRow]:
    """Rows per community, then all pairs, macro and worst, from the ``test_metrics.json`` of each test
    (``tests``: context, no_context, reward)."""
    true = tests["context"]["conditioning"]["true"]
    names = sorted(k.split("/r_", 1)[1] for k in true if k.startswith("rewards/accuracies/r_"))
    keys = [*((f"r/{n}", f"rewards/accuracies/r_{n}") for n in names), ("all pairs", "rewards/accuracies"),
            ("macro", "rewards/accuracies/macro"), ("worst", "rewards/accuracies/worst")]
    return [AccuracyRow(label, [tests[test]["conditioning"].get(variant, {}).get(key) for _, test, variant in COLUMNS])
            for label, key in keys]


def _pct(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}"


def accuracy_markdown(rows: list[AccuracyRow]) -> str:
    lines = ["| community | " + " | ".join(h for h, _, _ in COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    lines += [f"| {r.label} | " + " | ".join(_pct(v) for v in r.values) + " |" for r in rows]
    return "\n".join(lines)


def win_rate_line(result: dict) -> str:
    """One line for the closing summary; rate and CI are None when every verdict failed (an LLM judge)."""
    overall = result["overall"]
    rate = "n/a" if overall["win_rate"] is None else f"{overall['win_rate']:.3f}"
    ci = "n/a" if overall["ci95"][0] is None else "{:.3f}-{:.3f}".format(*overall["ci95"])
    return (f"Win rate, {result['a']} vs {result['b']}: {rate} (95% CI {ci}, {overall['n']} posts, "
            f"{overall['failed']} failed verdicts); per community in the report")


def markdown(report: StudyReport) -> str:
    sections = "\n\n".join(f"### {c['a'].capitalize()} vs {c['b']}\n\n{judging.format_table(c)}"
                           for c in report.comparisons)
    return f"""# personalm study report

Subsets: {', '.join(report.subsets)}; base model: `{report.base_model}`; {report.data_note}.

## Preference accuracy on test_pref (%)

Share of test pairs where the model's implicit reward ranks the community's preferred comment first.
The context model is also scored with the community removed ("Reddit") and with a random wrong one.

{accuracy_markdown(report.accuracy)}

## Win rates of generations

Judge: {report.judge_note}. Win rate = (wins + ties / 2) / decided posts; 95% bootstrap intervals over posts
({report.n_boot} resamples, seed {report.seed}).

{sections}

![win rates](win_rates.png)
"""


def write(folder: Path, report: StudyReport) -> dict:
    """``report.md``, ``report.json`` (the same data) and ``win_rates.png``; returns the stage's outputs."""
    judging.plot_win_rates(report.comparisons, folder / "win_rates.png",
                           title="Win rate of the context model, per community")
    write_text(folder / "report.json", json.dumps(asdict(report), indent=2))
    write_text(folder / "report.md", markdown(report))
    return {"report": "report.md", "data": "report.json", "chart": "win_rates.png"}
