"""Precision that trains: under bf16-mixed with a bf16 base at the paper's lr 2e-7, every trainable tensor is
held in fp32 and moves; exports keep the change; precision settings that cannot train are refused."""

import json
import math
from pathlib import Path

import pytest
import torch

from personalm.cli import main
from tests.helpers import DEMO, DEMO_DPO, DEMO_REWARD, ChangedWeights, fp32_logits, quiet, scalars

REWARD = DEMO_REWARD
LORA = '--model.init_args.lora={"r": 8, "alpha": 16, "dropout": 0.1}'
PAPER_LIKE = ["--model.init_args.dtype=bfloat16", "--trainer.precision=bf16-mixed", "--model.init_args.lr=2e-7",
              "--model.init_args.warmup_ratio=0", "--trainer.max_steps=10", "--trainer.limit_val_batches=0",
              "--data.subset=finance", "--data.max_train_pairs=null", "--data.max_eval_pairs=null",
              "--trainer.callbacks=tests.helpers.ChangedWeights", "--trainer.log_every_n_steps=1"]


@pytest.fixture(scope="module")
def tied_model(tmp_path_factory, tokenizer):
    """The embedded Llama with tied input/output embeddings. Untied, the embedding rows of tokens that 10
    batches never show get no gradient at all (the demo data uses 374 of 1024 tokens) and cannot change
    under any optimizer; tied, every row gets one through the output softmax, so the per-tensor check
    below holds the embedding to the same bar as every other tensor."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from personalm.models import embedded

    config = AutoConfig.from_pretrained(embedded.model_dir("embedded:tiny-llama"), tie_word_embeddings=True)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tied")
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


FP32_CONTROL = ["--model.init_args.dtype=float32", "--trainer.precision=32-true"]


def fit(config, root, data, model, *extra):
    cli = main(["fit", *config, *quiet(root), f"--data.dataset={data}",
                f"--model.init_args.model_name_or_path={model}", *PAPER_LIKE, *extra])
    watch = next(c for c in cli.trainer.callbacks if isinstance(c, ChangedWeights))
    return cli, watch


def fit_with_fp32_control(config, root, data, model, *extra):
    """The paper's setting (bf16 base, bf16-mixed) and the same run entirely in fp32."""
    cli, mixed = fit(config, root / "bf16-mixed", data, model, *extra)
    _, control = fit(config, root / "fp32", data, model, *extra, *FP32_CONTROL)
    return cli, mixed, control


def assert_trained_in_fp32(mixed: ChangedWeights, control: ChangedWeights) -> None:
    """Every trainable tensor is fp32 and, per tensor (so a small head cannot hide), at least 90% of its
    elements changed, or, where even the all-fp32 run changes fewer, at least 90% of what that run changes.

    The exception is measured, not assumed: LoRA's A matrices get gradients only through B, which starts at
    zero and after 10 steps at lr 2e-7 is ~2e-6, so AdamW's step on A (lr * g / (sqrt(v) + eps), with g far
    below eps) is ~1e-9, under half an fp32 ulp of many of A's entries (~0.05): in the all-fp32 run 47-86%
    of the elements of some attention A matrices change. With bf16 weights (the bug) ~0.2% change."""
    assert mixed.changed and mixed.changed.keys() == control.changed.keys()
    not_fp32 = {n: d for n, d in mixed.dtypes.items() if d != torch.float32}
    assert not not_fp32, not_fp32
    need = {n: 0.9 if c >= 0.9 else 0.9 * c for n, c in control.changed.items()}
    stuck = {n: (round(c, 3), round(control.changed[n], 3)) for n, c in mixed.changed.items() if c < need[n]}
    assert not stuck, f"tensors that moved less than they do in fp32 (bf16-mixed, fp32): {stuck}"
    # The premise, on the fp32 run alone: the setting moves (nearly) every element, so "90% of what fp32
    # changes" is a real bar. Measured: a norm weight can stay under 90% even in fp32 with some data orders
    # (0.898 for a post_attention_layernorm: elements whose gradients stay below Adam's eps); bf16: ~0.2%.
    weak = {n: c for n, c in control.changed.items() if c < 0.8 and "lora_A" not in n}
    assert not weak, f"only LoRA's A matrices may change under 80% of their elements, even in fp32: {weak}"


@pytest.mark.parametrize("how", ["lora_adapters_off", "full"])
def test_dpo_at_lr_2e7_in_bf16_mixed_trains_every_tensor(how, tied_model, small_compred, tmp_path):
    extra = [LORA, "--model.init_args.reference=adapters_off"] if how.startswith("lora") else []
    cli, mixed, control = fit_with_fp32_control(DEMO_DPO, tmp_path, small_compred, tied_model,
                                                "--model.init_args.sft_weight=0", "--model.init_args.export_dir=",
                                                *extra)
    assert_trained_in_fp32(mixed, control)
    if how == "full":
        ref = cli.model.reference.model
        assert {p.dtype for p in ref.parameters()} == {torch.bfloat16}  # the frozen reference stays bf16
    first = scalars(Path(cli.trainer.log_dir))["train/loss"][0]
    # LoRA starts at zero, so the policy is its reference exactly; a full fp32 policy against a bf16 copy
    # differs by the norms and softmax computed in fp32 on one side and bf16 on the other
    assert first == pytest.approx(math.log(2), abs=1e-3 if how.startswith("lora") else 1e-2)


@pytest.mark.parametrize("config", [DEMO, REWARD], ids=["sft", "reward"])
def test_sft_and_reward_at_lr_2e7_in_bf16_mixed_train_every_tensor(config, tied_model, small_compred, tmp_path):
    _, mixed, control = fit_with_fp32_control(config, tmp_path, small_compred, tied_model, LORA,
                                              "--model.init_args.export_dir=")
    if config == REWARD:
        assert any("score" in n for n in mixed.changed), "the reward head is not trainable"
    assert_trained_in_fp32(mixed, control)


def test_full_fine_tuning_in_bf16_says_what_fp32_weights_cost(tied_model, small_compred, tmp_path, caplog):
    fit(DEMO, tmp_path, small_compred, tied_model, "--model.init_args.export_dir=", "--trainer.max_steps=1")
    assert "trainable weights loaded as bfloat16 are held in float32" in caplog.text


@pytest.fixture(scope="module")
def lora_dpo(tied_model, small_compred, tmp_path_factory):
    """LoRA DPO as configs/paper/dpo.yaml runs it (bf16 base, adapters off as reference), 10 steps at 2e-7."""
    return fit(DEMO_DPO, tmp_path_factory.mktemp("lora-dpo"), small_compred, tied_model,
               "--model.init_args.sft_weight=0", LORA, "--model.init_args.reference=adapters_off")


def test_lora_dpo_export_at_lr_2e7_keeps_what_training_changed(lora_dpo, tied_model):
    """Merged in fp32 and saved in fp32, the export computes what the trained module computes; merged into
    the bf16 base (as before), the change of 10 steps at lr 2e-7 rounds away and it is the start again."""
    from personalm.models import load_causal_lm

    cli, watch = lora_dpo
    export = Path(cli.model.export_path)
    record = json.loads((export / "personalm_export.json").read_text())
    assert record["dtype"] == "float32" and record["lora"] == "merged in float32", record
    loaded = load_causal_lm(str(export))  # dtype null: as saved
    assert next(loaded.parameters()).dtype == torch.float32
    exported = fp32_logits(loaded)
    start = fp32_logits(load_causal_lm(tied_model, "bfloat16"))  # what training started from (bf16 base)
    trained = watch.logits  # the trained module: bf16 base + fp32 adapters, unmerged
    moved = (exported - start).abs().max()
    assert moved > 1e-6, f"the export is the starting model (largest logit change {moved:.2e})"
    torch.testing.assert_close(exported, trained, rtol=0, atol=1e-4)
    assert (exported - trained).abs().max() < 0.1 * moved


def test_evaluation_holds_weights_in_the_compute_dtype_unless_told(lora_dpo, small_compred, tmp_path):
    """The run's config says dtype bfloat16 (to train). Under bf16-mixed, ``test`` and ``predict`` of its fp32 export
    hold the policy and the reference in bf16 (what the run computes in); ``eval_dtype: float32`` keeps fp32; under
    32-true the export loads as saved (fp32) and the reference in the dtype it had in training (bf16)."""
    cli, _ = lora_dpo
    common = [*DEMO_DPO, *quiet(tmp_path), f"--data.dataset={small_compred}", "--data.subset=finance",
              f"--model.init_args.model_name_or_path={cli.model.export_path}", "--model.init_args.dtype=bfloat16",
              LORA, "--trainer.limit_test_batches=1"]
    dtypes = lambda m: ({p.dtype for p in m.model.parameters()}, {p.dtype for p in m.reference.model.parameters()})  # noqa: E731
    t = main(["test", *common, "--trainer.precision=bf16-mixed"])
    assert dtypes(t.model) == ({torch.bfloat16}, {torch.bfloat16})
    assert not hasattr(t.model.model, "peft_config"), "fresh adapters added to an export under test"
    told = main(["test", *common, "--trainer.precision=bf16-mixed", "--model.init_args.eval_dtype=float32"])
    assert dtypes(told.model) == ({torch.float32}, {torch.float32})
    saved = main(["test", *common, "--trainer.precision=32-true"])
    assert dtypes(saved.model) == ({torch.float32}, {torch.bfloat16})
    predict = main(["predict", *common, "--trainer.precision=bf16-mixed", "--trainer.limit_predict_batches=1",
                    "--model.init_args.generation.max_new_tokens=2",
                    f"--predictions.output_path={tmp_path / 'p.jsonl'}"])
    assert {p.dtype for p in predict.model.model.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("precision, dtype, match", [
    ("bf16-true", "float32", "casts the trainable weights to 16 bits"),
    ("32-true", "bfloat16", "needs autocast")])
def test_precision_that_cannot_train_is_refused_before_loading(precision, dtype, match, small_compred, tmp_path):
    with pytest.raises(ValueError, match=match):
        main(["fit", *DEMO, *quiet(tmp_path), f"--data.dataset={small_compred}",
              f"--trainer.precision={precision}", f"--model.init_args.dtype={dtype}", "--trainer.max_steps=1"])


def test_a_16_bit_checkpoint_loaded_as_saved_needs_mixed_precision(small_compred, tmp_path, tokenizer):
    """dtype null keeps a bf16 checkpoint bf16: with a LoRA reward model's fp32 head beside it and no autocast,
    the first step would crash on mixed dtypes; it is refused before training instead."""
    from transformers import AutoModelForCausalLM

    from personalm.models import load_causal_lm

    load_causal_lm("embedded:tiny-llama", "bfloat16").save_pretrained(tmp_path / "bf16")
    tokenizer.save_pretrained(tmp_path / "bf16")
    assert next(AutoModelForCausalLM.from_pretrained(tmp_path / "bf16").parameters()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="need autocast"):
        main(["fit", *REWARD, *quiet(tmp_path), f"--data.dataset={small_compred}", LORA,
              f"--model.init_args.model_name_or_path={tmp_path / 'bf16'}", "--trainer.max_steps=1"])


def test_a_lora_runs_checkpoint_loads_for_test(lora_dpo, small_compred, tmp_path):
    """``test --ckpt_path`` of a LoRA run rebuilds the adapters the checkpoint holds."""
    cli, _ = lora_dpo
    ckpt = Path(cli.trainer.log_dir) / "checkpoints" / "last.ckpt"
    t = main(["test", *DEMO_DPO, *quiet(tmp_path), f"--data.dataset={small_compred}",
              "--data.subset=finance", f"--model.init_args.model_name_or_path={cli.model.hparams.model_name_or_path}",
              LORA, "--model.init_args.reference=adapters_off", "--trainer.limit_test_batches=1",
              f"--ckpt_path={ckpt}"])
    assert hasattr(t.model.model, "peft_config")
