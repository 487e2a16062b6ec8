"""Run in the vLLM environment by ``tests/training/test_vllm_generation.py``: the new token ids of both backends
for every test prompt of a dataset, as ``predict`` would make them, written to a JSON file.

    <vllm python> tests/training/vllm_vs_hf.py --run MODEL DATA [--run MODEL DATA ...] --out ids.json [--batch 16]

The Hugging Face side runs ``hf_generate`` over the prepared prompts batched as ``predict`` batches them (left
padding, mixed lengths); the vLLM side hands every prompt to one ``VLLMGenerator``. Several runs go through one
process, one engine after the other (each closed before the next starts).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def ids_of(model: str, data: str, subsets: list[str], batch: int, settings, max_length: int) -> dict:
    import torch

    from personalm.data.datamodule import ComPreDDataModule
    from personalm.models import load_causal_lm, load_tokenizer
    from personalm.training.generation import hf_generate
    from personalm.training.vllm_generation import VLLMGenerator

    dm = ComPreDDataModule(dataset=data, subset=subsets, tokenizer=model, max_length=max_length,
                           eval_batch_size=batch, num_proc=1)
    tok = load_tokenizer(model)
    lm = load_causal_lm(model, "float32").eval()
    posts, prompts, hf = [], [], []
    with torch.no_grad():
        for b in dm.predict_dataloader():
            hf += hf_generate(lm, b["input_ids"], b["attention_mask"], settings, tok.eos_token_id, tok.pad_token_id)
            prompts += [ids[m.bool()].tolist() for ids, m in zip(b["input_ids"], b["attention_mask"])]
            posts += b["post_id"]
    del lm
    engine = VLLMGenerator(model, tok, settings, "float32", torch.device("cpu"))
    vllm = engine.generate(prompts)
    engine.close()
    return {"posts": posts, "prompt_lengths": [len(p) for p in prompts], "hf": hf, "vllm": vllm,
            "eos": tok.eos_token_id, "pad": tok.pad_token_id}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run", nargs=2, action="append", required=True, metavar=("MODEL", "DATA"),
                        help="a model folder and the dataset whose test prompts it answers")
    parser.add_argument("--subset", nargs="+", default=["finance", "history"])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # personalm from this checkout

    from personalm.training.decoding import GenerationSettings

    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, backend="vllm")
    out = {model: ids_of(model, data, args.subset, args.batch, settings, args.max_length) for model, data in args.run}
    Path(args.out).write_text(json.dumps(out))


if __name__ == "__main__":
    main()
