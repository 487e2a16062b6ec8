"""One epoch of DPO and of SFT: personalm against trl, on the same pairs, model and batch in pairs.

    pip install trl            # benchmark-only extra; personalm itself never imports trl
    python benchmarks/epoch_vs_trl.py                                    # 2 models x 2 row shapes x 6 runs
    python benchmarks/epoch_vs_trl.py --models embedded --shapes demo --pairs 16    # a quick look

Models: ``embedded`` (the demo's tiny Llama, 1,024-token vocabulary) and ``llama32k`` (a Llama config of
~30M parameters, 32,000-token vocabulary, 1,024 positions, random weights under a fixed seed, with the
Mistral-7B SentencePiece tokenizer from the ``mistral-common`` wheel: real token counts); on request
``llama32k-deep`` (~125M parameters, 12 layers of width 768, the same vocabulary and tokenizer: the layers
outweigh the 32k-token head per token, as in a 7B model, where llama32k's head outweighs its 4 small layers).
Rows: ``demo`` (the embedded demo's short rows) and ``realistic`` (the synthetic generator's heavy-tailed lengths,
``personalm.data.synthetic.LengthModel``: log-normal post bodies of median 120 words, comments of median
40; prompt budget 512, sequence 1,024 tokens as in the paper).

Runs, each in a fresh process (peak RSS is that run's own, ``ru_maxrss``): personalm DPO and trl's
DPOTrainer with a live reference, both with precomputed reference log-probs, personalm SFT and trl's
SFTTrainer with ``padding_free`` (trl's packing that keeps a batch of N examples: the examples of a batch
concatenated into one row, attention kept apart by position ids; its ``packing`` mode instead regroups the
data into fixed-length rows, which changes what a step is). Both sides get personalm's token ids (trl's
own tokenization is bypassed), the same pairs in the same order (no shuffling), the same batch in pairs,
fp32, AdamW at lr 1e-5 (cosine, no warm-up), clipping at 1, dropout off, no evaluation, no checkpoints, no
logging backend, and the same ``torch.set_num_threads``. personalm runs with its defaults: prefix-shared
packed DPO rows, packed SFT rows, chunked log-probs; beside them, ``personalm DPO two spans``: the best peer
layout (OpenRLHF's and open-instruct's packed DPO: ``[prompt | chosen]`` and ``[prompt | rejected]`` as two
spans, the prompt run twice; ``data.pair_packing: two_spans``), the yardstick for prefix sharing. Timed: the
training epoch (first batch to last optimizer step); the reference precomputation apart. The loss of every step
is kept: the two sides' curves must agree, or the comparison is of different work.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from a checkout without installing personalm
for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(key, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

RUNS = ("personalm DPO", "personalm DPO two spans", "trl DPO", "personalm DPO precomputed", "trl DPO precomputed",
        "personalm SFT", "trl SFT")
OLD_PATH = ("personalm DPO old path", "personalm SFT old path")  # on request: no packing, no chunking
SHAPES = {"demo": dict(max_length=256, max_prompt_length=None),
          "realistic": dict(max_length=1024, max_prompt_length=512)}
LLAMA32K = dict(vocab_size=32000, hidden_size=384, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=6,
                num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=False)
LLAMA32K_DEEP = dict(LLAMA32K, hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                     num_key_value_heads=4)
CONFIGS = {"llama32k": LLAMA32K, "llama32k-deep": LLAMA32K_DEEP}
TAG = "EPOCH_RESULT "
LR = 1e-5


# ---------------------------------------------------------------------------------------------- inputs


def build_model(name: str, out: Path) -> str:
    if name == "embedded":
        return "embedded:tiny-llama"
    import mistral_common
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    spm = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
    (folder / "tokenizer.model").write_bytes(spm.read_bytes())
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
         "add_bos_token": True, "add_eos_token": False, "legacy": False, "model_max_length": 4096}))
    tok = AutoTokenizer.from_pretrained(folder)
    tok.save_pretrained(folder)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **CONFIGS[name]))
    model.save_pretrained(folder)
    return str(folder)


def build_rows(shape: str, pairs: int, out: Path) -> str:
    if shape == "demo":
        return "embedded:compred"
    from personalm.data import synthetic

    posts = {"train_pref": max(pairs // 2, 4), "validation_pref": 2, "test_pref": 2}
    return str(synthetic.write_dataset(out / "realistic", subsets=("finance",), n_posts=posts,
                                       lengths=synthetic.LengthModel()))


def datamodule(spec: dict, rows: str):
    from personalm.data.datamodule import ComPreDDataModule

    return ComPreDDataModule(dataset=spec["data"], subset="finance", rows=rows, tokenizer=spec["model"],
                             max_train_pairs=spec["pairs"], batch_size=spec["batch"], min_score_ratio=None,
                             **SHAPES[spec["shape"]])


class Clock:
    """The epoch's wall time and every step's loss, whoever trains."""

    def __init__(self):
        self.start = self.end = None
        self.losses: list[float] = []
        self.tokens = 0  # forwarded by the policy (personalm's runs)

    def result(self, **extra) -> dict:
        return {"epoch_s": self.end - self.start, "steps": len(self.losses), "losses": self.losses,
                "tokens": self.tokens, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                **extra}


# ---------------------------------------------------------------------------------------------- personalm


def run_personalm(spec: dict, dpo: bool, precompute: bool, tmp: Path, old_path: bool = False,
                  two_spans: bool = False) -> dict:
    import lightning.pytorch as L
    from torch.utils.data import DataLoader

    from personalm.training.dpo import DPOModule
    from personalm.training.sft import SFTModule

    clock, dm = Clock(), datamodule(spec, "preference" if dpo else "sft")

    class InOrder(type(dm)):  # the same order as trl's (no shuffling) for comparable loss curves
        def train_dataloader(self):
            loader = super().train_dataloader()
            return DataLoader(loader.dataset, batch_size=loader.batch_size, shuffle=False, collate_fn=loader.collate_fn)

    dm.__class__ = InOrder
    common = dict(model_name_or_path=spec["model"], lr=LR, weight_decay=0.0, warmup_steps=0, export_dir="")
    if old_path:  # two padded rows per pair, padded SFT rows, the model's own logits
        dm.hparams.pair_packing, dm.hparams.pack_sft = "none", False
        common["logprob_chunk"] = None
    if two_spans:  # the peer design: [prompt | chosen] and [prompt | rejected] packed apart, the prompt run twice
        dm.hparams.pair_packing = "two_spans"
    module = DPOModule(beta=0.1, precompute_reference=precompute, reference_cache=str(tmp / "cache"),
                       disable_dropout=True, **common) if dpo else SFTModule(**common)

    class Timing(L.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            clock.start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            clock.losses.append(float(outputs["loss"] if isinstance(outputs, dict) else outputs))
            clock.tokens += batch["packed"]["tokens"] if "packed" in batch else int(batch["attention_mask"].sum())

        def on_train_epoch_end(self, trainer, pl_module):
            clock.end = time.perf_counter()

    trainer = L.Trainer(accelerator="auto", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, gradient_clip_val=1.0, precision=spec["precision"],
                        default_root_dir=str(tmp / "pl"), callbacks=[Timing()])
    trainer.fit(module, datamodule=dm)
    seconds = module.precomputed.seconds if dpo else {}
    return clock.result(precompute_s=sum(seconds.values()) if precompute else None, pairs=len(dm.splits["train_pref"]))


# ---------------------------------------------------------------------------------------------- trl


def run_trl(spec: dict, dpo: bool, precompute: bool, tmp: Path) -> dict:
    import torch
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback

    from personalm.models import load_causal_lm, load_tokenizer

    clock, dm = Clock(), datamodule(spec, "preference" if dpo else "sft")
    dm.setup("fit")
    rows = dm.splits["train_pref"]
    tokenizer = load_tokenizer(spec["model"])
    cuda = torch.cuda.is_available()
    common = dict(output_dir=str(tmp / "trl"), num_train_epochs=1, per_device_train_batch_size=spec["batch"],
                  learning_rate=LR, lr_scheduler_type="cosine", warmup_steps=0, weight_decay=0.0, optim="adamw_torch",
                  max_grad_norm=1.0, bf16=spec["precision"] == "bf16-mixed", gradient_checkpointing=False,
                  use_cpu=not cuda, dataloader_num_workers=0, report_to="none", logging_strategy="no",
                  save_strategy="no", eval_strategy="no", disable_tqdm=True, seed=42)

    class Timing(TrainerCallback):
        def on_epoch_begin(self, a, state, control, **kw):
            clock.start = time.perf_counter()

        def on_epoch_end(self, a, state, control, **kw):
            clock.end = time.perf_counter()

    if dpo:
        from trl import DPOConfig, DPOTrainer

        class IdsDPOTrainer(DPOTrainer):
            precompute_s = 0.0

            def _prepare_dataset(self, dataset, *a, **k):  # personalm's token ids as they are
                return dataset

            def _get_train_sampler(self, *a, **k):
                return torch.utils.data.SequentialSampler(self.train_dataset)

            def _precompute_ref_logps(self, *a, **k):
                t = time.perf_counter()
                try:
                    return super()._precompute_ref_logps(*a, **k)
                finally:
                    self.precompute_s += time.perf_counter() - t

            def training_step(self, *a, **k):
                loss = super().training_step(*a, **k)
                clock.losses.append(float(loss))
                return loss

        train = rows.select_columns(["prompt_ids", "chosen_ids", "rejected_ids"],
                                    new_fingerprint=f"epoch-vs-trl-{os.getpid()}-{time.time_ns()}")  # no stale cache
        config = DPOConfig(beta=0.1, loss_type=["sigmoid"], max_length=None, precompute_ref_log_probs=precompute,
                           disable_dropout=True, **common)
        model = load_causal_lm(spec["model"])
        ref = None if precompute else load_causal_lm(spec["model"])
        trainer = IdsDPOTrainer(model=model, ref_model=ref, args=config, train_dataset=train,
                                processing_class=tokenizer, callbacks=[Timing()])
    else:
        from trl import SFTConfig, SFTTrainer

        class IdsSFTTrainer(SFTTrainer):
            def _prepare_dataset(self, dataset, *a, **k):
                return dataset

            def _get_train_sampler(self, *a, **k):
                return torch.utils.data.SequentialSampler(self.train_dataset)

            def training_step(self, *a, **k):
                loss = super().training_step(*a, **k)
                clock.losses.append(float(loss))
                return loss

        train = rows.map(lambda r: {"input_ids": r["prompt_ids"] + r["chosen_ids"],  # its collator takes labels
                                    "labels": [-100] * len(r["prompt_ids"]) + r["chosen_ids"]},  # as given
                         remove_columns=rows.column_names)
        config = SFTConfig(padding_free=True, completion_only_loss=True, max_length=None, **common)
        trainer = IdsSFTTrainer(model=load_causal_lm(spec["model"]), args=config, train_dataset=train,
                                processing_class=tokenizer, callbacks=[Timing()])
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    return clock.result(precompute_s=getattr(trainer, "precompute_s", None) if precompute else None, pairs=len(rows))


# ---------------------------------------------------------------------------------------------- parent


def child(spec: dict) -> None:
    import torch

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    run = spec["run"]
    with tempfile.TemporaryDirectory() as tmp:
        if run.startswith("personalm"):
            out = run_personalm(spec, "DPO" in run, "precomputed" in run, Path(tmp), old_path=run in OLD_PATH,
                                two_spans="two spans" in run)
        else:
            out = run_trl(spec, "DPO" in run, "precomputed" in run, Path(tmp))
    print(TAG + json.dumps(out), flush=True)


def measure(spec: dict) -> dict:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                          env=env)
    found = [line for line in proc.stdout.splitlines() if line.startswith(TAG)]
    if proc.returncode != 0 or not found:
        raise RuntimeError(f"{spec['run']} failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n"
                           f"{proc.stderr[-4000:]}")
    return json.loads(found[-1][len(TAG):])


def ratio(a: float, b: float) -> str:
    return f"x{a / b:.2f}" if a and b else "-"


def report(model: str, shape: str, results: dict) -> None:
    print(f"\n### {model} model, {shape} rows: {next(iter(results.values()))['pairs']} pairs, one epoch\n")
    print("| run | epoch (s) | + precompute (s) | steps | first / last loss | peak RSS (MB) | personalm vs trl |")
    print("|---|---:|---:|---:|---|---:|---|")
    for run, r in results.items():
        peer = results.get(run.replace("personalm", "trl").replace(" old path", "").replace(" two spans", "")) \
            if run.startswith("personalm") else None
        vs = ""
        if peer:
            vs = (f"epoch {ratio(peer['epoch_s'], r['epoch_s'])} faster, "
                  f"RSS x{r['peak_rss_mb'] / peer['peak_rss_mb']:.2f}")
            if r["precompute_s"] is not None:
                total, peer_total = r["epoch_s"] + r["precompute_s"], peer["epoch_s"] + peer["precompute_s"]
                vs += f", with precompute {ratio(peer_total, total)}"
        pre = f"{r['precompute_s']:.1f}" if r["precompute_s"] is not None else "-"
        print(f"| {run} | {r['epoch_s']:.1f} | {pre} | {r['steps']} | {r['losses'][0]:.4f} / {r['losses'][-1]:.4f} "
              f"| {r['peak_rss_mb']:.0f} | {vs} |")
    for a, b in (("personalm DPO", "trl DPO"), ("personalm DPO precomputed", "trl DPO precomputed"),
                 ("personalm SFT", "trl SFT")):
        if a in results and b in results:
            la, lb = results[a]["losses"], results[b]["losses"]
            gap = max(abs(x - y) for x, y in zip(la, lb)) if len(la) == len(lb) else float("nan")
            print(f"- {a} vs {b}: {len(la)} / {len(lb)} steps, largest per-step loss difference {gap:.2e}")
    shared, apart = results.get("personalm DPO"), results.get("personalm DPO two spans")
    if shared and apart:  # the yardstick: the best peer layout, on the same pairs and batches
        gap = max(abs(x - y) for x, y in zip(shared["losses"], apart["losses"]))
        print(f"- prefix-shared vs two spans per pair (both packed, each at its default budget): epoch "
              f"{ratio(apart['epoch_s'], shared['epoch_s'])} faster, policy tokens forwarded "
              f"{ratio(apart['tokens'], shared['tokens'])} fewer; largest per-step loss difference {gap:.2e}")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="embedded,llama32k")
    p.add_argument("--shapes", default="demo,realistic")
    p.add_argument("--runs", default=",".join(RUNS), help="a comma-separated subset of: " + ", ".join(RUNS + OLD_PATH))
    p.add_argument("--pairs", type=int, default=64, help="training pairs (one epoch)")
    p.add_argument("--batch", type=int, default=8, help="pairs (SFT: examples) per optimizer step")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--precision", default="32-true", help="bf16-mixed on a GPU")
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(json.loads(args.child))
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    unknown = set(runs) - set(RUNS + OLD_PATH)
    if unknown:
        raise SystemExit(f"unknown runs {sorted(unknown)}; choose from {list(RUNS + OLD_PATH)}")
    import lightning
    import torch
    import transformers
    try:
        import trl
        trl_version = trl.__version__
    except ImportError:
        trl_version = None
        runs = [r for r in runs if not r.startswith("trl")]
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, lightning {lightning.__version__}, "
          f"trl {trl_version or 'not installed (its runs skipped)'}; {args.threads} threads, {args.precision}, "
          f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'}")
    start, everything = time.perf_counter(), {}
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models.split(","):
            path = build_model(model, Path(tmp))
            for shape in args.shapes.split(","):
                data = build_rows(shape, args.pairs, Path(tmp) / model)
                results = {}
                for run in runs:
                    spec = dict(run=run, model=path, data=data, shape=shape, pairs=args.pairs, batch=args.batch,
                                threads=args.threads, precision=args.precision)
                    results[run] = measure(spec)
                report(model, shape, results)
                everything[f"{model}/{shape}"] = results
    print(f"\n{time.perf_counter() - start:.0f} s in all")
    if args.out:
        Path(args.out).write_text(json.dumps(everything, indent=1))
    return everything


if __name__ == "__main__":
    main()
