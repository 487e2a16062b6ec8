"""The whole ComPO study in one command: SFT and DPO with and without context, evaluation, judging, report.

    python -m personalm.study --config configs/study/demo.yaml      (embedded default, CPU, minutes)
    python -m personalm.study --config configs/study/paper.yaml     (real ComPreD and Llama-2-7B, GPUs)

Stages (each an ordinary ``python -m personalm ...`` run, in ``<root>/<stage>/``; resumable, see ``runner``):

    sft_context, sft_no_context           SFT with r/<community> in the prompt / with "Reddit"
    dpo_context, dpo_no_context           DPO from each SFT export, same conditioning
    test_dpo_context, test_dpo_no_context per-community preference accuracy on test_pref
    reward, test_reward                   Bradley-Terry reward model (with context) and its accuracy
    predict_context, predict_no_context,  one generation per test post: context model with the true
    predict_random                        community, no-context model, context model with a wrong one
    judge_context_vs_no_context,          win rates per community with bootstrap CIs
    judge_context_vs_random
    report                                report.md, report.json and win_rates.png in <root>/report
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from personalm.paths import is_embedded
from personalm.study import report as reporting
from personalm.study.runner import Stage, output, run_all
from personalm.study.settings import StudySettings
from personalm.study.steps import Steps
from personalm.training.group_robust import RECORD as GROUP_ROBUST_RECORD

# the stages' names, used to wire them and to find their outputs
SFT, DPO = {"context": "sft_context", "no_context": "sft_no_context"}, {"context": "dpo_context",
                                                                          "no_context": "dpo_no_context"}
TESTS = {"context": "test_dpo_context", "no_context": "test_dpo_no_context", "reward": "test_reward"}
REWARD, REPORT = "reward", "report"
REPORT_FORMAT = 2  # what report.json holds: a report written by another version is written again
COMPARISONS = {"judge_context_vs_no_context": ("predict_context", "predict_no_context", "context", "no context"),
               "judge_context_vs_random": ("predict_context", "predict_random", "context", "random community")}


JUDGE_NOTES = {"reward": "a reward model trained with the community in its input (Bradley-Terry), scoring both "
                         "responses in the prompt of the true community",
               "synthetic": "the synthetic data's own tastes (personalm.evaluation.synthetic_judge): the comment "
                            "style each response opens with, ranked as the true community ranks it in the data; a "
                            "response of no style below every style"}


def variant_stages(name: str) -> dict[str, str]:
    """The stages of a DPO variant: its fit, test, predictions and judging against the model without context."""
    return {"dpo": f"dpo_{name}", "test": f"test_dpo_{name}", "predict": f"predict_{name}",
            "judge": f"judge_{name}_vs_no_context"}


def stages(s: StudySettings) -> list[Stage]:
    st = Steps(s)
    judges = [st.judge(name, a, b, name_a, name_b, REWARD) for name, (a, b, name_a, name_b) in COMPARISONS.items()]
    variants = []
    taken = {*SFT.values(), *DPO.values(), *TESTS.values(), REWARD, REPORT, *COMPARISONS,
             *(stage for a, b, _, _ in COMPARISONS.values() for stage in (a, b))}
    for name, args in s.dpo_variants.items():
        v = variant_stages(name)
        if not name.isidentifier() or taken & set(v.values()):
            raise ValueError(f"dpo_variants: {name!r} must be a name of letters, digits and _ whose stages "
                             f"({', '.join(v.values())}) are not the study's own")
        taken |= set(v.values())
        variants += [st.fit(v["dpo"], "dpo", context=True, start=SFT["context"], variant=args),
                     st.test(v["test"], "dpo", v["dpo"], context=True),
                     st.predict(v["predict"], v["dpo"], "true"),
                     st.judge(v["judge"], v["predict"], "predict_no_context", name, "no context", REWARD)]
    report_needs = [*TESTS.values(), *COMPARISONS, *(v for n in s.dpo_variants for k, v in variant_stages(n).items()
                                                      if k != "predict")]
    return [
        st.fit(SFT["context"], "sft", context=True),
        st.fit(SFT["no_context"], "sft", context=False),
        st.fit(DPO["context"], "dpo", context=True, start=SFT["context"]),
        st.fit(DPO["no_context"], "dpo", context=False, start=SFT["no_context"]),
        st.test(TESTS["context"], "dpo", DPO["context"], context=True),
        st.test(TESTS["no_context"], "dpo", DPO["no_context"], context=False),
        st.fit(REWARD, "reward", context=True, start=SFT["context"]),
        st.test(TESTS["reward"], "reward", REWARD, context=True),
        st.predict("predict_context", DPO["context"], "true"),
        st.predict("predict_no_context", DPO["no_context"], "none"),
        st.predict("predict_random", DPO["context"], "random"),
        *judges,
        *variants,
        Stage(REPORT, report_needs, lambda folder, needs, resume=False: write_report(folder, needs, s),
              {"format": REPORT_FORMAT}),
    ]


def write_report(folder: Path, needs: dict, s: StudySettings) -> dict:
    load = lambda name, key: json.loads(Path(output(needs[name], key)).read_text())  # noqa: E731
    data_note = ("synthetic demo data and a tiny model: these figures show the pipeline works, they are NOT "
                 "results about Reddit" if is_embedded(s.dataset) else f"dataset {s.dataset}")
    judge_note = JUDGE_NOTES[s.judge] if s.judge != "llm" else f"LLM judge {s.llm.model if s.llm else ''} (" + (
        "each item in both orders: a win only where both agree, else a tie" if s.llm and s.llm.orders == "both"
        else "each item in one order, drawn per item") + ")"
    variants = [reporting.variant("context", load(TESTS["context"], "metrics"), None,
                                  load("judge_context_vs_no_context", "result"))]
    for name in s.dpo_variants:
        v = variant_stages(name)
        record = Path(output(needs[v["dpo"]], "model")) / GROUP_ROBUST_RECORD
        alpha = json.loads(record.read_text())["alpha"] if record.is_file() else None
        variants.append(reporting.variant(name, load(v["test"], "metrics"), alpha, load(v["judge"], "result")))
    report = reporting.StudyReport(
        subsets=s.subsets, base_model=s.base_model, data_note=data_note, judge_note=judge_note, n_boot=s.n_boot,
        seed=s.seed, accuracy=reporting.accuracy_rows({k: load(name, "metrics") for k, name in TESTS.items()}),
        comparisons=[load(name, "result") for name in COMPARISONS], variants=variants if s.dpo_variants else [])
    return reporting.write(folder, report)


def summary(root: Path, done: dict, seconds: float) -> str:
    """What the study prints at the end: the accuracy table, the win rates, and where everything is."""
    report = reporting.StudyReport.load(root / REPORT / done[REPORT]["outputs"]["data"])
    md = root / REPORT / done[REPORT]["outputs"]["report"]
    lines = [f"\n[study] finished in {seconds:.0f} s. Report: {md}\n", reporting.accuracy_markdown(report.accuracy)]
    lines += ["\n" + reporting.win_rate_line(c) for c in report.comparisons]
    if report.variants:
        lines += ["\nDPO variants, side by side:\n", reporting.variants_markdown(report.variants)]
    lines.append(f"""
  TensorBoard logs : tensorboard --logdir {root}
  stages           : {root}/<stage>/ (checkpoints and hf_model under lightning_logs/version_0, whatever the logger)
  DPO model        : {root / DPO['context'] / done[DPO['context']]['outputs']['model']}
  predictions      : {root}/predict_{{context,no_context,random}}/predictions.jsonl (one line per test post)
  report, chart    : {md}, {root / REPORT / done[REPORT]['outputs']['chart']}
""")
    return "\n".join(lines)


def parse(argv=None) -> StudySettings:
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(prog="python -m personalm.study", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_class_arguments(StudySettings, fail_untyped=True)
    cfg = parser.parse_args(argv)
    cfg = parser.instantiate(cfg) if hasattr(parser, "instantiate") else parser.instantiate_classes(cfg)
    return StudySettings(**{name: cfg[name] for name in StudySettings.__dataclass_fields__})


def main(argv=None) -> dict:
    s = parse(argv)
    if s.predict_backend == "vllm":  # before any stage runs, not at the first prediction an hour later
        from personalm.training.vllm_generation import VLLMUnavailable, require_vllm

        try:
            require_vllm()
        except VLLMUnavailable as err:
            raise SystemExit(f"[study] predict_backend vllm: {err}") from None
    if s.judge == "synthetic":  # before any stage runs: only the synthetic data has known tastes
        from personalm.evaluation.synthetic_judge import SyntheticJudge

        if not (is_embedded(s.dataset) or Path(s.dataset).is_dir()):
            raise SystemExit(f"[study] judge synthetic: dataset {s.dataset} is neither embedded synthetic data nor a "
                             f"folder it was written to; its tastes are not known")
        try:
            SyntheticJudge(s.subsets)
        except ValueError as err:
            raise SystemExit(f"[study] judge synthetic: {err}") from None
    if is_embedded(s.dataset) and is_embedded(s.base_model):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing to download: never wait on the network
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import datasets

    datasets.disable_progress_bars()
    root = Path(s.root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    done = run_all(root, stages(s))
    print(summary(root, done, time.perf_counter() - start), flush=True)
    return {name: {**d, "folder": str(root / name)} for name, d in done.items()}
