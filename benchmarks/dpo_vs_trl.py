"""DPO training throughput and memory: personalm's DPOModule against trl's DPOTrainer, CPU.

    pip install trl            # benchmark-only extra; personalm itself never imports trl
    python benchmarks/dpo_vs_trl.py [--warmup 10] [--steps 100] [--profile-steps 20] [--threads 2]

Both sides train the same model (``embedded:tiny-llama``: weights initialised from its config under a
fixed seed) on the same tokens (``embedded:compred``, subset ``finance``, preference rows prepared by
``ComPreDDataModule(max_length=128)``; trl gets those token ids as they are, not re-tokenized text),
8 pairs per step, in the same order (no shuffling unless ``--shuffle``), with the same settings:
sigmoid loss, beta 0.1, AdamW (torch, not fused), lr 1e-4 with cosine decay and no warm-up, gradient
clipping at norm 1, fp32, no gradient checkpointing, dropout off, no evaluation, no logging backend,
no checkpoints, ``dataloader_num_workers=0`` and the same ``torch.set_num_threads`` (default 1, with
``OMP_WAIT_POLICY=PASSIVE`` unless set: on a small shared machine, spinning OpenMP threads made 2 threads
~20x slower than 1 while another process was busy).

Four runs, each in its own fresh process (so peak RSS is that run's own):
trl and personalm with a separate frozen reference model scored on the fly, and trl and personalm
with reference log-probs precomputed before training (that time is setup, reported apart).

Each run trains ``warmup + steps + profile-steps`` optimizer steps. Timed: the ``steps`` after the
``warmup``, from the end of step ``warmup`` to the end of step ``warmup + steps`` (data loading,
callbacks and the framework's loop included: the real steps/s), with the time inside steps
(step begin -> step end) beside it. Tokens are the non-padding tokens of the 2 x 8 sequences
(prompt + chosen, prompt + rejected) of each timed step. Memory: RSS when setup is done (just
before the first step), the peak RSS of training alone (the peak counter is reset at that point
through /proc/self/clear_refs), and the process's peak RSS over setup and training
(``getrusage(RUSAGE_SELF).ru_maxrss``). The last ``profile-steps`` steps are timed per phase
(data, forward policy / reference, rest of the step function, backward, clipping, optimizer, ...)
to show where a step goes; those wrappers are off during the timed steps.
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROCESS_T0 = time.perf_counter()  # setup time counts from here (heavy imports included)
SIDES = ("trl", "personalm", "trl-precompute", "personalm-precompute")
RESULT_TAG = "BENCH_RESULT "
REPO = Path(__file__).resolve().parent.parent

# --------------------------------------------------------------------------------------------------
# Process-level measurements


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def reset_peak() -> bool:
    """Reset this process's peak RSS (VmHWM and ru_maxrss) to its current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# --------------------------------------------------------------------------------------------------
# Phase timer for the profile window: exclusive wall time per phase (nested phases are subtracted
# from the phase that contains them, e.g. Lightning runs training_step and backward inside
# optimizer.step's closure).

PHASES = (
    "data: fetch rows",
    "data: collate",
    "forward policy",
    "forward reference",
    "rest of step fn (log-probs, loss, metrics, logging)",
    "backward",
    "grad clipping",
    "optimizer step",
    "zero_grad",
    "lr scheduler",
)
OTHER = "framework loop / callbacks (rest)"


class PhaseTimer:
    def __init__(self):
        self.enabled = False
        self.stack: list[list] = []
        self.totals: dict[str, float] = collections.defaultdict(float)
        self.calls: dict[str, int] = collections.defaultdict(int)

    def enter(self, name: str):
        if not self.enabled:
            return None
        entry = [name, time.perf_counter(), 0.0]
        self.stack.append(entry)
        return entry

    def exit(self, entry) -> None:
        if entry is None or not self.stack or self.stack[-1] is not entry:
            return
        self.stack.pop()
        elapsed = time.perf_counter() - entry[1]
        self.totals[entry[0]] += elapsed - entry[2]
        self.calls[entry[0]] += 1
        if self.stack:
            self.stack[-1][2] += elapsed

    def wrap(self, name, fn):
        timer = self

        def timed(*args, **kwargs):
            entry = timer.enter(name(*args) if callable(name) else name)
            try:
                return fn(*args, **kwargs)
            finally:
                timer.exit(entry)

        timed.__wrapped__ = fn
        return timed


TIMER = PhaseTimer()


def install_phase_hooks(model_classes) -> None:
    """Class-level wrappers shared by both sides (inactive until TIMER.enabled)."""
    import datasets
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    for cls in model_classes:  # model(...) -> nn.Module.__call__; reference calls run without grad
        cls.__call__ = TIMER.wrap(lambda *a: "forward policy" if torch.is_grad_enabled() else "forward reference",
                                  torch.nn.Module.__call__)
    torch.Tensor.backward = TIMER.wrap("backward", torch.Tensor.backward)
    torch.nn.utils.clip_grad_norm_ = TIMER.wrap("grad clipping", torch.nn.utils.clip_grad_norm_)
    torch.optim.Optimizer.zero_grad = TIMER.wrap("zero_grad", torch.optim.Optimizer.zero_grad)
    torch.nn.Module.zero_grad = TIMER.wrap("zero_grad", torch.nn.Module.zero_grad)
    torch.optim.lr_scheduler.LRScheduler.step = TIMER.wrap("lr scheduler", torch.optim.lr_scheduler.LRScheduler.step)
    datasets.Dataset.__getitems__ = TIMER.wrap("data: fetch rows", datasets.Dataset.__getitems__)
    open_steps: dict[int, object] = {}

    def pre(opt, args, kwargs):
        open_steps[id(opt)] = TIMER.enter("optimizer step")

    def post(opt, args, kwargs):
        TIMER.exit(open_steps.pop(id(opt), None))

    register_optimizer_step_pre_hook(pre)
    register_optimizer_step_post_hook(post)


class Recorder:
    """Step timing, tokens, losses and memory; driven by either framework's step begin/end hooks."""

    def __init__(self, warmup: int, steps: int, profile_steps: int, torch_profile_steps: int):
        self.w, self.n, self.p, self.tp = warmup, steps, profile_steps, torch_profile_steps
        self.done = 0
        self.step_start = None
        self.in_step = 0.0
        self.tokens = 0
        self.padded = 0
        self.losses: list = []
        self.t0 = self.t1 = self.tp1 = self.c0 = self.c1 = None
        self.setup_seconds = None
        self.threads = None
        self.rss_setup = self.peak_setup = self.rss_warm = self.train_peak = self.rss_end = None
        self.peak_reset = False
        self.torch_prof = None
        self.torch_table = None

    def begin(self, tokens: int, padded: int) -> None:
        import torch

        if self.done == 0:
            self.setup_seconds = time.perf_counter() - PROCESS_T0
            self.threads = torch.get_num_threads()
            self.rss_setup, self.peak_setup = rss_mb(), peak_mb()
            self.peak_reset = reset_peak()
        if self.w <= self.done < self.w + self.n:
            self.tokens += tokens
            self.padded += padded
        self.step_start = time.perf_counter()

    def end(self, loss) -> None:
        now = time.perf_counter()
        if self.w <= self.done < self.w + self.n:
            self.in_step += now - self.step_start
        self.done += 1
        if loss is not None:
            self.losses.append(loss)
        if self.done == self.w:
            self.t0, self.c0 = now, time.process_time()
            self.rss_warm = rss_mb()
        if self.done == self.w + self.n:
            self.t1, self.c1 = now, time.process_time()
            self.train_peak = peak_mb()
            self.rss_end = rss_mb()
            TIMER.enabled = self.p > 0
        if self.done == self.w + self.n + self.p:
            self.tp1 = time.perf_counter()
            TIMER.enabled = False
            if self.tp:
                import torch.profiler

                self.torch_prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
                self.torch_prof.start()
        if self.done == self.w + self.n + self.p + self.tp and self.torch_prof is not None:
            self.torch_prof.stop()
            self.torch_table = self.torch_prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
            self.torch_prof = None

    def result(self, side: str, extra: dict) -> dict:
        if self.t1 is None:
            raise RuntimeError(f"{side}: only {self.done} of {self.w + self.n} steps ran")
        seconds = self.t1 - self.t0
        losses = [float(x) for x in self.losses]
        prof_seconds = (self.tp1 - self.t1) if self.p and self.tp1 else None
        phases = dict(TIMER.totals)
        if prof_seconds:
            phases[OTHER] = prof_seconds - sum(phases.values())
        return {
            "side": side, "steps": self.n, "warmup": self.w, "seconds": seconds, "in_step_seconds": self.in_step,
            "cpu_seconds": self.c1 - self.c0, "cpu_steps_per_s": self.n / (self.c1 - self.c0),
            "steps_per_s": self.n / seconds, "tokens": self.tokens, "padded_tokens": self.padded,
            "tokens_per_s": self.tokens / seconds, "threads": self.threads, "setup_seconds": self.setup_seconds,
            "rss_after_setup_mb": self.rss_setup, "rss_after_warmup_mb": self.rss_warm, "rss_end_mb": self.rss_end,
            "peak_setup_mb": self.peak_setup, "train_peak_mb": self.train_peak if self.peak_reset else None,
            "peak_rss_mb": max(self.peak_setup, self.train_peak) if self.peak_reset else self.train_peak,
            "first_loss": losses[0] if losses else None,
            "loss_at_end_of_timed_steps": losses[self.w + self.n - 1] if len(losses) >= self.w + self.n else None,
            "profile_steps": self.p, "profile_seconds": prof_seconds, "phases": phases,
            "phase_calls": dict(TIMER.calls), "torch_profile": self.torch_table,
            "load_average_1min": os.getloadavg()[0], **extra,
        }


# --------------------------------------------------------------------------------------------------
# Shared data


def load_pairs(args):
    """The preference rows both sides train on (personalm's preparation, token ids included)."""
    from personalm.data.datamodule import ComPreDDataModule

    dm = ComPreDDataModule(dataset="embedded:compred", subset="finance", rows="preference",
                           max_length=args.max_length, batch_size=args.batch_size)
    dm.setup("fit")
    return dm, dm.splits["train_pref"]


def longest(ds) -> int:
    return max(len(p) + max(len(c), len(r)) for p, c, r in zip(ds["prompt_ids"], ds["chosen_ids"], ds["rejected_ids"]))


def check_trl_tokenization(ds, tokenizer) -> dict:
    """How trl would tokenize the same rows from text (prompt string + chosen/rejected strings)."""
    from trl.data_utils import common_prefix_length

    from personalm.data.prompt import format_prompt

    same = diff = 0
    for row in ds:
        prompt = format_prompt(row["prompt_community"], row["title"], row["post"])
        p = tokenizer(prompt)["input_ids"]
        pc = tokenizer(prompt + row["chosen"] + tokenizer.eos_token)["input_ids"]
        pr = tokenizer(prompt + row["rejected"] + tokenizer.eos_token)["input_ids"]
        n = min(common_prefix_length(p, pc), common_prefix_length(p, pr))
        ok = (p[:n] == row["prompt_ids"] and pc[n:] == row["chosen_ids"] and pr[n:] == row["rejected_ids"])
        same, diff = same + ok, diff + (not ok)
    return {"trl_text_tokenization_identical_rows": same, "trl_text_tokenization_different_rows": diff}


# --------------------------------------------------------------------------------------------------
# trl side


def run_trl(args, precompute: bool, tmp: Path) -> dict:
    import torch
    from transformers import LlamaForCausalLM, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from personalm.models import load_causal_lm, load_tokenizer

    install_phase_hooks([LlamaForCausalLM])
    rec = Recorder(args.warmup, args.steps, args.profile_steps, args.torch_profile_steps)
    dm, ds = load_pairs(args)
    extra = {"longest_sequence": longest(ds), "rows": len(ds)}
    tokenizer = load_tokenizer("embedded:tiny-llama")
    if args.check_tokenization:
        extra.update(check_trl_tokenization(ds, tokenizer))
    # A fingerprint of this run's own: trl caches precomputed reference log-probs next to the dataset's cache
    # files under it, and an earlier run's cache would turn the precomputation into a file read.
    train = ds.select_columns(["prompt_ids", "chosen_ids", "rejected_ids"],
                              new_fingerprint=f"dpo-vs-trl-{os.getpid()}-{time.time_ns()}")
    pending = collections.deque()

    class BenchDPOTrainer(DPOTrainer):
        """Stock DPOTrainer, fed personalm's token ids as they are (trl 1.x always re-tokenizes text)."""

        precompute_seconds = 0.0

        def _prepare_dataset(self, dataset, processing_class, args_, dataset_name):
            if "prompt_ids" in dataset.column_names:
                return dataset
            return super()._prepare_dataset(dataset, processing_class, args_, dataset_name)

        def _get_train_sampler(self, train_dataset=None):
            if args.shuffle:
                return super()._get_train_sampler(train_dataset)
            data = train_dataset if train_dataset is not None else self.train_dataset
            return torch.utils.data.SequentialSampler(data)

        def _precompute_ref_logps(self, *a, **k):
            t = time.perf_counter()
            try:
                return super()._precompute_ref_logps(*a, **k)
            finally:
                self.precompute_seconds += time.perf_counter() - t

        def compute_loss(self, *a, **k):
            entry = TIMER.enter(PHASES[4])
            try:
                return super().compute_loss(*a, **k)
            finally:
                TIMER.exit(entry)

        def training_step(self, *a, **k):
            loss = super().training_step(*a, **k)
            rec.losses.append(loss.detach())
            return loss

    class Timing(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            tokens, padded = pending.popleft()
            rec.begin(tokens, padded)

        def on_step_end(self, a, state, control, **kw):
            rec.end(None)

    total = args.warmup + args.steps + args.profile_steps + args.torch_profile_steps
    config = DPOConfig(
        output_dir=str(tmp / "trl-out"), max_steps=total, per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1, learning_rate=args.lr, lr_scheduler_type="cosine", warmup_steps=0,
        weight_decay=0.0, optim="adamw_torch", max_grad_norm=1.0, beta=0.1, loss_type=["sigmoid"],
        max_length=args.max_length, precompute_ref_log_probs=precompute, disable_dropout=True,
        gradient_checkpointing=False, bf16=False, fp16=False, use_cpu=True, dataloader_num_workers=0,
        dataloader_pin_memory=False, report_to="none", logging_strategy="no", save_strategy="no",
        eval_strategy="no", disable_tqdm=True, seed=args.seed,
    )
    model = load_causal_lm("embedded:tiny-llama")
    ref = None if precompute else load_causal_lm("embedded:tiny-llama")
    trainer = BenchDPOTrainer(model=model, ref_model=ref, args=config, train_dataset=train,
                              processing_class=tokenizer, callbacks=[Timing()])
    collator = trainer.data_collator

    def collate(examples):
        entry = TIMER.enter(PHASES[1])
        try:
            batch = collator(examples)
        finally:
            TIMER.exit(entry)
        mask = batch["attention_mask"]
        pending.append((int(mask.sum()), mask.numel()))
        return batch

    trainer.data_collator = collate
    trainer.train()
    extra.update(precompute_seconds=trainer.precompute_seconds if precompute else None,
                 reference_in_memory=trainer.ref_model is not None,
                 optimizer=type(trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer")
                                else trainer.optimizer).__name__)
    return rec.result("trl-precompute" if precompute else "trl", extra)


# --------------------------------------------------------------------------------------------------
# personalm side


def run_personalm(args, precompute: bool, tmp: Path) -> dict:
    import lightning.pytorch as L
    from torch.utils.data import DataLoader
    from transformers import LlamaForCausalLM

    from personalm.data.datamodule import ComPreDDataModule
    from personalm.dpo import DPOModule

    install_phase_hooks([LlamaForCausalLM])
    rec = Recorder(args.warmup, args.steps, args.profile_steps, args.torch_profile_steps)
    L.seed_everything(args.seed, verbose=False)

    class BenchDataModule(ComPreDDataModule):
        def train_dataloader(self):
            loader = super().train_dataloader()
            collate = loader.collate_fn

            def timed_collate(rows):
                entry = TIMER.enter(PHASES[1])
                try:
                    return collate(rows)
                finally:
                    TIMER.exit(entry)

            return DataLoader(loader.dataset, batch_size=loader.batch_size, shuffle=args.shuffle,
                              collate_fn=timed_collate, num_workers=loader.num_workers)

    DPOModule.training_step = TIMER.wrap(PHASES[4], DPOModule.training_step)

    wanted = dict(model_name_or_path="embedded:tiny-llama", beta=0.1, loss_type="sigmoid", lr=args.lr,
                  weight_decay=0.0, warmup_steps=0, precompute_reference=precompute,
                  reference_cache=str(tmp / f"reference-cache-{os.getpid()}"), disable_dropout=True, export_dir="")
    module = DPOModule(**wanted)
    dm = BenchDataModule(dataset="embedded:compred", subset="finance", rows="preference",
                         max_length=args.max_length, batch_size=args.batch_size)

    class Timing(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            mask = batch["attention_mask"]
            rec.begin(int(mask.sum()), mask.numel())

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            rec.end(loss.detach() if loss is not None else None)

    total = args.warmup + args.steps + args.profile_steps + args.torch_profile_steps
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=total, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, gradient_clip_val=1.0, default_root_dir=str(tmp / "pl-out"),
                        callbacks=[Timing()])
    trainer.fit(module, datamodule=dm)
    ds = dm.splits["train_pref"]
    optimizer = trainer.optimizers[0]
    extra = {"longest_sequence": longest(ds), "rows": len(ds),
             "precompute_seconds": sum(module.precomputed.seconds.values()) if precompute else None,
             "precompute_seconds_by_stage": dict(module.precomputed.seconds) if precompute else None,
             "reference_in_memory": module.reference.loaded,
             "optimizer": type(optimizer).__name__}
    return rec.result("personalm-precompute" if precompute else "personalm", extra)


# --------------------------------------------------------------------------------------------------
# Parent: one fresh process per side, then the report


def child(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    tmp = Path(os.environ["PERSONALM_CACHE"])
    side = args.child
    if side == "prepare":
        _, ds = load_pairs(args)
        result = {"side": "prepare", "rows": len(ds), "longest_sequence": longest(ds)}
    elif side.startswith("trl"):
        result = run_trl(args, side.endswith("precompute"), tmp)
    else:
        result = run_personalm(args, side.endswith("precompute"), tmp)
    print(RESULT_TAG + json.dumps(result), flush=True)


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "transformers", "lightning", "trl", "accelerate", "datasets"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def run_side(side: str, args, env: dict, argv: list[str]) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", side, *argv]
    proc = subprocess.run(cmd, env=env, cwd=str(REPO), capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_TAG)]
    if proc.returncode != 0 or not lines:
        tail = "\n".join((proc.stdout + "\n" + proc.stderr).strip().splitlines()[-40:])
        raise SystemExit(f"{side} failed (exit {proc.returncode}); last output:\n{tail}")
    if args.verbose:
        print(proc.stderr)
    return json.loads(lines[-1][len(RESULT_TAG):])


def fmt(x, spec=".1f"):
    return "-" if x is None else format(x, spec)


def report(results: dict, args, info: dict) -> None:
    v = info["versions"]
    print(f"\nDPO on CPU: personalm DPOModule vs trl DPOTrainer ({time.strftime('%Y-%m-%d %H:%M')})")
    print("versions: " + ", ".join(f"{k} {val}" for k, val in v.items()) + f"; python {sys.version.split()[0]}")
    print(f"model embedded:tiny-llama ({info.get('params', '?')} params), data embedded:compred/finance "
          f"train_pref: {info['rows']} pairs, longest prompt+response {info['longest']} tokens (max_length "
          f"{args.max_length}: " + ("nothing truncated)" if info["longest"] <= args.max_length else
                                    "personalm shortened some rows at preparation; both sides see the same ids)"))
    print(f"batch {args.batch_size} pairs (= {2 * args.batch_size} sequences), {args.warmup} warm-up + "
          f"{args.steps} timed steps (+ {args.profile_steps} profiled), threads {args.threads}, "
          f"{'shuffled' if args.shuffle else 'same order on both sides (no shuffle)'}, median of "
          f"{args.repeat} run(s) per side, each side in a fresh process")
    busy = info["load_before"] > 0.5 or any(r["load_average_1min"] > args.threads + 0.75 for r in results.values())
    print(f"machine: {os.cpu_count()} CPUs, OMP_WAIT_POLICY={info['omp_wait_policy']}, 1-min load average "
          f"{info['load_before']:.2f} before the runs, " + ", ".join(
              f"{s} {r['load_average_1min']:.2f}" for s, r in results.items()) + " at the end of each timed run"
          + (" (busy: other processes shared the CPUs; treat the figures with care)" if busy else "") + "\n")
    head = (f"{'side':<22}{'steps/s':>9}{'tokens/s':>10}{'ms/step':>9}{'in-step':>9}{'CPU ms':>8}{'setup s':>9}"
            f"{'precomp s':>10}{'RSS setup':>11}{'train peak':>11}{'increment':>11}{'peak RSS':>10}")
    print(head)
    print("-" * len(head))
    for side, r in results.items():
        inc = None if r["train_peak_mb"] is None else r["train_peak_mb"] - r["rss_after_setup_mb"]
        print(f"{side:<22}{r['steps_per_s']:>9.2f}{r['tokens_per_s']:>10.0f}{1000 * r['seconds'] / r['steps']:>9.1f}"
              f"{1000 * r['in_step_seconds'] / r['steps']:>9.1f}{1000 * r['cpu_seconds'] / r['steps']:>8.1f}"
              f"{r['setup_seconds']:>9.1f}"
              f"{fmt(r['precompute_seconds'], '.2f'):>10}{r['rss_after_setup_mb']:>9.0f}MB"
              f"{fmt(r['train_peak_mb'], '.0f'):>9}MB{fmt(inc, '+.0f'):>9}MB{r['peak_rss_mb']:>8.0f}MB")
    print("\n(ms/step: timed loop wall time per step; in-step: step begin -> end only; CPU ms: process CPU time per "
          "step over the timed loop (less sensitive to other processes than wall time); setup s: process start "
          "(imports included) -> step 1; precomp s: reference log-probs precomputation, part of setup; "
          "RSS setup: RSS just "
          "before step 1; train peak: peak RSS from step 1 to the last timed step; increment = train peak - "
          "RSS setup; peak RSS: ru_maxrss of the whole process, setup included)")

    print("\nratios personalm / trl (steps/s and tokens/s: > 1 means personalm is faster; memory: < 1 means "
          "personalm uses less)")
    for mode in ("", "-precompute"):
        p, t = results.get("personalm" + mode), results.get("trl" + mode)
        if not p or not t:
            continue
        label = "precomputed reference" if mode else "reference model on the fly"
        inc_p = None if p["train_peak_mb"] is None else p["train_peak_mb"] - p["rss_after_setup_mb"]
        inc_t = None if t["train_peak_mb"] is None else t["train_peak_mb"] - t["rss_after_setup_mb"]
        inc_ratio = inc_p / inc_t if inc_p is not None and inc_t else None
        same = "same tokens" if p["tokens"] == t["tokens"] else f"tokens differ ({p['tokens']} vs {t['tokens']})"
        print(f"  {label:<28} steps/s x{p['steps_per_s'] / t['steps_per_s']:.2f}   steps per CPU-second "
              f"x{p['cpu_steps_per_s'] / t['cpu_steps_per_s']:.2f}   tokens/s "
              f"x{p['tokens_per_s'] / t['tokens_per_s']:.2f}   peak RSS x{p['peak_rss_mb'] / t['peak_rss_mb']:.2f}   "
              f"RSS setup x{p['rss_after_setup_mb'] / t['rss_after_setup_mb']:.2f}   training increment "
              f"x{fmt(inc_ratio, '.2f')}   [{same}]")

    print("\nsanity (same init, same batches, same optimizer settings: losses should agree)")
    for side, r in results.items():
        print(f"  {side:<22} first loss {fmt(r['first_loss'], '.5f')} (ln 2 = 0.69315)   loss at step "
              f"{r['warmup'] + r['steps']} {fmt(r['loss_at_end_of_timed_steps'], '.5f')}   tokens in timed steps "
              f"{r['tokens']} of {r['padded_tokens']} padded   threads {r['threads']}   optimizer {r['optimizer']}   "
              f"reference model kept in memory: {r['reference_in_memory']}")
    for mode in ("", "-precompute"):
        p, t = results.get("personalm" + mode), results.get("trl" + mode)
        if p and t and p["first_loss"] is not None and t["first_loss"] is not None:
            d_end = (abs(p["loss_at_end_of_timed_steps"] - t["loss_at_end_of_timed_steps"])
                     if p["loss_at_end_of_timed_steps"] is not None and t["loss_at_end_of_timed_steps"] is not None
                     else None)
            first = abs(p['first_loss'] - t['first_loss'])
            print(f"  personalm{mode} vs trl{mode}: |loss difference| at step 1 {first:.1e}, "
                  f"at step {p['warmup'] + p['steps']} {fmt(d_end, '.1e')}")
    for side, r in results.items():
        if r.get("precompute_seconds_by_stage"):
            print(f"  {side} precompute by split (s): " + ", ".join(
                f"{k} {v:.2f}" for k, v in r["precompute_seconds_by_stage"].items())
                  + " (personalm also scores the validation split at fit start; trl here has no eval split)")
    for side, r in results.items():
        if "trl_text_tokenization_identical_rows" in r:
            print(f"  trl re-tokenizing the text itself (prompt string + response string + EOS) would give the same "
                  f"ids for {r['trl_text_tokenization_identical_rows']} of {r['rows']} rows; the benchmark feeds "
                  f"trl personalm's ids either way")
            break

    if args.profile_steps:
        print(f"\nwhere a step goes (ms/step, exclusive wall time, over {args.profile_steps} steps after the timed "
              f"ones; wrappers add a few us per call)")
        sides = list(results)
        print(f"  {'phase':<52}" + "".join(f"{s:>22}" for s in sides))
        for phase in (*PHASES, OTHER):
            row = []
            for s in sides:
                r = results[s]
                ms = 1000 * r["phases"].get(phase, 0.0) / r["profile_steps"]
                share = r["phases"].get(phase, 0.0) / r["profile_seconds"] if r["profile_seconds"] else 0
                row.append(f"{ms:>12.2f} ({100 * share:>4.1f}%)")
            print(f"  {phase:<52}" + "".join(f"{c:>22}" for c in row))
        row = [f"{1000 * results[s]['profile_seconds'] / results[s]['profile_steps']:>12.2f}        " for s in sides]
        print(f"  {'total':<52}" + "".join(f"{c:>22}" for c in row))
    for side, r in results.items():
        if r.get("torch_profile"):
            print(f"\ntorch.profiler, {side}, {args.torch_profile_steps} steps, top ops by self CPU time:")
            print(r["torch_profile"])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--warmup", type=int, default=10, help="untimed steps first (default 10)")
    ap.add_argument("--steps", type=int, default=100, help="timed steps (default 100)")
    ap.add_argument("--profile-steps", type=int, default=20, help="steps timed per phase after the timed ones")
    ap.add_argument("--torch-profile-steps", type=int, default=0,
                    help="then this many steps under torch.profiler (top ops printed); 0: off")
    ap.add_argument("--batch-size", type=int, default=8, help="pairs per step (default 8)")
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch.set_num_threads on both sides (default 1: on a small shared machine, OpenMP "
                         "threads that spin-wait for a descheduled peer make 2 threads many times slower)")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--shuffle", action="store_true", help="shuffle batches (each framework its own order)")
    ap.add_argument("--sides", default=",".join(SIDES), help=f"comma-separated subset of {','.join(SIDES)}")
    ap.add_argument("--repeat", type=int, default=1, help="runs per side (alternating); the median run is shown")
    ap.add_argument("--check-tokenization", action="store_true",
                    help="also count the rows where trl's own text tokenization would give other ids")
    ap.add_argument("--json", help="also write all results to this file")
    ap.add_argument("--keep-tmp", action="store_true", help="keep the temporary cache folder")
    ap.add_argument("--verbose", action="store_true", help="show each run's stderr")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(args)

    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    unknown = [s for s in sides if s not in SIDES]
    if unknown:
        ap.error(f"unknown sides {unknown}; choose from {SIDES}")
    if any(s.startswith("trl") for s in sides) and importlib.util.find_spec("trl") is None:
        raise SystemExit("trl is not installed; it is a benchmark-only extra: pip install trl")
    if any(s.startswith("personalm") for s in sides) and importlib.util.find_spec("personalm.dpo") is None:
        raise SystemExit("personalm.dpo (DPOModule) is not available in this checkout")

    tmp = Path(tempfile.mkdtemp(prefix="dpo-vs-trl-"))
    env = {**os.environ, "PERSONALM_CACHE": str(tmp), "HF_DATASETS_CACHE": str(tmp / "hf-datasets"),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_HUB_DISABLE_TELEMETRY": "1", "TOKENIZERS_PARALLELISM": "false", "TQDM_DISABLE": "1",
           "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    passed = [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in (
        "warmup", "steps", "profile_steps", "torch_profile_steps", "batch_size", "max_length", "lr", "threads", "seed")]
    passed += [f"--{k.replace('_', '-')}" for k in ("shuffle", "check_tokenization") if getattr(args, k)]
    load_before = os.getloadavg()[0]
    try:
        prep = run_side("prepare", args, env, passed)  # writes the synthetic data once, fills the cache
        runs: dict[str, list] = {s: [] for s in sides}
        for _ in range(args.repeat):
            for side in sides:
                t = time.perf_counter()
                runs[side].append(run_side(side, args, env, passed))
                print(f"  ran {side} ({time.perf_counter() - t:.0f} s)", file=sys.stderr, flush=True)
        results = {s: sorted(rs, key=lambda r: r["steps_per_s"])[len(rs) // 2] for s, rs in runs.items()}
        info = {"versions": versions(), "rows": prep["rows"], "longest": prep["longest_sequence"], "params": "1.0M",
                "load_before": load_before, "omp_wait_policy": env["OMP_WAIT_POLICY"]}
        try:
            import torch  # noqa: F401  (parameter count, cheap)

            from personalm.models import load_causal_lm

            info["params"] = f"{sum(p.numel() for p in load_causal_lm('embedded:tiny-llama').parameters()) / 1e6:.2f}M"
        except Exception:  # noqa: BLE001
            pass
        report(results, args, info)
        if args.repeat > 1:
            print("\nall runs (steps/s): " + "; ".join(
                f"{s}: " + ", ".join(f"{r['steps_per_s']:.2f}" for r in rs) for s, rs in runs.items()))
        if args.json:
            Path(args.json).write_text(json.dumps({"args": vars(args), "info": info, "results": results,
                                                   "runs": runs}, indent=2))
    finally:
        if args.keep_tmp:
            print(f"temporary folder kept: {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
