"""The study's report as data (``personalm.study.report``): per-community accuracy with its pairs and a 95% interval."""

import pytest

from personalm.evaluation.metrics import wilson_interval
from personalm.study import report


def test_wilson_interval_hand_computed():
    """z = 1.96, z^2 = 3.8416. p = 0.5, n = 100: center (0.5 + 0.019208) / 1.038416 = 0.5, half-width
    1.96 * sqrt(0.0025 + 0.00009604) / 1.038416 = 0.096170. p = 1, n = 10: center 1.19208 / 1.38416 = 0.861230,
    half-width 1.96 * sqrt(3.8416 / 400) / 1.38416 = 0.19208 / 1.38416 = 0.138770: [0.722460, 1] (not empty at
    100%); p = 0 mirrors it: [0, 0.277540]."""
    assert wilson_interval(0.5, 100) == pytest.approx((0.403830, 0.596170), abs=1e-6)
    assert wilson_interval(1.0, 10) == pytest.approx((0.722460, 1.0), abs=1e-6)
    assert wilson_interval(0.0, 10) == pytest.approx((0.0, 0.277540), abs=1e-6)
    low, high = wilson_interval(0.8, 400)
    assert high - low < wilson_interval(0.8, 100)[1] - wilson_interval(0.8, 100)[0]  # more pairs, narrower


def metrics(acc: dict, pairs: dict) -> dict:
    out = {f"rewards/accuracies/r_{c}": a for c, a in acc.items()}
    out.update({f"pairs/r_{c}": n for c, n in pairs.items()})
    total = sum(pairs.values())
    out.update({"rewards/accuracies": sum(acc[c] * pairs[c] for c in acc) / total, "pairs": total,
                "rewards/accuracies/macro": sum(acc.values()) / len(acc),
                "rewards/accuracies/worst": min(acc.values())})
    return out


def test_accuracy_rows_carry_pairs_and_intervals():
    """A community with 10 pairs at 100% and one with 100 at 50%: each row has its n and its Wilson interval; "all
    pairs" is over the 110; macro and worst are over communities, so they have neither."""
    dpo = metrics({"a": 1.0, "b": 0.5}, {"a": 10, "b": 100})
    reward = metrics({"a": 0.5, "b": 0.75}, {"a": 20, "b": 40})
    tests = {"context": {"conditioning": {"true": dpo, "none": dpo, "random": dpo}},
             "no_context": {"conditioning": {"true": dpo}}, "reward": {"conditioning": {"true": reward}}}
    rows = {r.label: r for r in report.accuracy_rows(tests)}
    assert list(rows) == ["r/a", "r/b", "all pairs", "macro", "worst"]
    assert rows["r/a"].pairs == [10, 10, 10, 10, 20] and rows["r/b"].pairs[-1] == 40
    assert rows["r/a"].ci95[0] == pytest.approx([0.722460, 1.0], abs=1e-6)
    assert rows["r/b"].ci95[0] == pytest.approx([0.403830, 0.596170], abs=1e-6)
    assert rows["all pairs"].pairs[0] == 110 and rows["all pairs"].ci95[0] == pytest.approx(
        list(wilson_interval(60 / 110, 110)))
    assert rows["macro"].pairs == [None] * 5 and rows["macro"].ci95 == [None] * 5
    table = report.accuracy_markdown(list(rows.values())).splitlines()
    assert table[0].startswith("| community | pairs | DPO with context |")
    assert table[0].endswith("| reward pairs | reward model |")
    assert table[2] == ("| r/a | 10 | 100.0 (72.2-100.0) | 100.0 (72.2-100.0) | 100.0 (72.2-100.0) "
                        "| 100.0 (72.2-100.0) | 20 | 50.0 (29.9-70.1) |")
    assert table[5].startswith("| macro |  | 75.0 |")
