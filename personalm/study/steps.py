"""The study's steps: ordinary ``python -m personalm`` runs (in this process, or each in its own with
``isolate``), with the study's settings applied, each made into a ``runner.Stage``."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Literal, Optional, Sequence

from personalm.configs import compose
from personalm.evaluation import judge as judging
from personalm.models import compute_dtype
from personalm.paths import runs, write_json
from personalm.study.runner import Stage, output, written
from personalm.study.settings import StudySettings
from personalm.training.checkpoints import last_checkpoint

REPO = Path(__file__).resolve().parent.parent.parent
LLM_VERDICTS = "llm_judge_verdicts-{stage}.jsonl"  # in the study's root: every verdict a judge stage paid for


def run_of(folder: Path) -> str:
    """The folder of a stage's CLI run, relative to the stage's: the newest ``lightning_logs/version_<N>`` (the
    run's own folder whatever the logger, ``personalm.paths.run_folder``; a resumed run goes on in its own)."""
    found = runs(folder)
    if not found:
        raise RuntimeError(f"{folder.name}: the step finished but left no run folder under {folder}")
    return os.path.relpath(found[-1], folder)


def config_path(name: str) -> str:
    """A config path as given, else relative to the repository (so the study runs from any folder)."""
    for path in (Path(name), REPO / name):
        if path.is_file():
            return str(path)
    raise FileNotFoundError(f"config {name} not found (looked in {Path.cwd()} and {REPO})")


def composed_config(configs: list[str], args: list[str]) -> dict:
    """The configuration a CLI run composes from its config files and ``--key=value`` arguments, in order
    (comments and formatting do not count): what a stage's result depends on."""
    return compose(configs, args, find=config_path)


class Steps:
    """The CLI runs of the study, with its settings applied."""

    def __init__(self, s: StudySettings):
        self.s = s

    def configs(self, recipe: str) -> list[str]:
        """The composed config files of a step: the hardware's trainer block, then the recipe (sft, dpo, reward)."""
        path = {"sft": self.s.sft_config, "dpo": self.s.dpo_config, "reward": self.s.reward_config}[recipe]
        return [config_path(c) for c in ([self.s.trainer_config] if self.s.trainer_config else []) + [path]]

    def args(self, kind: str) -> list[str]:
        """The CLI arguments of a step of ``kind`` (sft, dpo, reward, test, predict): the study's for every step,
        a prediction's backend (vLLM: one process, which splits the model over GPUs itself), then the kind's own."""
        backend = ["--model.init_args.generation.backend=vllm", "--trainer.devices=1", "--trainer.strategy=auto"] \
            if kind == "predict" and self.s.predict_backend == "vllm" else []
        return self.s.args.get("all", []) + backend + self.s.args.get(kind, [])

    def settings(self, recipe: str, kind: str, extra: Sequence[str] = ()) -> dict:
        """What a stage's result depends on besides the stages it needs (a change redoes the stage): the
        composed configuration of its CLI run, the data and, for SFT, the base model."""
        s = self.s
        return {"config": composed_config(self.configs(recipe), [*self.args(kind), *extra]), "dataset": s.dataset,
                "subsets": s.subsets, "base_model": s.base_model if recipe == "sft" else None}

    def judge_settings(self) -> dict:
        s = self.s
        rule = None
        if s.judge == "synthetic":  # how it reads a response's style: a judge that reads otherwise judges again
            from personalm.evaluation.synthetic_judge import OPENING_WORDS

            rule = {"opening_words": OPENING_WORDS}
        return {"judge": s.judge, "llm": asdict(s.llm) if s.llm else None, "seed": s.seed, "n_boot": s.n_boot,
                "max_length": None if rule else s.judge_max_length,
                "dtype": self.reward_dtype() if s.judge == "reward" else None, **({"synthetic": rule} if rule else {})}

    def cli(self, subcommand: str, recipe: str, kind: str, folder: Path, model: str, *extra: str,
            last: Sequence[str] = ()):
        """``python -m personalm <subcommand>`` with the recipe's configs, ``extra``, the arguments for ``kind``
        and ``last`` (a DPO variant's own)."""
        from personalm.cli import main

        s = self.s
        args = [subcommand, *(a for c in self.configs(recipe) for a in ("--config", c)),
                f"--trainer.default_root_dir={folder}", f"--trainer.enable_progress_bar={str(s.progress).lower()}",
                f"--model.init_args.model_name_or_path={model}", f"--data.dataset={s.dataset}",
                f"--data.subset={json.dumps(s.subsets)}", *extra, *self.args(kind), *last]
        print(f"$ python -m personalm {shlex.join(args)}", flush=True)
        if s.isolate:
            subprocess.run([sys.executable, "-m", "personalm", *args], check=True)
            return
        with warnings.catch_warnings():  # the study's own command line is not meant for LightningCLI
            warnings.filterwarnings("ignore", "LightningCLI's args parameter")
            main(args)

    def fit(self, name: str, kind: str, context: bool, start: Optional[str] = None, variant: Sequence[str] = ()) \
            -> Stage:
        """Train from ``start``'s exported model (or the base model) and export; ``kind``: sft, dpo, reward;
        ``variant``: a DPO variant's own arguments, last. An interrupted run goes on from its last checkpoint
        (``--ckpt_path last``)."""
        def run(folder: Path, needs: dict, resume: bool = False) -> dict:
            model = output(needs[start], "model") if start else self.s.base_model
            self.cli("fit", kind, kind, folder, model, f"--data.contextualize={str(context).lower()}",
                     *(["--ckpt_path=last"] if resume else []), last=variant)
            last, run = last_checkpoint(folder), run_of(folder)
            return {"model": written(folder, f"{run}/hf_model"), "logs": run,
                    **({"checkpoint": os.path.relpath(last[0].resolve(), folder)} if last else {})}

        def resumable(folder: Path) -> Optional[str]:
            last = last_checkpoint(folder)
            return str(last[0].resolve()) if last else None
        return Stage(name, [start] if start else [], run, self.settings(kind, kind, variant), resumable)

    def test(self, name: str, recipe: str, fitted: str, context: bool) -> Stage:
        def run(folder: Path, needs: dict, resume: bool = False) -> dict:
            self.cli("test", recipe, "test", folder, output(needs[fitted], "model"),
                     f"--data.contextualize={str(context).lower()}")
            return {"metrics": written(folder, f"{run_of(folder)}/test_metrics.json")}
        return Stage(name, [fitted], run, self.settings(recipe, "test"))

    def predict(self, name: str, fitted: str, conditioning: Literal["true", "none", "random"]) -> Stage:
        flags = {"true": ["--data.contextualize=true"], "none": ["--data.contextualize=false"],
                 "random": ["--data.contextualize=true", "--data.random_community=true"]}[conditioning]

        def run(folder: Path, needs: dict, resume: bool = False) -> dict:  # the writer keeps what was written
            self.cli("predict", "dpo", "predict", folder, output(needs[fitted], "model"), *flags,
                     f"--predictions.output_path={folder / 'predictions.jsonl'}")
            return {"predictions": written(folder, "predictions.jsonl")}

        def resumable(folder: Path) -> Optional[str]:
            parts = sorted(folder.glob("predictions.jsonl.rank*.part"))
            return f"the {sum(1 for p in parts for _ in open(p))} predictions written" if parts else None
        return Stage(name, [fitted], run, self.settings("dpo", "predict"), resumable)

    def make_judge(self, reward_model: str, store: Optional[Path] = None) -> judging.Judge:
        """The study's judge; an LLM judge keeps its verdicts in ``store`` (one per comparison, outside its stage's
        folder, so a redone stage and a rerun of the study reuse what was paid for; each comparison has its own
        ``max_calls``, so the first cannot spend the budget of the others)."""
        if self.s.judge == "llm":
            from personalm.evaluation.llm_judge import LLMJudge

            if self.s.llm is None:
                raise ValueError("judge: llm needs an `llm:` section (base_url, model, api_key_env)")
            llm = self.s.llm
            return LLMJudge(llm.base_url, llm.model, llm.api_key_env, max_calls=llm.max_calls, seed=self.s.seed,
                            store=store, concurrency=llm.concurrency, orders=llm.orders)
        if self.s.judge == "synthetic":
            from personalm.evaluation.synthetic_judge import SyntheticJudge

            return SyntheticJudge(self.s.subsets)
        from personalm.evaluation.reward_judge import RewardJudge

        return RewardJudge(reward_model, max_length=self.s.judge_max_length, dtype=self.reward_dtype())

    def reward_dtype(self) -> Optional[str]:
        """The reward judge's weights in the dtype the reward model's runs compute in (bf16 under bf16-mixed)."""
        config = composed_config(self.configs("reward"), self.args("test"))
        return compute_dtype((config.get("trainer") or {}).get("precision"))

    def judge(self, name: str, a: str, b: str, name_a: str, name_b: str, reward: str) -> Stage:
        def run(folder: Path, needs: dict, resume: bool = False) -> dict:
            judge = self.make_judge(output(needs[reward], "model"),
                                    store=folder.parent / LLM_VERDICTS.format(stage=name))
            result = judging.compare(output(needs[a], "predictions"), output(needs[b], "predictions"), judge,
                                     name_a=name_a, name_b=name_b, seed=self.s.seed, n_boot=self.s.n_boot)
            result["judge"] = {"kind": self.s.judge, **({"stats": judge.stats} if hasattr(judge, "stats") else {})}
            write_json(folder / "judge.json", result)
            print(judging.format_table(result), flush=True)
            return {"result": "judge.json"}
        return Stage(name, [a, b, reward], run, self.judge_settings())
