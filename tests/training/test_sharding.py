"""FSDP2 on two CPU processes (gloo) against DDP, exports from sharded checkpoints, and a torchrun launch."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from safetensors.torch import load_file

from personalm.models import LoraSettings, load_causal_lm
from personalm.training.sharding import decoder_layers
from tests.helpers import DEMO, DEMO_DPO, DEMO_REWARD, FSDP2, scalars, write_jsonl

# a few steps at a small lr: AdamW's first steps amplify float noise in near-zero gradients (lr * g / (|g| + eps)),
# which at the demo's lr 3e-3 makes DDP and FSDP2 (other reduction orders) differ by ~3e-5 after one step
SHORT = ["--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.precision=32-true", "--trainer.max_steps=3",
         "--trainer.val_check_interval=3", "--trainer.limit_val_batches=2", "--trainer.enable_progress_bar=false",
         "--data.batch_size=4", "--data.subset=finance", "--data.max_train_pairs=64", "--data.max_eval_pairs=16",
         "--model.init_args.lr=1e-4", "--model.init_args.model_name_or_path=embedded:tiny-llama"]


def test_decoder_layers_are_found_with_and_without_peft():
    plain = load_causal_lm("embedded:tiny-llama")
    assert [type(m).__name__ for m in decoder_layers(plain)] == ["LlamaDecoderLayer"] * 4
    assert len(decoder_layers(load_causal_lm("embedded:tiny-llama", lora=LoraSettings(r=4)))) == 4


def launch(root: Path, *args: str, torchrun: bool = False, output: list = None) -> Path:
    """Run the CLI on 2 processes as a user does; returns the run's log folder (``output`` gets what it printed)."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    head = [sys.executable, "-m"]
    if torchrun:
        head = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m"]
    proc = subprocess.run([*head, "personalm", "fit", *args, f"--trainer.default_root_dir={root}"], env=env,
                          capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    versions = list((root / "lightning_logs").iterdir())
    assert len(versions) == 1, versions  # one run, one logger, whatever launched the processes
    assert out.count("exported the trained model") == 1, out[-3000:]  # exported once
    if output is not None:
        output.append(out)
    return versions[0]


def weights(log_dir: Path) -> dict:
    return load_file(log_dir / "hf_model" / "model.safetensors")


def assert_same_export(a: dict, b: dict, start: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-5, msg=name)
    moved = max(float((a[k] - start[k]).abs().max()) for k in a)
    assert moved > 1e-4, f"the runs did not train (largest change {moved:.1e}): equal exports prove nothing"


@pytest.fixture(scope="module")
def start_weights():
    return load_causal_lm("embedded:tiny-llama").state_dict()


def assert_sharded_checkpoint(log_dir: Path) -> Path:
    """Each process saved only its shard: a folder of one .distcp file per process, none holding it all."""
    ckpt = (log_dir / "checkpoints" / "last.ckpt").resolve()
    assert ckpt.is_dir(), f"{ckpt} is one consolidated file, not a sharded checkpoint"
    shards = sorted(p.name for p in ckpt.glob("*.distcp"))
    assert shards == ["__0_0.distcp", "__1_0.distcp"], shards
    sizes = [(ckpt / s).stat().st_size for s in shards]
    # weights and AdamW's two moments of the 1M-parameter model in fp32: ~12 MB in all, about half each
    assert sum(sizes) > 10e6 and max(sizes) < 0.7 * sum(sizes), sizes
    return ckpt


@pytest.mark.slow
def test_fsdp2_sft_equals_ddp_and_its_sharded_checkpoint_exports_the_same(small_compred, tmp_path, start_weights):
    data = f"--data.dataset={small_compred}"
    ddp = launch(tmp_path / "ddp", *DEMO, data, *SHORT, "--trainer.strategy=ddp", torchrun=True)
    fsdp2 = launch(tmp_path / "fsdp2", *DEMO, "--config", FSDP2, data, *SHORT)
    assert_same_export(weights(fsdp2), weights(ddp), start_weights)
    ckpt = assert_sharded_checkpoint(fsdp2)
    from personalm.training.export import main as export

    out = export(["--ckpt_path", str(ckpt), "--output_dir", str(tmp_path / "exported")])
    again = load_file(out / "model.safetensors")
    for name, tensor in weights(fsdp2).items():
        torch.testing.assert_close(again[name], tensor, rtol=0, atol=0, msg=name)
    assert json.loads((out / "personalm_export.json").read_text())["dtype"] == "float32"


@pytest.fixture(scope="module")
def dpo_runs(small_compred, tmp_path_factory):
    """The demo DPO (full fine-tuning, reference copy) for a few steps under DDP and under FSDP2."""
    root = tmp_path_factory.mktemp("dpo")
    data = f"--data.dataset={small_compred}"
    ddp = launch(root / "ddp", *DEMO_DPO, data, *SHORT, "--trainer.strategy=ddp")
    printed = []
    fsdp2 = launch(root / "fsdp2", *DEMO_DPO, "--config", FSDP2, data, *SHORT, output=printed)
    assert "the reference is sharded over 2 processes (FSDP2)" in printed[0]
    return ddp, fsdp2


@pytest.mark.slow
def test_fsdp2_dpo_with_a_sharded_reference_equals_ddp(dpo_runs, start_weights):
    ddp, fsdp2 = dpo_runs
    assert_same_export(weights(fsdp2), weights(ddp), start_weights)
    for run in (ddp, fsdp2):
        assert scalars(run)["train/loss"][0] == pytest.approx(0.6931, abs=1e-3)
        assert (run / "hf_model" / "personalm_dpo.json").is_file()
    assert_sharded_checkpoint(fsdp2)


@pytest.mark.slow
def test_fsdp2_test_and_predict_of_the_export(dpo_runs, small_compred, tmp_path):
    """``test`` (per-community metrics synced, written once) and ``predict`` (generation with the sharded
    model: every process runs the same number of forward passes, also when the posts do not split evenly:
    15 posts in batches of 7 over 2 processes) under FSDP2 on 2 processes."""
    _, fsdp2 = dpo_runs
    data = tmp_path / "data"
    shutil.copytree(small_compred, data)
    prompts = data / "finance_test_prompts" / "test_prompts.jsonl"
    rows = [json.loads(line) for line in prompts.read_text().splitlines()]
    dropped = rows[-1]["post_id"]
    write_jsonl(prompts, [r for r in rows if r["post_id"] != dropped])  # 16 posts -> 15
    common = [*DEMO_DPO, "--config", FSDP2, f"--data.dataset={data}", *SHORT[:3],
              "--trainer.enable_progress_bar=false", "--data.subset=finance", "--data.max_eval_pairs=16",
              f"--model.init_args.model_name_or_path={fsdp2 / 'hf_model'}"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    for sub, extra in (("test", []), ("predict", ["--model.init_args.generation.max_new_tokens=6",
                                                  "--data.eval_batch_size=7",
                                                  f"--predictions.output_path={tmp_path / 'p.jsonl'}"])):
        proc = subprocess.run([sys.executable, "-m", "personalm", sub, *common, *extra,
                               f"--trainer.default_root_dir={tmp_path / sub}"], env=env, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    (log_dir,) = (tmp_path / "test" / "lightning_logs").iterdir()
    metrics = json.loads((log_dir / "test_metrics.json").read_text())["conditioning"]
    assert set(metrics) == {"true", "none", "random"} and metrics["true"]["rewards/margins"] != 0
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert len(rows) == 15 and len({r["post_id"] for r in rows}) == 15 and dropped not in {r["post_id"] for r in rows}


@pytest.mark.slow
def test_fsdp2_lora_dpo_adapters_off_precomputed_in_bf16_mixed(small_compred, tmp_path, start_weights):
    """The paper's DPO recipe under FSDP2: LoRA, reference = adapters off, precomputed, bf16-mixed, gradient
    checkpointing; the export is the merged fp32 model and it moved."""
    run = launch(tmp_path, *DEMO_DPO, "--config", FSDP2, f"--data.dataset={small_compred}", *SHORT,
                 "--trainer.precision=bf16-mixed", "--model.init_args.dtype=bfloat16",
                 "--model.init_args.gradient_checkpointing=true", '--model.init_args.lora={"r": 8, "alpha": 16}',
                 "--model.init_args.reference=adapters_off", "--model.init_args.precompute_reference=true",
                 f"--model.init_args.reference_cache={tmp_path / 'cache'}", "--model.init_args.lr=1e-3")
    assert scalars(run)["train/loss"][0] == pytest.approx(0.6931, abs=1e-3)
    record = json.loads((run / "hf_model" / "personalm_export.json").read_text())
    assert record["lora"] == "merged in float32" and record["held_in_training"]["frozen"] == ["bfloat16"]
    exported = weights(run)
    assert max(float((exported[k] - start_weights[k]).abs().max()) for k in exported) > 1e-4
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 2  # train and validation, scored once
    # the export command, as a user runs it, on the sharded checkpoint of this LoRA DPO run
    ckpt = (run / "checkpoints" / "last.ckpt").resolve()
    proc = subprocess.run([sys.executable, "-m", "personalm", "export", "--ckpt_path", str(ckpt)], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    again = run / f"hf_model-{ckpt.stem}"
    assert json.loads((again / "personalm_dpo.json").read_text()) == json.loads(
        (run / "hf_model" / "personalm_dpo.json").read_text())
    exported_again = load_file(again / "model.safetensors")
    for name, tensor in exported.items():
        torch.testing.assert_close(exported_again[name], tensor, rtol=0, atol=0, msg=name)


@pytest.mark.slow
def test_fsdp2_reward_model_with_lora_exports_a_reward_model(small_compred, tmp_path):
    from personalm.evaluation.reward_judge import RewardJudge

    run = launch(tmp_path, *DEMO_REWARD, "--config", FSDP2, f"--data.dataset={small_compred}", *SHORT,
                 '--model.init_args.lora={"r": 8, "alpha": 16}', "--model.init_args.lr=1e-3")
    judge = RewardJudge(str(run / "hf_model"), max_length=128, device="cpu")  # refuses a model without a scalar head
    assert judge.model.config.num_labels == 1


def _reference_reshards(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    from personalm.data.collate import collate_preference
    from personalm.training.logprobs import sequence_logps
    from personalm.training.reference import frozen_logprobs
    from personalm.training.sharding import shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        model = shard(load_causal_lm("embedded:tiny-llama").eval().requires_grad_(False), init_device_mesh("cpu", (2,)),
                      bf16_compute=False)
        rows = [{"prompt_ids": [1, 5, 6, 7], "chosen_ids": [8, 9, 2], "rejected_ids": [10, 2], "community": "c",
                 "index": 0}]
        batch = collate_preference(rows, pad_id=0, pair_packing="prefix_shared")
        whole = lambda: sorted(n for n, p in model.named_parameters() if not isinstance(p, DTensor))  # noqa: E731
        with torch.no_grad():
            plain = sequence_logps(model, batch).sum
            found = {"plain": whole()}
            frozen = frozen_logprobs(model, batch, 1024).sum
            found["reference"] = whole()
        found["same"] = bool(torch.equal(plain, frozen))
        if rank == 0:
            Path(out).write_text(json.dumps(found))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_a_frozen_reference_is_sharded_again_after_it_scored_root_included(tmp_path):
    """2 gloo processes: after DPO's reference scored a batch (the head applied after the forward), every
    parameter is a shard again, the root's embeddings, norm and head too, and the log-probs are the same; FSDP2
    alone keeps the root's gathered after a forward (what a trained model's backward needs)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "whole.json"
    mp.spawn(_reference_reshards, args=(port, str(out)), nprocs=2)
    found = json.loads(out.read_text())
    assert found["reference"] == [] and found["same"], found
    assert "model.embed_tokens.weight" in found["plain"], found  # the check can tell


class RecordReducedGrads(Callback):
    """After each micro-batch's backward: did the first trained weight's shard get a gradient? (FSDP2 writes it
    when it reduce-scatters; not while gradient sync is off.) Written by the first process at the end."""

    def __init__(self, path: str):
        self.path, self.seen = path, []

    def on_after_backward(self, trainer, module):
        first = next(p for p in module.model.parameters() if p.requires_grad)
        self.seen.append(first.grad is not None)

    def on_train_end(self, trainer, module):
        if trainer.is_global_zero:
            Path(self.path).write_text(json.dumps(self.seen))


@pytest.mark.slow
def test_fsdp2_accumulation_reduced_once_per_step_trains_the_same_weights(small_compred, tmp_path, start_weights):
    """Accumulation over 4 micro-batches on 2 processes: with ``reduce_every_micro_batch: false`` the gradients
    are reduce-scattered after the 4th only (none reach the shards before: sync really was off), and the weights
    equal those of a reduce-scatter after every micro-batch."""
    runs, seen = {}, {}
    for reduce_each in (True, False):
        name = f"each_{reduce_each}"
        record = tmp_path / f"{name}.json"
        callback = {"class_path": "tests.training.test_sharding.RecordReducedGrads", "init_args": {"path": str(record)}}
        runs[name] = launch(tmp_path / name, *DEMO, "--config", FSDP2, f"--data.dataset={small_compred}", *SHORT,
                            "--trainer.max_steps=2", "--trainer.accumulate_grad_batches=4", "--data.batch_size=2",
                            f"--trainer.strategy.init_args.reduce_every_micro_batch={str(reduce_each).lower()}",
                            f"--trainer.callbacks+={json.dumps(callback)}")
        seen[name] = json.loads(record.read_text())
    assert seen["each_True"] == [True] * 8, seen
    assert seen["each_False"] == [False, False, False, True] * 2, seen
    assert_same_export(weights(runs["each_False"]), weights(runs["each_True"]), start_weights)


def saved_tiny_llama(folder: Path) -> Path:
    """The embedded tiny Llama saved with its weights (safetensors) and tokenizer, as an SFT export is."""
    from personalm.models import resolve

    load_causal_lm("embedded:tiny-llama").save_pretrained(folder)
    for file in Path(resolve("embedded:tiny-llama")).iterdir():
        if "token" in file.name:
            shutil.copy(file, folder)
    return folder


@pytest.mark.slow
def test_hsdp_on_a_2x2_mesh_trains_the_weights_of_fsdp2(small_compred, tmp_path, start_weights):
    """4 processes: HSDP (2 replicas, each sharded over 2 processes; the sampler over all 4) against FSDP2 over
    all 4; the same global batches, so the same weights. The model comes from a saved folder, so both load it
    straight into their shards (on the 2x2 mesh: replicated over dim 0, sharded over dim 1)."""
    model = saved_tiny_llama(tmp_path / "model")
    common = [*DEMO, "--config", FSDP2, f"--data.dataset={small_compred}", *SHORT, "--trainer.devices=4",
              "--data.batch_size=2", f"--model.init_args.model_name_or_path={model}"]
    fsdp2 = launch(tmp_path / "fsdp2", *common)
    printed = []
    hsdp = launch(tmp_path / "hsdp", *common, "--trainer.strategy.init_args.replicas=2", output=printed)
    assert "HSDP: 2 replicas, each sharded over 2 processes" in printed[0]
    assert f"{model} loaded straight into the shards" in printed[0]
    assert_same_export(weights(hsdp), weights(fsdp2), start_weights)


def _peak_rss_reset() -> int:
    """Reset this process's peak resident set size (Linux: ``clear_refs`` 5) and return the current one."""
    import psutil

    Path("/proc/self/clear_refs").write_text("5")
    return psutil.Process().memory_info().rss


def _peak_rss() -> int:
    status = Path("/proc/self/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) * 1024


def _load_policy_and_reference(rank: int, port: int, folder: str, out: str) -> None:
    import gc
    import importlib

    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh

    from personalm.training.dpo import DPOModule

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        module = DPOModule(model_name_or_path=folder)
        module._device_mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("data_parallel",))  # as Lightning sets it
        # what loading imports is a cost of the process, not of the model's size: imported before measuring
        importlib.import_module("accelerate"), importlib.import_module("transformers.models.llama.modeling_llama")
        gc.collect()
        before = _peak_rss_reset()
        module.configure_model()
        reference = module.reference.model
        added = _peak_rss() - before
        found = {"added": added}
        for name, model in (("policy", module.model), ("reference", reference)):
            full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            if rank == 0:
                saved = load_file(Path(folder) / "model.safetensors")
                found[name] = [k for k in saved if not torch.equal(full[k], saved[k])] + sorted(saved.keys() ^ full)
                found[f"{name}_inv_freq"] = torch.equal(model.model.rotary_emb.inv_freq, saved_inv_freq(folder))
        gathered = [None, None]
        dist.all_gather_object(gathered, found)
        if rank == 0:
            Path(out).write_text(json.dumps(gathered))
    finally:
        dist.destroy_process_group()


def saved_inv_freq(folder: str) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder).model.rotary_emb.inv_freq


@pytest.mark.slow
def test_fsdp2_loads_policy_and_reference_into_shards_without_a_whole_copy_per_process(tmp_path):
    """2 gloo processes load a DPO policy and its reference (a saved 138M-parameter Llama, fp32: 0.55 GB each)
    under FSDP2: the peak resident memory each process added while loading, summed over both, is at most 1.25
    times one policy plus one reference (measured 1.15; loading whole in each process: 1.6); the shards hold the
    saved weights and the rotary buffers are the model's own."""
    import socket

    import torch.multiprocessing as mp
    from transformers import AutoConfig, AutoModelForCausalLM

    from personalm.models import resolve

    tiny = Path(resolve("embedded:tiny-llama"))
    config = AutoConfig.from_pretrained(tiny, hidden_size=1024, intermediate_size=4096, num_hidden_layers=10,
                                        num_attention_heads=8, num_key_value_heads=8)
    folder = tmp_path / "llama"
    model = AutoModelForCausalLM.from_config(config)
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    model.save_pretrained(folder)
    del model
    for file in tiny.iterdir():
        if "token" in file.name:
            shutil.copy(file, folder)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "found.json"
    mp.spawn(_load_policy_and_reference, args=(port, str(folder), str(out)), nprocs=2)
    found = json.loads(out.read_text())
    added = sum(f["added"] for f in found)
    print(f"added {[round(f['added'] / 2**30, 3) for f in found]} GiB; weights {2 * nbytes / 2**30:.3f} GiB")
    assert added <= 1.25 * 2 * nbytes, f"{added / 2**30:.2f} GiB added for {2 * nbytes / 2**30:.2f} GiB of weights"
    assert found[0]["policy"] == [] and found[0]["reference"] == [], found[0]
    assert found[0]["policy_inv_freq"] and found[0]["reference_inv_freq"], found[0]
