"""The GPU check in one command: personalm's training paths on a Llama-architecture model, on one GPU.

    python benchmarks/gpu_check.py                           # ~1.1B Llama (TinyLlama's shape), ~3-5 min on one H100
    python benchmarks/gpu_check.py --size 7b --steps 20      # Llama-2-7B's shape (LoRA runs; full FT needs --skip-full)
    python benchmarks/gpu_check.py --size tiny --steps 4     # the CPU smoke setting the tests run

It builds the model from a config (random init under a fixed seed, no download) with a 32,000-token
vocabulary, writes ComPreD-format rows of realistic, heavy-tailed lengths (``personalm.data.synthetic.LengthModel``)
and runs, in ``bf16-mixed`` with gradient checkpointing and the paper's lengths (prompt 512, sequence 1024):

1. SFT with LoRA (r 16) from the random model, exported (the start of the DPO runs);
2. DPO with LoRA and ``reference: adapters_off`` (the paper's recipe, configs/paper/dpo.yaml);
3. trl's DPOTrainer on the same model, rows (personalm's token ids) and settings, LoRA with its adapter-free
   reference, when trl is importable;
4. DPO with every weight trained under FSDP2 (one process), reference copy sharded;
   again for a few steps with the reference's root left unsharded after its forward (peak memory
   with and without resharding), and DPO with LoRA for 10 steps, logging every 4th, with
   ``torch.cuda.set_sync_debug_mode("warn")``: host syncs per step, between logging steps and at them;
5. packed rows' attention: the SDPA kernel that ran, FlexAttention against SDPA (fp32 gradients, time per
   step; benchmarks/attention_check.py; CUDA only);
6. generation from the SFT export, Hugging Face ``generate`` against vLLM in bf16 (benchmarks/generation_speed.py;
   where vLLM is not installed, as in the lent machines' environment, its side is skipped and it says so).

For each it prints tokens/s (non-padding tokens of the batch, over the steps after the warm-up), MFU
(6·N·tokens per second for training, plus 2·N·tokens for DPO's reference forward, N the model's parameters,
against the card's dense bf16 peak), peak GPU memory, the first loss (ln 2 = 0.6931 for DPO) and the share
of trainable weights that changed. Results also go to ``<out>/gpu_check.json``.

It needs personalm's dependencies; where only torch, lightning, transformers, peft, pyarrow and tensorboard
are installed, bring datasets, jsonargparse and trl as wheels (benchmarks/README.md, "GPU check").
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from a checkout without installing personalm
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SIZES = {  # LlamaConfig fields; vocabulary 32,000 as Llama-2 and Mistral
    "tiny": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2),
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4),  # TinyLlama-1.1B
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32),  # Llama-2-7B
}
# dense bf16 FLOP/s from the datasheets, most specific name first ("L40S" before "L40" before "L4")
BF16_PEAK = [("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H200", 989e12), ("H100", 989e12), ("A100", 312e12),
             ("L40S", 362e12), ("L40", 181e12), ("A10G", 70e12), ("L4", 121e12)]


def bf16_peak(name: str):
    return next((v for k, v in BF16_PEAK if k in name), None)


# ----------------------------------------------------------------------------------------------------
# What a run measured


class Measure:
    """Timing, tokens, peak memory, first loss and changed weights of one run; framework-neutral."""

    def __init__(self, warmup: int, cuda: bool):
        self.warmup, self.cuda = warmup, cuda
        self.times, self.tokens, self.losses = [], [], []
        self.start = None
        self.changed = None

    def sync(self):
        if self.cuda:
            import torch

            torch.cuda.synchronize()

    def train_start(self, params):
        import gc

        import torch

        self.snapshot = {n: _local(p).detach().float().cpu().clone() for n, p in params}
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.held_before = torch.cuda.memory_allocated()  # what an earlier run may still hold

    def step_start(self):
        self.sync()
        self.start = time.perf_counter()

    def step_end(self, tokens: int, loss=None):
        self.sync()
        self.times.append(time.perf_counter() - self.start)
        self.tokens.append(tokens)
        if loss is not None:
            self.losses.append(float(loss))

    def train_end(self, params):
        import torch

        params = dict(params)
        changed = sum(int((_local(params[n]).detach().float().cpu() != p).sum()) for n, p in self.snapshot.items())
        self.changed = changed / max(sum(p.numel() for p in self.snapshot.values()), 1)
        self.trainable = sum(p.numel() for p in self.snapshot.values())
        self.peak_gib = (torch.cuda.max_memory_allocated() - self.held_before) / 2**30 if self.cuda else None
        del self.snapshot

    def result(self, n_params: int, reference_forward: bool, peak_flops) -> dict:
        timed = slice(self.warmup, None)
        seconds, tokens = sum(self.times[timed]), sum(self.tokens[timed])
        tps = tokens / seconds if seconds else float("nan")
        flops = (6 + (2 if reference_forward else 0)) * n_params * tps
        return {"steps": len(self.times), "timed_steps": len(self.times[timed]), "tokens_per_s": tps,
                "s_per_step": seconds / max(len(self.times[timed]), 1),
                "mfu": flops / peak_flops if peak_flops else None,
                "peak_gib": self.peak_gib, "first_loss": self.losses[0] if self.losses else None,
                "changed": self.changed, "trainable": self.trainable}


def _local(p):
    return p.to_local() if hasattr(p, "to_local") else p


def lightning_callback(measure: Measure):
    from lightning.pytorch.callbacks import Callback

    class Timing(Callback):
        def on_train_start(self, trainer, module):
            measure.train_start([(n, p) for n, p in module.named_parameters() if p.requires_grad])

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            measure.step_start()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            loss = trainer.callback_metrics.get("train/loss")
            measure.step_end(int(batch["attention_mask"].sum()), loss)

        def on_train_end(self, trainer, module):
            measure.train_end([(n, p) for n, p in module.named_parameters() if p.requires_grad])

    return Timing()


def sync_counter(cuda: bool):
    """Host syncs per training step on CUDA: ``torch.cuda.set_sync_debug_mode("warn")`` turns each synchronizing
    operation into a warning; they are counted from the step's start to its end, apart for logging steps (where
    reading the loss on the host is allowed) and the others (where personalm promises none)."""
    import warnings

    import torch
    from lightning.pytorch.callbacks import Callback

    from personalm.training.callbacks import logging_step

    class SyncCount(Callback):
        def __init__(self):
            self.steps: list[tuple[bool, int]] = []

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            self._record = warnings.catch_warnings(record=True)
            self._seen = self._record.__enter__()
            warnings.simplefilter("always")
            if cuda:
                torch.cuda.set_sync_debug_mode("warn")

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if cuda:
                torch.cuda.set_sync_debug_mode("default")
            self._record.__exit__(None, None, None)
            found = sum("synchroniz" in str(w.message).lower() for w in self._seen)
            self.steps.append((logging_step(trainer), found))

        def result(self, skip: int) -> dict:
            steps = self.steps[skip:]
            other = [n for logged, n in steps if not logged]
            logged = [n for is_log, n in steps if is_log]
            return {"observed": cuda, "steps": len(steps), "other_steps_max": max(other, default=None),
                    "other_steps_total": sum(other), "logging_steps": len(logged),
                    "logging_steps_mean": sum(logged) / len(logged) if logged else None}

    return SyncCount()


# ----------------------------------------------------------------------------------------------------
# The runs


def run_personalm(name: str, config: str, args, base: str, out: Path, extra: list[str], measure: Measure = None,
                  strategy: str = None, callbacks=()):
    from personalm.cli import PersonalmCLI

    configs = ["--config", str(REPO / "configs" / "trainer" / "cpu.yaml")]
    if strategy:
        configs += ["--config", str(REPO / "configs" / "strategies" / strategy)]
    configs += ["--config", str(REPO / "configs" / "demo" / config)]
    argv = [*configs, f"--data.dataset={out / 'data'}",
            "--data.subset=finance", f"--model.init_args.model_name_or_path={base}",
            f"--trainer.default_root_dir={out / name}", f"--trainer.max_steps={args.steps}", "--trainer.max_epochs=-1",
            "--trainer.limit_val_batches=0", "--trainer.enable_checkpointing=false", "--trainer.logger=false",
            "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
            f"--trainer.precision={args.precision}", "--trainer.devices=1", "--trainer.log_every_n_steps=1",
            "--model.init_args.dtype=bfloat16", "--model.init_args.gradient_checkpointing=true",
            "--model.init_args.warmup_ratio=0", f"--data.max_length={args.max_length}",
            f"--data.max_prompt_length={args.max_length // 2}", "--data.max_train_pairs=null",
            "--data.max_eval_pairs=null", *extra]
    cli = PersonalmCLI(args=argv, run=False)
    if measure is not None:
        cli.trainer.callbacks.append(lightning_callback(measure))
    cli.trainer.callbacks.extend(callbacks)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return cli


def run_trl(args, sft_export: str, out: Path, measure: Measure, dm_rows) -> None:
    """trl's DPOTrainer, LoRA with its adapter-free reference, fed personalm's token ids (trl re-tokenizes
    text otherwise; the same ids make the same work)."""
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from personalm.models import LLAMA_TARGETS, load_tokenizer

    class IdsDPOTrainer(DPOTrainer):
        def _prepare_dataset(self, dataset, processing_class, args_, dataset_name):
            return dataset if "prompt_ids" in dataset.column_names else super()._prepare_dataset(
                dataset, processing_class, args_, dataset_name)

    pending = []

    class Timing(TrainerCallback):
        def on_train_begin(self, a, state, control, model=None, **kw):
            measure.train_start([(n, p) for n, p in model.named_parameters() if p.requires_grad])
            self.model = model

        def on_step_begin(self, a, state, control, **kw):
            measure.step_start()

        def on_step_end(self, a, state, control, **kw):
            measure.step_end(pending.pop(0) if pending else 0)

        def on_log(self, a, state, control, logs=None, **kw):
            if logs and "loss" in logs and not measure.losses:
                measure.losses.append(float(logs["loss"]))

        def on_train_end(self, a, state, control, **kw):
            measure.train_end([(n, p) for n, p in self.model.named_parameters() if p.requires_grad])

    cuda = torch.cuda.is_available()
    config = DPOConfig(
        output_dir=str(out / "trl"), max_steps=args.steps, per_device_train_batch_size=args.dpo_batch,
        learning_rate=1e-4, lr_scheduler_type="cosine", warmup_steps=0, optim="adamw_torch", max_grad_norm=1.0,
        beta=0.1, max_length=args.max_length, bf16=args.precision == "bf16-mixed", gradient_checkpointing=True,
        disable_dropout=True, use_cpu=not cuda, report_to="none", logging_steps=1, save_strategy="no",
        eval_strategy="no", disable_tqdm=True, seed=42, dataloader_num_workers=0)
    model = AutoModelForCausalLM.from_pretrained(sft_export, dtype=torch.bfloat16)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=LLAMA_TARGETS, task_type="CAUSAL_LM")
    trainer = IdsDPOTrainer(model=model, ref_model=None, args=config, train_dataset=dm_rows,
                            processing_class=load_tokenizer(sft_export), peft_config=lora, callbacks=[Timing()])
    collator = trainer.data_collator

    def collate(examples):
        batch = collator(examples)
        pending.append(int(batch["attention_mask"].sum()))
        return batch

    trainer.data_collator = collate
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # one dict a step on stdout
    trainer.train()


# ----------------------------------------------------------------------------------------------------


def build(args, out: Path) -> tuple[str, int]:
    """The random Llama (saved in bf16 with the embedded tokenizer) and the realistic-length rows."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from personalm.data import synthetic
    from personalm.models import load_tokenizer

    posts = {"train_pref": args.posts, "validation_pref": 2, "test_pref": 2}
    synthetic.write_dataset(out / "data", subsets=("finance",), n_posts=posts, lengths=synthetic.LengthModel())
    tok = load_tokenizer("embedded:tiny-llama")
    config = LlamaConfig(vocab_size=32000, max_position_embeddings=2048, pad_token_id=tok.pad_token_id,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=False,
                         **SIZES[args.size])
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    n_params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(out / "base")
    tok.save_pretrained(out / "base")
    del model
    return str(out / "base"), n_params


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="1b")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per run (the first --warmup untimed)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--sft-batch", type=int, default=8)
    parser.add_argument("--dpo-batch", type=int, default=4, help="pairs per step")
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--posts", type=int, default=40, help="training posts per community (6 pairs each)")
    parser.add_argument("--precision", default="bf16-mixed")
    parser.add_argument("--skip-full", action="store_true", help="no full fine-tuning run (FSDP2)")
    parser.add_argument("--skip-trl", action="store_true")
    parser.add_argument("--out", default=None, help="working folder (default: a temporary one)")
    parser.add_argument("--generation-prompts", type=int, default=None,
                        help="then benchmarks/generation_speed.py on the SFT export, HF against vLLM in bf16, this "
                             "many prompts of 128 new tokens (default: 128 on a GPU, none on a CPU)")
    parser.add_argument("--epoch-pairs", type=int, default=None,
                        help="then benchmarks/epoch_vs_trl.py, one epoch of this many pairs per run, in the run's "
                             "precision (default: 256 on a GPU; none on a CPU, where that script runs by itself)")
    parser.add_argument("--attention-pairs", type=int, default=4,
                        help="pairs for the attention section (benchmarks/attention_check.py; CUDA only; 0: none)")
    args = parser.parse_args(argv)

    import torch

    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name(0) if cuda else f"CPU ({platform.processor() or platform.machine()})"
    peak = bf16_peak(device) if cuda else None
    out = Path(args.out or tempfile.mkdtemp(prefix="gpu-check-"))
    out.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    base, n_params = build(args, out)
    print(f"[gpu_check] {device}; torch {torch.__version__}; model {args.size}: {n_params / 1e9:.3f}B parameters; "
          f"built in {time.perf_counter() - began:.0f} s", flush=True)
    accel = ["--trainer.accelerator=gpu" if cuda else "--trainer.accelerator=cpu"]
    results = {}
    lora = ['--model.init_args.lora={"r": 16, "alpha": 32, "dropout": 0.0}']

    m = Measure(args.warmup, cuda)
    sft = run_personalm("sft_lora", "sft.yaml", args, base, out, [*accel, *lora, "--model.init_args.lr=1e-4",
                        f"--data.batch_size={args.sft_batch}", f"--model.init_args.export_dir={out / 'sft_export'}"], m)
    results["personalm SFT, LoRA"] = m.result(n_params, False, peak)
    start = str(out / "sft_export")
    del sft

    m = Measure(args.warmup, cuda)
    dpo = run_personalm("dpo_lora", "dpo.yaml", args, start, out, [
        *accel, *lora, "--model.init_args.reference=adapters_off", "--model.init_args.sft_weight=0",
        "--model.init_args.lr=1e-4", f"--data.batch_size={args.dpo_batch}", "--model.init_args.export_dir="], m)
    results["personalm DPO, LoRA, adapters off"] = m.result(n_params, True, peak)
    rows = dpo.datamodule.splits["train_pref"].select_columns(["prompt_ids", "chosen_ids", "rejected_ids"])
    del dpo

    if not args.skip_trl:
        try:
            import trl
        except ImportError:
            print("[gpu_check] trl is not importable: its run is skipped", flush=True)
        else:
            m = Measure(args.warmup, cuda)
            run_trl(args, start, out, m, rows)
            results[f"trl {trl.__version__} DPOTrainer, LoRA, adapters off"] = m.result(n_params, True, peak)
    if not args.skip_full:
        m = Measure(args.warmup, cuda)
        run_personalm("dpo_full_fsdp2", "dpo.yaml", args, start, out, [
            *accel, "--model.init_args.reference=copy", "--model.init_args.sft_weight=0", "--model.init_args.lr=1e-6",
            f"--data.batch_size={args.dpo_batch}", "--model.init_args.export_dir="], m, strategy="fsdp2.yaml")
        results["personalm DPO, full fine-tuning, FSDP2"] = m.result(n_params, True, peak)
        # the same, the reference's root not resharded after its forward (as before issue 19)
        from personalm.training import reference

        short = argparse.Namespace(**{**vars(args), "steps": min(args.steps, args.warmup + 3)})
        m, kept = Measure(args.warmup, cuda), reference.reshard
        reference.reshard = lambda model: None
        try:
            run_personalm("dpo_full_fsdp2_no_reshard", "dpo.yaml", short, start, out, [
                *accel, "--model.init_args.reference=copy", "--model.init_args.sft_weight=0",
                "--model.init_args.lr=1e-6", f"--data.batch_size={args.dpo_batch}",
                "--model.init_args.export_dir="], m, strategy="fsdp2.yaml")
        finally:
            reference.reshard = kept
        results["personalm DPO, full fine-tuning, FSDP2, reference not resharded"] = m.result(n_params, True, peak)
    # host syncs per step of the paper's DPO recipe (LoRA), logging every 4th step (counted on CUDA only)
    counter = sync_counter(cuda)
    short = argparse.Namespace(**{**vars(args), "steps": 2 + 8})
    run_personalm("dpo_lora_syncs", "dpo.yaml", short, start, out, [
        *accel, *lora, "--model.init_args.reference=adapters_off", "--model.init_args.sft_weight=0",
        "--model.init_args.lr=1e-4", f"--data.batch_size={args.dpo_batch}", "--model.init_args.export_dir=",
        "--trainer.log_every_n_steps=4"], callbacks=[counter])
    syncs = counter.result(skip=2)
    print(f"[gpu_check] host syncs (torch.cuda.set_sync_debug_mode), DPO LoRA, {syncs['steps']} steps after 2: "
          f"{syncs['other_steps_total']} in all on the {syncs['steps'] - syncs['logging_steps']} steps between "
          f"logging steps (most in one: {syncs['other_steps_max']}); {syncs['logging_steps_mean']} per logging "
          f"step{'' if cuda else ' (not observable on a CPU: the run only checks the wiring)'}", flush=True)

    report(results, device, args, n_params, time.perf_counter() - began, peak)
    results["host syncs"] = syncs
    results["attention"] = attention(args, start, rows, cuda)
    prompts = args.generation_prompts if args.generation_prompts is not None else (128 if cuda else 0)
    if prompts:  # generation tokens/s, HF against vLLM (skipped, and said, where vLLM is not installed)
        import generation_speed

        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        print(f"\n[gpu_check] generation: benchmarks/generation_speed.py --models {start} --dtypes bfloat16 "
              f"--prompts {prompts} --new-tokens 128 --hf-batch 8", flush=True)
        speed = generation_speed.main(["--models", start, "--dtypes", "bfloat16", "--prompts", str(prompts),
                                       "--new-tokens", "128", "--hf-batch", "8"])
        results["generation"] = {" ".join(k): {x: y for x, y in v.items() if x != "ids"} for k, v in speed.items()}
    pairs = args.epoch_pairs if args.epoch_pairs is not None else (256 if cuda else 0)
    if pairs:  # the per-epoch comparison with trl (personalm's packed, prefix-shared rows), in this precision
        import epoch_vs_trl

        print(f"\n[gpu_check] one epoch against trl: benchmarks/epoch_vs_trl.py --pairs {pairs} --precision "
              f"{args.precision}", flush=True)
        results["epoch_vs_trl"] = epoch_vs_trl.main(["--pairs", str(pairs), "--precision", args.precision])
    (out / "gpu_check.json").write_text(json.dumps({"device": device, "size": args.size, "parameters": n_params,
                                                    "results": results}, indent=2))
    return results


def attention(args, model_dir: str, rows, cuda: bool) -> dict:
    """benchmarks/attention_check.py on the SFT export in fp32 and the DPO run's rows: the SDPA kernel that ran,
    FlexAttention against SDPA (gradients, time per step). On a CPU, skipped (no FlexAttention backward there)."""
    if not cuda or not args.attention_pairs:
        print("\n[gpu_check] attention: skipped (" + ("no CUDA; FlexAttention has no backward on a CPU, "
              "tests/training/test_attention.py compares its forward" if not cuda else "--attention-pairs 0") + ")")
        return {"skipped": True}
    import attention_check
    import torch
    from transformers import AutoModelForCausalLM

    gc.collect()
    torch.cuda.empty_cache()
    began = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).cuda()
    out = attention_check.check(model, [rows[i] for i in range(min(args.attention_pairs, len(rows)))], steps=3,
                                warmup=2, wide=4 * args.max_length)
    out["seconds"] = time.perf_counter() - began
    attention_check.report(out)
    del model
    return out


def report(results: dict, device: str, args, n_params: int, seconds: float, peak) -> None:
    def f(x, spec):
        return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)

    print(f"\n[gpu_check] {device}: Llama {args.size} ({n_params / 1e9:.3f}B, vocabulary 32000), {args.precision}, "
          f"gradient checkpointing, max length {args.max_length}, {args.steps} steps per run ({args.warmup} untimed); "
          f"bf16 peak {f(peak and peak / 1e12, '.0f')} TFLOP/s; {seconds:.0f} s in all")
    print("| run | tokens/s | s/step | MFU | peak GPU memory (GiB) | first loss | trainable changed |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        print(f"| {name} | {f(r['tokens_per_s'], '.0f')} | {f(r['s_per_step'], '.3f')} | {f(r['mfu'], '.1%')} | "
              f"{f(r['peak_gib'], '.1f')} | {f(r['first_loss'], '.4f')} | {f(r['changed'], '.1%')} of "
              f"{r['trainable']:,} |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
