"""Peak memory of one DPO training step on a 32k-vocabulary model: chunked log-probs against the full logits.

    python benchmarks/logprob_memory.py [--pairs 8] [--chunk 1024] [--threads 2]

The model is ``epoch_vs_trl.py``'s ``llama32k`` (~30M parameters, the Mistral-7B SentencePiece tokenizer,
random weights), the rows its ``realistic`` ones (heavy-tailed post and comment lengths, prompt budget 512,
sequence 1,024). One batch of ``--pairs`` pairs; each setting in a fresh process: the policy's log-probs,
the DPO loss against fixed reference log-probs, backward. Measured: the process's peak RSS during the step
over its RSS before it (the peak reset through /proc/self/clear_refs), and on a GPU the peak allocated
memory over the allocated memory before it. Settings: the old path (two padded rows per pair, the model's
own logits from the first response position on), prefix-shared packed rows with the head in one piece,
and the same with the head applied ``--chunk`` positions at a time (the default).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from epoch_vs_trl import build_model, build_rows, datamodule  # noqa: E402

SETTINGS = {"old path (padded rows, model logits)": (False, None), "packed rows, full logits": (True, None),
            "packed rows, chunked log-probs": (True, "chunk")}
TAG = "MEMORY_RESULT "


def status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) / 1024
    return float("nan")


def child(spec: dict) -> None:
    import torch

    from personalm.models import load_causal_lm
    from personalm.training.dpo_loss import PairLogps, pair_losses
    from personalm.training.logprobs import sequence_logps

    torch.set_num_threads(spec["threads"])
    dm = datamodule(spec, "preference")
    dm.hparams.pair_packing = "prefix_shared" if spec["packed"] else "none"
    batch = next(iter(dm.train_dataloader()))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    model = load_causal_lm(spec["model"]).to(device).train()
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    if "packed" in batch:
        batch["packed"] = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch["packed"].items()}
    n = len(batch["community"])
    ref = PairLogps(*(torch.full((n,), -50.0, device=device) for _ in PairLogps._fields))
    before = status_mb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        gpu_before = torch.cuda.memory_allocated()
    out = sequence_logps(model, batch, spec["chunk"]) if spec["packed"] or spec["chunk"] else None
    if out is None:
        from personalm.training.logprobs import model_logprobs
        out = model_logprobs(model, batch)
    losses = pair_losses(PairLogps.from_sequences(out, n), ref, 0.1, "sigmoid", 0.0).losses
    losses.mean().backward()
    result = {"step_peak_rss_mb": status_mb("VmHWM") - before, "response_tokens": int(out.tokens.sum()),
              "forwarded": list(batch["packed"]["input_ids"].shape if spec["packed"] else batch["input_ids"].shape),
              "loss": float(losses.mean())}
    if cuda:
        result["step_peak_gpu_mb"] = (torch.cuda.max_memory_allocated() - gpu_before) / 2**20
    print(TAG + json.dumps(result), flush=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=8)
    p.add_argument("--chunk", type=int, default=1024)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(json.loads(args.child))
    with tempfile.TemporaryDirectory() as tmp:
        model = build_model("llama32k", Path(tmp))
        data = build_rows("realistic", max(args.pairs, 8) * 4, Path(tmp))
        print("| setting | forwarded [rows, width] | response tokens | step peak RSS over start (MB) | loss |")
        print("|---|---|---:|---:|---:|")
        for name, (packed, chunk) in SETTINGS.items():
            spec = dict(model=model, data=data, shape="realistic", pairs=args.pairs * 4, batch=args.pairs,
                        threads=args.threads, packed=packed, chunk=args.chunk if chunk else None)
            proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True,
                                  text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
            found = [line for line in proc.stdout.splitlines() if line.startswith(TAG)]
            if proc.returncode or not found:
                raise RuntimeError(proc.stdout[-2000:] + proc.stderr[-4000:])
            r = json.loads(found[-1][len(TAG):])
            gpu = f" (GPU {r['step_peak_gpu_mb']:.0f} MB)" if "step_peak_gpu_mb" in r else ""
            print(f"| {name} | {r['forwarded']} | {r['response_tokens']} | {r['step_peak_rss_mb']:.0f}{gpu} | "
                  f"{r['loss']:.6f} |")


if __name__ == "__main__":
    main()
