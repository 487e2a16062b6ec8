"""The whole ComPO study in one command: SFT and DPO with and without context, evaluation, judging, report.

    python -m personalm.study --config configs/study/demo.yaml      (embedded default, CPU, minutes)
    python -m personalm.study --config configs/study/paper.yaml     (real ComPreD and Llama-2-7B, GPUs)

Stages (each an ordinary ``python -m personalm ...`` run, in this process, in ``<root>/<stage>/``):

    sft_context, sft_no_context           SFT with r/<community> in the prompt / with "Reddit"
    dpo_context, dpo_no_context           DPO from each SFT export, same conditioning
    test_dpo_context, test_dpo_no_context per-community preference accuracy on test_pref
    reward, test_reward                   Bradley-Terry reward model (with context) and its accuracy
    predict_context, predict_no_context,  one generation per test post: context model with the true
    predict_random                        community, no-context model, context model with a wrong one
    judge_context_vs_no_context,          win rates per community with bootstrap CIs
    judge_context_vs_random
    report                                report.md + win_rates.png in <root>

A stage is done when ``<root>/<stage>/done.json`` exists, lists outputs that exist, and names the same
runs of the stages it depends on. Done stages are skipped, so an interrupted study resumes. A stage
folder without ``done.json`` (a failed or interrupted run) is deleted and redone, never trusted. A done
stage whose inputs were redone is moved aside to ``<stage>.stale-<time>``, never overwritten.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
import uuid
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Literal, Optional

from personalm import judge as judging
from personalm.files import write_text

REPO = Path(__file__).resolve().parent.parent


@dataclass
class LLMJudgeSettings:
    """An OpenAI-compatible chat endpoint; the key is read from the environment variable ``api_key_env``."""

    base_url: str
    model: str
    api_key_env: str = "OPENAI_API_KEY"
    max_calls: int = 500


@dataclass
class StudySettings:
    """What the study runs on. Extra CLI arguments per step go in ``args`` under ``sft``, ``dpo``,
    ``reward``, ``test``, ``predict`` or ``all`` (e.g. ``all: [--trainer.max_steps=5]``)."""

    root: str = "lightning_logs/study"
    dataset: str = "embedded:compred"
    subsets: list[str] = field(default_factory=lambda: ["finance", "history"])
    base_model: str = "embedded:tiny-llama"
    sft_config: str = "configs/demo/sft.yaml"
    dpo_config: str = "configs/demo/dpo.yaml"
    reward_config: str = "configs/demo/reward.yaml"
    args: dict[str, list[str]] = field(default_factory=dict)
    judge: Literal["reward", "llm"] = "reward"
    llm: Optional[LLMJudgeSettings] = None
    judge_max_length: int = 1024
    seed: int = 0
    n_boot: int = 1000
    progress: bool = True
    isolate: bool = False  # each CLI step in its own `python -m personalm` process: needed for DDP and
    # other multi-process strategies, which relaunch the command they were started from


@dataclass
class Stage:
    name: str
    needs: list[str]
    run: Callable[[Path, dict], dict]  # (its folder, done markers of its needs) -> outputs {key: relative path}
    settings: dict = field(default_factory=dict)  # what else its result depends on (config, args, judge)


# -- running stages ---------------------------------------------------------------------------------


def _write_json(path: Path, data: dict) -> None:
    write_text(path, json.dumps(data, indent=2))


def is_done(folder: Path, inputs: dict) -> Optional[dict]:
    """The stage's ``done.json`` if it is complete and made from these inputs, else None."""
    marker = folder / "done.json"
    if not marker.is_file():
        return None
    done = json.loads(marker.read_text())
    if done.get("inputs") != inputs or not all((folder / p).exists() for p in done.get("outputs", {}).values()):
        return None
    return done


def run_stage(root: Path, stage: Stage, done: dict[str, dict]) -> dict:
    """Run ``stage`` unless it is already done; returns its ``done.json``."""
    folder = root / stage.name
    settings = hashlib.sha256(json.dumps(stage.settings, sort_keys=True).encode()).hexdigest()[:16]
    inputs = {"settings": settings, **{n: done[n]["id"] for n in stage.needs}}
    finished = is_done(folder, inputs)
    if finished is not None:
        print(f"[study] {stage.name}: done, skipped ({folder})", flush=True)
        return finished
    if (folder / "done.json").is_file():  # finished from other inputs: keep it, out of the way
        stamp, n = time.strftime("%Y%m%d-%H%M%S"), 0
        while (aside := folder.with_name(f"{stage.name}.stale-{stamp}" + (f"-{n}" if n else ""))).exists():
            n += 1  # moved aside more than once within a second
        print(f"[study] {stage.name}: settings, inputs or outputs changed; the old folder moves to {aside}", flush=True)
        folder.rename(aside)
    elif folder.exists():  # no done.json: a failed or interrupted run, never trusted
        print(f"[study] {stage.name}: incomplete earlier run removed", flush=True)
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    start = time.perf_counter()
    print(f"\n[study] === {stage.name} ===", flush=True)
    outputs = stage.run(folder, {n: {**done[n], "folder": root / n} for n in stage.needs})
    marker = {"id": uuid.uuid4().hex, "inputs": inputs, "outputs": outputs,
              "seconds": round(time.perf_counter() - start, 1)}
    _write_json(folder / "done.json", marker)
    return marker


def output(done: dict, key: str) -> str:
    return str(Path(done["folder"]) / done["outputs"][key])


LOGS = "lightning_logs/version_0"  # where a CLI run writes in its stage's fresh folder


def written(folder: Path, relative: str) -> str:
    """``relative`` if the step wrote it, else a clear error (the stage then has no done.json)."""
    if not (folder / relative).exists():
        raise RuntimeError(f"{folder.name}: the step finished but {folder / relative} is missing")
    return relative


# -- the steps ----------------------------------------------------------------------------------------


def config_path(name: str) -> str:
    """A config path as given, else relative to the repository (so the study runs from any folder)."""
    for path in (Path(name), REPO / name):
        if path.is_file():
            return str(path)
    raise FileNotFoundError(f"config {name} not found (looked in {Path.cwd()} and {REPO})")


class Steps:
    """The CLI runs of the study, with its settings applied."""

    def __init__(self, s: StudySettings):
        self.s = s

    def settings(self, kind: str, config: Optional[str] = None) -> dict:
        """What a stage's result depends on besides the stages it needs (a change redoes the stage)."""
        s = self.s
        if kind == "judge":
            return {"judge": s.judge, "llm": asdict(s.llm) if s.llm else None, "seed": s.seed, "n_boot": s.n_boot,
                    "max_length": s.judge_max_length}
        return {"config": Path(config_path(config)).read_text(), "dataset": s.dataset, "subsets": s.subsets,
                "base_model": s.base_model if kind == "sft" else None,
                "args": s.args.get("all", []) + s.args.get(kind, [])}

    def cli(self, subcommand: str, kind: str, config: str, folder: Path, model: str, *extra: str):
        from personalm.cli import main

        s = self.s
        args = [subcommand, "--config", config_path(config), f"--trainer.default_root_dir={folder}",
                f"--trainer.enable_progress_bar={str(s.progress).lower()}",
                f"--model.init_args.model_name_or_path={model}", f"--data.dataset={s.dataset}",
                f"--data.subset={json.dumps(s.subsets)}", *extra, *s.args.get("all", []), *s.args.get(kind, [])]
        print(f"$ python -m personalm {shlex.join(args)}", flush=True)
        if s.isolate:
            subprocess.run([sys.executable, "-m", "personalm", *args], check=True)
            return
        with warnings.catch_warnings():  # the study's own command line is not meant for LightningCLI
            warnings.filterwarnings("ignore", "LightningCLI's args parameter")
            main(args)

    def fit(self, name: str, kind: str, config: str, context: bool, start: Optional[str] = None) -> Stage:
        """Train from ``start``'s exported model (or the base model) and export; ``kind``: sft, dpo, reward."""
        def run(folder: Path, needs: dict) -> dict:
            model = output(needs[start], "model") if start else self.s.base_model
            self.cli("fit", kind, config, folder, model, f"--data.contextualize={str(context).lower()}")
            ckpts = sorted((folder / LOGS / "checkpoints").glob("*.ckpt"))
            return {"model": written(folder, f"{LOGS}/hf_model"), "logs": LOGS,
                    **({"checkpoint": os.path.relpath(ckpts[-1], folder)} if ckpts else {})}
        return Stage(name, [start] if start else [], run, self.settings(kind, config))

    def test(self, name: str, config: str, fitted: str, context: bool) -> Stage:
        def run(folder: Path, needs: dict) -> dict:
            self.cli("test", "test", config, folder, output(needs[fitted], "model"),
                     f"--data.contextualize={str(context).lower()}")
            return {"metrics": written(folder, f"{LOGS}/test_metrics.json")}
        return Stage(name, [fitted], run, self.settings("test", config))

    def predict(self, name: str, fitted: str, conditioning: Literal["true", "none", "random"]) -> Stage:
        flags = {"true": ["--data.contextualize=true"], "none": ["--data.contextualize=false"],
                 "random": ["--data.contextualize=true", "--data.random_community=true"]}[conditioning]

        def run(folder: Path, needs: dict) -> dict:
            self.cli("predict", "predict", self.s.dpo_config, folder, output(needs[fitted], "model"), *flags,
                     f"--predictions.output_path={folder / 'predictions.jsonl'}")
            return {"predictions": written(folder, "predictions.jsonl")}
        return Stage(name, [fitted], run, self.settings("predict", self.s.dpo_config))

    def make_judge(self, reward_model: str) -> judging.Judge:
        if self.s.judge == "llm":
            from personalm.llm_judge import LLMJudge

            if self.s.llm is None:
                raise ValueError("judge: llm needs an `llm:` section (base_url, model, api_key_env)")
            return LLMJudge(self.s.llm.base_url, self.s.llm.model, self.s.llm.api_key_env,
                            max_calls=self.s.llm.max_calls, seed=self.s.seed)
        from personalm.reward import RewardJudge

        return RewardJudge(reward_model, max_length=self.s.judge_max_length)

    def judge(self, name: str, a: str, b: str, name_a: str, name_b: str) -> Stage:
        def run(folder: Path, needs: dict) -> dict:
            judge = self.make_judge(output(needs["reward"], "model"))
            result = judging.compare(output(needs[a], "predictions"), output(needs[b], "predictions"), judge,
                                     name_a=name_a, name_b=name_b, seed=self.s.seed, n_boot=self.s.n_boot)
            result["judge"] = {"kind": self.s.judge, **({"stats": judge.stats} if hasattr(judge, "stats") else {})}
            judging.write_json(result, folder / "judge.json")
            print(judging.format_table(result), flush=True)
            return {"result": "judge.json"}
        return Stage(name, [a, b, "reward"], run, self.settings("judge"))


def stages(s: StudySettings) -> list[Stage]:
    st = Steps(s)
    return [
        st.fit("sft_context", "sft", s.sft_config, context=True),
        st.fit("sft_no_context", "sft", s.sft_config, context=False),
        st.fit("dpo_context", "dpo", s.dpo_config, context=True, start="sft_context"),
        st.fit("dpo_no_context", "dpo", s.dpo_config, context=False, start="sft_no_context"),
        st.test("test_dpo_context", s.dpo_config, "dpo_context", context=True),
        st.test("test_dpo_no_context", s.dpo_config, "dpo_no_context", context=False),
        st.fit("reward", "reward", s.reward_config, context=True, start="sft_context"),
        st.test("test_reward", s.reward_config, "reward", context=True),
        st.predict("predict_context", "dpo_context", "true"),
        st.predict("predict_no_context", "dpo_no_context", "none"),
        st.predict("predict_random", "dpo_context", "random"),
        st.judge("judge_context_vs_no_context", "predict_context", "predict_no_context", "context", "no context"),
        st.judge("judge_context_vs_random", "predict_context", "predict_random", "context", "random community"),
        Stage("report", ["test_dpo_context", "test_dpo_no_context", "test_reward", "judge_context_vs_no_context",
                         "judge_context_vs_random"], lambda folder, needs: write_report(folder, needs, s)),
    ]


# -- the report -------------------------------------------------------------------------------------------


def _acc(metrics: dict, variant: str, key: str) -> Optional[float]:
    return metrics["conditioning"].get(variant, {}).get(key)


def _pct(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}"


def accuracy_table(ctx: dict, no_ctx: dict, reward: dict) -> str:
    """Per-community test preference accuracy (%), one row per community plus macro and worst."""
    names = sorted(k.split("/r_", 1)[1] for k in ctx["conditioning"]["true"] if k.startswith("rewards/accuracies/r_"))
    lines = ["| community | DPO with context | same, no community | same, random community | DPO without "
             "context | reward model |", "|---|---|---|---|---|---|"]
    for label, key in [*((f"r/{n}", f"rewards/accuracies/r_{n}") for n in names),
                       ("all pairs", "rewards/accuracies"), ("macro", "rewards/accuracies/macro"),
                       ("worst", "rewards/accuracies/worst")]:
        lines.append(f"| {label} | {_pct(_acc(ctx, 'true', key))} | {_pct(_acc(ctx, 'none', key))} | "
                     f"{_pct(_acc(ctx, 'random', key))} | {_pct(_acc(no_ctx, 'true', key))} | "
                     f"{_pct(_acc(reward, 'true', key))} |")
    return "\n".join(lines)


def write_report(folder: Path, needs: dict, s: StudySettings) -> dict:
    load = lambda name, key: json.loads(Path(output(needs[name], key)).read_text())  # noqa: E731
    ctx, no_ctx, reward = (load(n, "metrics") for n in ("test_dpo_context", "test_dpo_no_context", "test_reward"))
    judged = [load(n, "result") for n in ("judge_context_vs_no_context", "judge_context_vs_random")]
    judging.plot_win_rates(judged, folder / "win_rates.png", title="Win rate of the context model, per community")
    data_note = ("synthetic demo data and a tiny model: these figures show the pipeline works, they are NOT "
                 "results about Reddit" if s.dataset.startswith("embedded:") else f"dataset {s.dataset}")
    judge_note = ("a reward model trained with the community in its input (Bradley-Terry), scoring both "
                  "responses in the prompt of the true community" if s.judge == "reward"
                  else f"LLM judge {s.llm.model if s.llm else ''} (A/B order randomised)")
    text = f"""# personalm study report

Subsets: {', '.join(s.subsets)}; base model: `{s.base_model}`; {data_note}.

## Preference accuracy on test_pref (%)

Share of test pairs where the model's implicit reward ranks the community's preferred comment first.
The context model is also scored with the community removed ("Reddit") and with a random wrong one.

{accuracy_table(ctx, no_ctx, reward)}

## Win rates of generations

Judge: {judge_note}. Win rate = (wins + ties / 2) / decided posts; 95% bootstrap intervals over posts
({s.n_boot} resamples, seed {s.seed}).

### Context vs no context

{judging.format_table(judged[0])}

### Context vs random community

{judging.format_table(judged[1])}

![win rates](win_rates.png)
"""
    write_text(folder / "report.md", text)
    return {"report": "report.md", "chart": "win_rates.png"}


# -- entry point --------------------------------------------------------------------------------------------


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
    if s.dataset.startswith("embedded:") and s.base_model.startswith("embedded:"):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing to download: never wait on the network
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import datasets

    datasets.disable_progress_bars()
    root = Path(s.root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    done: dict[str, dict] = {}
    for stage in stages(s):
        done[stage.name] = run_stage(root, stage, done)
    report = root / "report" / "report.md"
    print(f"\n[study] finished in {time.perf_counter() - start:.0f} s. Report: {report}\n")
    print(report.read_text().split("## Win rates")[0].split("## Preference accuracy on test_pref (%)")[1].strip())
    for name in ("judge_context_vs_no_context", "judge_context_vs_random"):
        result = json.loads((root / name / done[name]["outputs"]["result"]).read_text())
        overall = result["overall"]  # rate and CI are None when every verdict failed (e.g. an LLM judge)
        rate = "n/a" if overall["win_rate"] is None else f"{overall['win_rate']:.3f}"
        ci = "n/a" if overall["ci95"][0] is None else "{:.3f}-{:.3f}".format(*overall["ci95"])
        print(f"\nWin rate, {result['a']} vs {result['b']}: {rate} (95% CI {ci}, {overall['n']} posts, "
              f"{overall['failed']} failed verdicts); per community in the report")
    print(f"""
  TensorBoard logs : tensorboard --logdir {root}
  stages           : {root}/<stage>/ (logs, checkpoints and hf_model under lightning_logs/version_0)
  DPO model        : {root / 'dpo_context' / done['dpo_context']['outputs']['model']}
  predictions      : {root}/predict_{{context,no_context,random}}/predictions.jsonl (one line per test post)
  report, chart    : {report}, {root / 'report' / 'win_rates.png'}
""", flush=True)
    return {name: {**d, "folder": str(root / name)} for name, d in done.items()}


if __name__ == "__main__":
    main()
