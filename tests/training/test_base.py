"""What every module shares: the NaN guard (a non-finite loss or gradient stops training before the update,
with the step and the batch's posts named, and nothing exported)."""

from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from personalm.cli import main
from personalm.training.callbacks import NonFiniteError
from tests.helpers import DEMO, quiet


@pytest.mark.parametrize("nan_in", ["loss", "gradient"])
def test_non_finite_step_stops_training_names_step_and_posts_and_exports_nothing(nan_in, small_compred, tmp_path):
    with pytest.raises(NonFiniteError) as err:
        main(["fit", *DEMO, *quiet(tmp_path), f"--data.dataset={small_compred}",
              "--model.class_path=tests.helpers.NaNAtStep", f"--model.init_args.nan_in={nan_in}",
              "--model.init_args.nan_at_step=3", "--trainer.max_steps=6", "--trainer.val_check_interval=2",
              "--trainer.limit_val_batches=1", "--data.batch_size=4"])
    message = str(err.value)
    assert f"non-finite {nan_in} on this process at step 3" in message, message
    assert "post ids of this step's batches [3] on this process: [" in message
    assert ("(epoch 0, batch [3])" in message) == (nan_in == "loss")  # which batch of the step had it
    posts = message.split("on this process: [", 1)[1].split("]", 1)[0].split(", ")
    assert len(posts) == 4 and all(p.startswith(("fin", "his")) for p in posts), posts
    log_dir = next((tmp_path / "lightning_logs").iterdir())
    assert not (log_dir / "hf_model").exists(), "a model was exported after a non-finite step"
    ckpts = list((log_dir / "checkpoints").glob("*.ckpt"))
    assert [c.name for c in ckpts] == ["best-step=2.ckpt"], ckpts  # the last good checkpoint stays
    state = torch.load(ckpts[0], map_location="cpu", weights_only=False)["state_dict"]
    assert all(torch.isfinite(t).all() for t in state.values())


SNAPSHOTS: list[dict] = []


class Snapshot(Callback):
    """The trainable weights and AdamW's step count after each optimizer step (global step -> tensors)."""

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        opt = trainer.optimizers[0]
        steps = [float(s["step"]) for s in opt.state.values()]
        SNAPSHOTS.append({"step": trainer.global_step, "adam_steps": steps,
                          "weights": [p.detach().clone() for p in module.parameters() if p.requires_grad]})


@pytest.mark.parametrize("nan_in", ["loss", "gradient"])
def test_the_bad_update_is_skipped_on_the_device_and_training_stops_at_the_next_check(nan_in, small_compred,
                                                                                     tmp_path):
    """The second of 3 optimizer steps (global step 1) non-finite, logging every 100 steps, no checkpoint: its update
    is skipped on the device (weights and AdamW's step counts as after the first step, bit for bit), the third step
    trains, and the check at the end of training stops it there, naming step 1, with nothing exported."""
    SNAPSHOTS.clear()
    with pytest.raises(NonFiniteError) as err:
        main(["fit", *DEMO, *quiet(tmp_path), f"--data.dataset={small_compred}",
              "--model.class_path=tests.helpers.NaNAtStep", f"--model.init_args.nan_in={nan_in}",
              "--model.init_args.nan_at_step=1", "--trainer.max_steps=3", "--trainer.limit_val_batches=0",
              "--trainer.log_every_n_steps=100", "--checkpoints.every_n_steps=null", "--checkpoints.every_minutes=null",
              "--data.batch_size=4",
              '--trainer.callbacks+={"class_path": "tests.training.test_base.Snapshot"}'])
    message = str(err.value)
    assert f"non-finite {nan_in} on this process at step 1" in message and "1 later steps ran" in message, message
    first, bad, after = SNAPSHOTS
    assert (first["step"], bad["step"], after["step"]) == (1, 2, 3)
    assert bad["adam_steps"] == first["adam_steps"] and after["adam_steps"] == [2.0] * len(first["adam_steps"])
    assert all(torch.equal(a, b) for a, b in zip(first["weights"], bad["weights"]))
    assert not all(torch.equal(a, b) for a, b in zip(bad["weights"], after["weights"]))  # step 3 trained
    assert all(torch.isfinite(w).all() for w in after["weights"])
    assert not list(tmp_path.rglob("hf_model")) and not list(tmp_path.rglob("*.ckpt"))


def test_guard_costs_no_step_when_all_is_finite(small_compred, tmp_path):
    """Every step is finite: every update is applied (a guard that skipped them all would leave the step count
    at 3 and the weights finite, but the weights and AdamW's step counts unmoved)."""
    SNAPSHOTS.clear()
    cli = main(["fit", *DEMO, *quiet(tmp_path), f"--data.dataset={small_compred}",
                "--model.class_path=tests.helpers.NaNAtStep", "--model.init_args.nan_at_step=99",
                "--trainer.max_steps=3", "--trainer.limit_val_batches=0", "--model.init_args.export_dir=",
                '--trainer.callbacks+={"class_path": "tests.training.test_base.Snapshot"}'])
    assert cli.trainer.global_step == 3
    assert all(torch.isfinite(p).all() for p in cli.model.parameters())
    assert [s["adam_steps"] for s in SNAPSHOTS] == [[float(k)] * len(SNAPSHOTS[0]["adam_steps"]) for k in (1, 2, 3)]
    for before, after in zip(SNAPSHOTS, SNAPSHOTS[1:]):
        assert not all(torch.equal(a, b) for a, b in zip(before["weights"], after["weights"])), after["step"]


def test_tokenizer_without_eos_fails_at_start_up(tmp_path, tokenizer, small_compred):
    import json

    tokenizer.save_pretrained(tmp_path / "tok")
    cfg_path = tmp_path / "tok" / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("eos_token", None)
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="no EOS token"):
        main(["fit", *DEMO, *quiet(tmp_path), f"--data.dataset={small_compred}",
              f"--model.init_args.model_name_or_path={tmp_path / 'tok'}", "--trainer.max_steps=1"])
    assert not (tmp_path / "lightning_logs").exists() or not list(Path(tmp_path / "lightning_logs").rglob("*.ckpt"))

