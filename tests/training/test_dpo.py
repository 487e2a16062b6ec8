"""DPOModule: ln 2 at the start, a frozen reference, precomputed == on-the-fly, per-community metrics."""

import json
import math
from pathlib import Path

import pytest
import torch

from personalm.cli import main
from personalm.models import LoraSettings, load_causal_lm
from personalm.training.dpo import DPOModule
from personalm.training.dpo_loss import PairLogps, pair_losses
from personalm.training.logprobs import model_logprobs
from tests.helpers import DEMO_DPO, quiet, scalars


def dpo_args(root, data, start, *extra):
    return [*DEMO_DPO, *quiet(root), f"--data.dataset={data}",
            f"--model.init_args.model_name_or_path={start}", "--data.max_train_pairs=null",
            "--data.max_eval_pairs=null", *extra]


@pytest.fixture(scope="module")
def dpo_run(sft_run, train_compred, tmp_path_factory):
    """DPO from the SFT export: 60 steps, validation every 20 (30 steps moved 70 validation rows by less than
    their noise with some data orders: a test of learning needs the signal to clear the noise)."""
    sft, _ = sft_run
    root = tmp_path_factory.mktemp("dpo")
    cli = main(["fit", *dpo_args(root, train_compred, sft.model.export_path, "--trainer.max_steps=60",
                                 "--trainer.val_check_interval=20", "--trainer.max_epochs=20")])
    return cli, root, sft.model.export_path


def test_first_loss_is_ln2_and_val_accuracy_rises(dpo_run):
    cli, _, _ = dpo_run
    found = scalars(Path(cli.trainer.log_dir))
    assert abs(found["train/loss"][0] - math.log(2)) < 1e-3, found["train/loss"][:3]
    acc = found["val/rewards/accuracies"]
    assert len(acc) == 3 and acc[-1] > acc[0], acc
    assert found["val/loss"][-1] < found["val/loss"][0] and found["val/rewards/margins"][-1] > 0, found["val/loss"]
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                 "logps/rejected", "loss"):
        assert f"val/{name}" in found and f"val/{name}/r_personalfinance" in found, name
        assert f"val/none/{name}/r_AskHistorians" in found and f"val/random/{name}" in found, name
    assert "val/rewards/accuracies/macro" in found and "val/rewards/accuracies/worst" in found
    assert "train/rewards/accuracies/r_Frugal" in found
    worst = found["val/rewards/accuracies/worst"][-1]
    per = [v[-1] for k, v in found.items() if k.startswith("val/rewards/accuracies/r_")]
    assert len(per) == 8 and worst == pytest.approx(min(per))
    assert found["val/rewards/accuracies/macro"][-1] == pytest.approx(sum(per) / len(per))


def test_trained_policy_packed_losses_equal_the_padded_ones(dpo_run):
    """ln 2 at step 0 holds for any attention mask (policy and reference run the same path); after training
    they differ, so the losses of prefix-shared packed rows (what training ran) must equal those of the plain
    padded rows under the model's own 2D mask, policy and reference both, and be far from ln 2."""
    cli, _, _ = dpo_run
    module = cli.model.eval()
    batch = next(iter(cli.datamodule.val_dataloader()))
    assert "packed" in batch and module.reference.loaded
    n = len(batch["community"])
    padded = {k: v for k, v in batch.items() if k != "packed"}
    with torch.no_grad():
        packed = module.pair_losses(batch, "val")
        policy = PairLogps.from_sequences(model_logprobs(module.model, padded), n)
        reference = PairLogps.from_sequences(model_logprobs(module.reference.model, padded), n)
    hp = module.hparams
    expected = pair_losses(policy, reference, hp.beta, hp.loss_type, hp.label_smoothing)
    assert (expected.losses - math.log(2)).abs().mean() > 0.05, expected.losses  # the policy moved
    torch.testing.assert_close(packed.losses, expected.losses, atol=1e-5, rtol=1e-5)


def test_reference_stays_bit_identical_and_outside_the_optimizer(dpo_run):
    cli, _, start = dpo_run
    module = cli.model
    fresh = load_causal_lm(start)
    ref = module.reference.model
    assert not ref.training and not any(p.requires_grad for p in ref.parameters())
    for (name, a), b in zip(ref.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
    moved = [n for n, p in module.model.state_dict().items() if not torch.equal(p, fresh.state_dict()[n])]
    assert moved, "the policy did not train"
    optimized = {id(p) for g in cli.trainer.optimizers[0].param_groups for p in g["params"]}
    assert not optimized & {id(p) for p in ref.parameters()}
    assert not any("reference" in k for k in module.state_dict())


def test_test_subcommand_writes_per_community_json(dpo_run, train_compred, tmp_path):
    """``test`` of the DPO export scores against the reference it was trained against (the SFT export,
    recorded next to the weights), not against itself (which would give rewards of exactly 0)."""
    cli, _, start = dpo_run
    record = json.loads((Path(cli.model.export_path) / "personalm_dpo.json").read_text())
    assert Path(record["reference"]) == Path(start).resolve()
    t = main(["test", *dpo_args(tmp_path, train_compred, cli.model.export_path)])
    path = Path(t.trainer.log_dir) / "test_metrics.json"
    report = json.loads(path.read_text())
    assert set(report["conditioning"]) == {"true", "none", "random"}
    true = report["conditioning"]["true"]
    assert true["rewards/margins"] != 0 and true["rewards/accuracies"] > 0.5, true
    # each community's accuracy is its own pairs' count of wins, and those counts add up to the overall one
    per = [k.removeprefix("pairs/") for k in true if k.startswith("pairs/r_")]
    assert len(per) == 8 and sum(true[f"pairs/{c}"] for c in per) == true["pairs"], true
    wins = {c: true[f"rewards/accuracies/{c}"] * true[f"pairs/{c}"] for c in per}
    assert all(abs(w - round(w)) < 1e-6 for w in wins.values()), wins
    assert sum(round(w) for w in wins.values()) == round(true["rewards/accuracies"] * true["pairs"]), wins
    assert len({true[f"rewards/accuracies/{c}"] for c in per}) > 1, "every community scored the same"
    assert t.trainer.callback_metrics["test/rewards/accuracies/r_history"] == pytest.approx(
        true["rewards/accuracies/r_history"])


def test_test_under_bf16_mixed_holds_bf16_weights_and_scores_as_fp32(dpo_run, tmp_path):
    """``test`` of the DPO export on the demo's test pairs (embedded:compred, 200 pairs): under bf16-mixed the policy
    and its reference are held in bf16 (not fp32 cast op by op), and the preference accuracy is within 1 point of
    fp32's (the margins differ: bf16 did compute)."""
    cli, _, _ = dpo_run
    common = [*DEMO_DPO, *quiet(tmp_path), f"--model.init_args.model_name_or_path={cli.model.export_path}"]
    runs = {precision: main(["test", *common, f"--trainer.precision={precision}"])
            for precision in ("32-true", "bf16-mixed")}
    for precision, dtype in (("32-true", torch.float32), ("bf16-mixed", torch.bfloat16)):
        module = runs[precision].model
        assert {p.dtype for p in module.model.parameters()} == {dtype}, precision
        assert {p.dtype for p in module.reference.model.parameters()} == {dtype}, precision
    fp32, bf16 = (json.loads((Path(runs[p].trainer.log_dir) / "test_metrics.json").read_text())["conditioning"]["true"]
                  for p in ("32-true", "bf16-mixed"))
    assert fp32["pairs"] == bf16["pairs"] == 200
    assert fp32["rewards/accuracies"] > 0.57, fp32  # above chance by two standard errors: it learned something
    assert abs(bf16["rewards/accuracies"] - fp32["rewards/accuracies"]) <= 0.01, (bf16, fp32)
    assert bf16["rewards/margins"] != fp32["rewards/margins"]


def test_gradient_step_raises_chosen_and_lowers_rejected(sft_run, small_compred):
    from personalm.data.datamodule import ComPreDDataModule

    sft, _ = sft_run
    dm = ComPreDDataModule(dataset=str(small_compred), subset="finance", rows="preference", max_length=128)
    batch = next(iter(dm.val_dataloader()))
    module = DPOModule(model_name_or_path=sft.model.export_path)
    module.configure_model()
    n = len(batch["community"])

    def logps():
        with torch.no_grad():
            lp = model_logprobs(module.model, batch).sum
        return lp[:n], lp[n:]

    chosen0, rejected0 = logps()
    losses, *_ = module.pair_losses(batch, "val")
    losses.mean().backward()
    with torch.no_grad():
        for p in module.model.parameters():
            p -= 1e-3 * p.grad
    chosen1, rejected1 = logps()
    assert (chosen1 - chosen0).mean() > 0 and (rejected1 - rejected0).mean() < 0


def _fit_steps(root, data, start, *extra):
    cli = main(["fit", *dpo_args(root, data, start, "--trainer.max_steps=3", "--trainer.limit_val_batches=2",
                                 "--trainer.val_check_interval=3", "--model.init_args.export_dir=",
                                 "--data.subset=finance", *extra)])
    return cli, scalars(Path(cli.trainer.log_dir))


def test_precomputed_reference_equals_on_the_fly_and_checks_its_cache(sft_run, small_compred, tmp_path):
    sft, _ = sft_run
    start = sft.model.export_path
    # max_prompt_length 36 drops some rows (no room left): the cache must still line up with the rows
    fly, fly_logs = _fit_steps(tmp_path / "a", small_compred, start, "--data.max_prompt_length=36")
    pre, pre_logs = _fit_steps(tmp_path / "b", small_compred, start, "--model.init_args.precompute_reference=true",
                               f"--model.init_args.reference_cache={tmp_path / 'cache'}",
                               "--data.max_prompt_length=36")
    assert not pre.model.reference.loaded, "reference not freed after precomputing"
    for tag in ("train/loss", "val/loss", "val/rewards/margins", "val/none/rewards/accuracies"):
        torch.testing.assert_close(torch.tensor(pre_logs[tag]), torch.tensor(fly_logs[tag]), rtol=1e-4, atol=1e-5)
    for name, p in fly.model.model.state_dict().items():
        torch.testing.assert_close(pre.model.model.state_dict()[name], p, rtol=1e-4, atol=1e-6)
    caches = sorted((tmp_path / "cache").glob("*.pt"))
    assert [c.name.split("-")[0] for c in caches] == ["train_pref", "validation_pref"]
    # a cache whose content was made for other data is refused, not used
    saved = torch.load(caches[0], weights_only=True)
    saved["meta"]["data"] = "some-other-data"
    torch.save(saved, caches[0])
    with pytest.raises(ValueError, match="other data or another reference"):
        _fit_steps(tmp_path / "c", small_compred, start, "--model.init_args.precompute_reference=true",
                   f"--model.init_args.reference_cache={tmp_path / 'cache'}", "--data.max_prompt_length=36")


@pytest.mark.parametrize("kwargs, match", [
    ({"beta": 0.0}, "beta"), ({"beta": -1.0}, "beta"), ({"loss_type": "kto"}, "loss_type"),
    ({"label_smoothing": 0.5}, "label_smoothing"), ({"reference": "adapters_off"}, "LoRA"),
    ({"reference": "adapters_off", "lora": LoraSettings(), "reference_name_or_path": "x"}, "reference: copy")])
def test_bad_settings_fail_before_training(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DPOModule(**kwargs)


def test_reference_with_another_vocabulary_is_refused(tmp_path, tokenizer):
    other = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    other.add_tokens(["<|extra|>"])
    model = load_causal_lm("embedded:tiny-llama")
    model.resize_token_embeddings(len(other))
    model.save_pretrained(tmp_path)
    other.save_pretrained(tmp_path)
    module = DPOModule(model_name_or_path="embedded:tiny-llama", reference_name_or_path=str(tmp_path))
    with pytest.raises(ValueError, match="another tokenizer"):
        module.configure_model()


def test_adapters_off_reference_refuses_adapter_only_sft_and_starts_at_ln2(tmp_path, tokenizer, small_compred):
    from personalm.data.datamodule import ComPreDDataModule
    from personalm.models import LoraSettings, export_hf

    lora = LoraSettings(r=4, alpha=8, dropout=0.1)
    export_hf(load_causal_lm("embedded:tiny-llama", lora=lora), tokenizer, str(tmp_path / "adapter"), merge_lora=False)
    with pytest.raises(ValueError, match="adapter-only"):
        DPOModule(model_name_or_path=str(tmp_path / "adapter"), lora=lora, reference="adapters_off").configure_model()
    module = DPOModule(model_name_or_path="embedded:tiny-llama", lora=lora, reference="adapters_off")
    module.configure_model()
    assert not module.reference.loaded and module.reference.model is None
    dm = ComPreDDataModule(dataset=str(small_compred), subset="history", rows="preference", max_length=128)
    batch = next(iter(dm.val_dataloader()))
    module.model.train()
    losses, *_ = module.pair_losses(batch, "val")
    torch.testing.assert_close(losses, torch.full_like(losses, math.log(2)))
    # LoRA starts at zero, so ln 2 alone cannot tell; with trained (non-zero) adapters the reference must
    # still be the base weights, and the policy must differ from it
    for name, p in module.model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(std=0.05)
    with torch.no_grad():
        base = model_logprobs(load_causal_lm("embedded:tiny-llama").eval(), batch)
        policy = model_logprobs(module.model.eval(), batch)
    reference = module.reference.logprobs(batch)
    torch.testing.assert_close(reference.sum, base.sum)
    assert not torch.allclose(policy.sum, reference.sum)


def test_sft_weight_adds_the_chosen_nll_and_keeps_train_loss_the_preference_loss(sft_run, small_compred, tmp_path):
    """objective = DPO loss + w * NLL(chosen); at step 0 the DPO loss is ln 2 and the NLL is the SFT
    model's per-token loss on the chosen responses (positive), so objective = ln 2 + 0.5 * nll."""
    sft, _ = sft_run
    _, logs = _fit_steps(tmp_path, small_compred, sft.model.export_path, "--model.init_args.sft_weight=0.5")
    assert logs["train/loss"][0] == pytest.approx(math.log(2), abs=1e-3)
    nll = logs["train/nll_chosen"][0]
    assert nll > 0.1
    assert logs["train/objective"][0] == pytest.approx(math.log(2) + 0.5 * nll, abs=1e-3)


def test_logps_from_response_logits_only_equal_those_from_all_logits(small_compred):
    from personalm.data.datamodule import ComPreDDataModule
    from personalm.training.logprobs import sequence_logprobs

    dm = ComPreDDataModule(dataset=str(small_compred), subset="finance", rows="preference", max_length=128)
    batch = next(iter(dm.val_dataloader()))
    model = load_causal_lm("embedded:tiny-llama").eval()
    with torch.no_grad():
        fast = model_logprobs(model, batch)
        full = sequence_logprobs(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                                 batch["labels"])
    torch.testing.assert_close(fast.sum, full.sum, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast.mean, full.mean, rtol=1e-5, atol=1e-5)
