"""FSDP2 on two CPU processes (gloo) against DDP, exports from sharded checkpoints, and a torchrun launch."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
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
        batch = collate_preference(rows, pad_id=0, prefix_sharing=True)
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
