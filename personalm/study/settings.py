"""What the study runs on: its settings (``python -m personalm.study --config configs/study/*.yaml``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional


@dataclass
class LLMJudgeSettings:
    """An OpenAI-compatible chat endpoint; the key is read from the environment variable ``api_key_env``. Each
    item is shown in both orders by default (a win only where both agree; ``orders: one`` halves the calls and
    leaves position bias to average out); ``max_calls`` counts every call of a comparison across reruns (each order
    is one) and, when it runs out, leaves a random sample stratified by community judged."""

    base_url: str
    model: str
    api_key_env: str = "OPENAI_API_KEY"
    max_calls: int = 1000
    orders: Literal["one", "both"] = "both"
    concurrency: int = 16


@dataclass
class StudySettings:
    """What the study runs on. Each CLI step composes ``trainer_config`` (the hardware) and its recipe
    (``sft_config``, ``dpo_config``, ``reward_config``); extra CLI arguments per step go in ``args`` under
    ``sft``, ``dpo``, ``reward``, ``test``, ``predict`` or ``all`` (e.g. ``all: [--trainer.max_steps=5]``)."""

    root: str = "lightning_logs/study"
    dataset: str = "embedded:compred"
    subsets: list[str] = field(default_factory=lambda: ["finance", "history"])
    base_model: str = "embedded:tiny-llama"
    trainer_config: Optional[str] = "configs/trainer/cpu.yaml"
    sft_config: str = "configs/demo/sft.yaml"
    dpo_config: str = "configs/demo/dpo.yaml"
    reward_config: str = "configs/demo/reward.yaml"
    args: dict[str, list[str]] = field(default_factory=dict)
    predict_backend: Literal["hf", "vllm"] = "hf"  # vllm: the prediction stages generate with vLLM, one process
    # (its GPUs through --args '{"predict": ["--model.init_args.generation.vllm.tensor_parallel_size=8"]}')
    judge: Literal["reward", "llm", "synthetic"] = "reward"  # synthetic: the synthetic data's known tastes decide
    # (personalm.evaluation.synthetic_judge; only for the synthetic subsets, any folder they were written to)
    llm: Optional[LLMJudgeSettings] = None
    judge_max_length: int = 1024
    dpo_variants: dict[str, list[str]] = field(default_factory=dict)  # more DPO runs with context beside the plain
    # one, name -> their DPO fit's extra arguments (e.g. {"robust": ['--model.init_args.group_robust={"eta": 8.0}']}):
    # each from the same SFT model, tested, predicted and judged against the model without context; the report
    # shows them side by side (per community accuracy with n, macro, worst, weights alpha, win rates)
    seed: int = 0
    n_boot: int = 1000
    progress: bool = True
    isolate: bool = False  # each CLI step in its own `python -m personalm` process: needed for DDP and
    # other multi-process strategies, which relaunch the command they were started from
