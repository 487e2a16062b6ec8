"""Packed rows' attention: which SDPA kernel ran, and FlexAttention against SDPA (equality, time per step).

    python benchmarks/attention_check.py                 # a tiny random Llama on a CPU: forward only, one shape
    python benchmarks/gpu_check.py                       # on CUDA, this runs on the GPU check's model and rows

On prefix-shared DPO pairs (``collate_preference(pair_packing="prefix_shared")``), one model whose attention is
switched between ``sdpa`` and ``flex_attention`` (same weights):

1. fp32: the pairs' log-probs and DPO losses under both, and on CUDA the gradients of every weight (max abs diff;
   FlexAttention has no backward on a CPU in torch 2.13, so a CPU compares forwards only);
2. time per step (forward and backward on CUDA under bf16 autocast; forward only on a CPU) of SDPA and of
   FlexAttention, at the default packing budget (the longest span) and at a wider one (``--wide``), where
   FlexAttention skips the blocks between spans and SDPA's dense mask does not;
3. the SDPA kernel the packed rows ran under (``personalm.training.attention``).

The first FlexAttention call of each dtype and shape compiles (untimed: ``--warmup`` steps first).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def _pairs(rows, budget):
    from personalm.data.collate import collate_preference

    return collate_preference([{**r, "community": "c", "index": i} for i, r in enumerate(rows)], pad_id=0,
                              pair_packing="prefix_shared", pack_tokens=budget)


def _loss(model, batch, n):
    from personalm.training.dpo_loss import PairLogps, pair_losses
    from personalm.training.logprobs import sequence_logps

    logps = sequence_logps(model, batch, 1024)
    pairs = PairLogps.from_sequences(logps, n)
    ref = PairLogps(*(t.detach() - 0.3 for t in pairs))  # any fixed reference: the losses' graphs run through
    return logps, pair_losses(pairs, ref, 0.1, "sigmoid", 0.0).losses  # the policy


def _step_seconds(model, batch, n, steps, warmup, backward, cuda):
    import torch

    times = []
    for i in range(warmup + steps):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda), torch.set_grad_enabled(backward):
            loss = _loss(model, batch, n)[1].mean()
        if backward:
            loss.backward()
            model.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return sum(times) / len(times)


def check(model, rows, steps: int = 3, warmup: int = 1, wide: int = 4096) -> dict:
    """The three measures above for ``model`` (an fp32 causal LM) on ``rows`` (``prompt_ids``, ``chosen_ids``,
    ``rejected_ids``), on the model's device."""
    import torch
    from lightning.fabric.utilities.apply_func import move_data_to_device

    from personalm.training.attention import KERNEL, kernel_used, use_attention

    device = next(model.parameters()).device
    cuda = device.type == "cuda"
    n = len(rows)
    narrow = move_data_to_device(_pairs(rows, None), device)
    out = {"pairs": n, "device": str(device), "backward": cuda}
    values = {}
    for implementation in ("sdpa", "flex_attention"):
        use_attention(model, implementation)
        model.zero_grad(set_to_none=True)
        with torch.set_grad_enabled(cuda):
            logps, losses = _loss(model, narrow, n)
        if cuda:
            losses.sum().backward()
        grads = {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None}
        values[implementation] = (logps.sum.detach(), losses.detach(), grads)
        if implementation == "sdpa":
            out["sdpa_kernel"] = kernel_used(model)
            delattr(model, KERNEL)  # said again under autocast below
    (a, la, ga), (b, lb, gb) = values["sdpa"], values["flex_attention"]
    out["fp32_logp_max_abs_diff"] = float((a - b).abs().max())
    out["fp32_loss_max_abs_diff"] = float((la - lb).abs().max())
    if cuda:
        out["fp32_grad_max_abs_diff"] = max(float((ga[k] - gb[k]).abs().max()) for k in ga)
        out["fp32_grad_max_abs"] = max(float(g.abs().max()) for g in ga.values())
    del values, ga, gb
    model.zero_grad(set_to_none=True)
    for name, budget in (("longest span", None), (f"{wide} tokens", wide))[:2 if wide else 1]:
        batch = move_data_to_device(_pairs(rows, budget), device)
        out[f"rows ({name})"] = list(batch["packed"]["input_ids"].shape)
        for implementation in ("sdpa", "flex_attention"):
            use_attention(model, implementation)
            out[f"s/step {implementation}, budget {name}"] = _step_seconds(model, batch, n, steps, warmup, cuda, cuda)
            if implementation == "sdpa" and budget is None:
                out["sdpa_kernel_autocast"] = kernel_used(model)
    use_attention(model, "sdpa")
    return out


def report(out: dict) -> None:
    print(f"\n[attention] {out['pairs']} prefix-shared pairs on {out['device']}; SDPA kernel: {out['sdpa_kernel']} "
          f"(fp32), {out.get('sdpa_kernel_autocast')} (bf16 autocast on CUDA)")
    print("| measure | value |\n|---|---:|")
    for k, v in out.items():
        if k not in ("pairs", "device", "sdpa_kernel", "sdpa_kernel_autocast"):
            print(f"| {k} | {v:.3g} |" if isinstance(v, float) else f"| {k} | {v} |")
    sys.stdout.flush()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--wide", type=int, default=0,
                        help="a wider packing budget (tokens) also timed; 0: none (on a CPU, torch 2.13 recompiles "
                             "flex_attention for the second shape with dynamic shapes, and that C++ failed to compile)")
    args = parser.parse_args(argv)

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=500, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa"))
    g = torch.Generator().manual_seed(1)

    def ids(lo, hi):
        return torch.randint(3, 500, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()

    rows = [{"prompt_ids": ids(40, 120), "chosen_ids": ids(5, 60), "rejected_ids": ids(5, 60)}
            for _ in range(args.pairs)]
    out = check(model, rows, args.steps, args.warmup, args.wide)
    report(out)
    return out


if __name__ == "__main__":
    main()
