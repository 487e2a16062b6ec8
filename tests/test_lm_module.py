"""What every module shares: the NaN guard (a non-finite loss or gradient stops training before the update,
with the step and the batch's posts named, and nothing exported)."""

from pathlib import Path
from typing import Optional

import pytest
import torch

from personalm.cli import main
from personalm.lm_module import NonFiniteError
from personalm.sft import SFTModule
from tests.conftest import DEMO, quiet


class NaNAtStep(SFTModule):
    """SFT that turns its loss (or one gradient) into NaN at optimizer step ``nan_at_step``, on process
    ``nan_rank`` (all processes when None)."""

    def __init__(self, nan_at_step: int = 3, nan_in: str = "loss", nan_rank: Optional[int] = None, **kwargs):
        super().__init__(**kwargs)
        self.nan_at_step, self.nan_in, self.nan_rank = nan_at_step, nan_in, nan_rank

    def _now(self) -> bool:
        return (self.training and self.trainer.global_step == self.nan_at_step
                and self.nan_rank in (None, self.global_rank))

    def model_step(self, batch):
        loss = super().model_step(batch)
        return loss * float("nan") if self.nan_in == "loss" and self._now() else loss

    def on_after_backward(self) -> None:
        if self.nan_in == "gradient" and self._now():
            next(p for p in self.parameters() if p.grad is not None).grad.view(-1)[0] = float("inf")


@pytest.mark.parametrize("nan_in", ["loss", "gradient"])
def test_non_finite_step_stops_training_names_step_and_posts_and_exports_nothing(nan_in, small_compred, tmp_path):
    with pytest.raises(NonFiniteError) as err:
        main(["fit", "--config", DEMO, *quiet(tmp_path), f"--data.dataset={small_compred}",
              "--model.class_path=tests.test_lm_module.NaNAtStep", f"--model.init_args.nan_in={nan_in}",
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
    assert [c.name for c in ckpts] == ["epoch=0-step=2.ckpt"], ckpts  # the last good checkpoint stays
    state = torch.load(ckpts[0], map_location="cpu", weights_only=False)["state_dict"]
    assert all(torch.isfinite(t).all() for t in state.values())


def test_guard_costs_no_step_when_all_is_finite(small_compred, tmp_path):
    cli = main(["fit", "--config", DEMO, *quiet(tmp_path), f"--data.dataset={small_compred}",
                "--model.class_path=tests.test_lm_module.NaNAtStep", "--model.init_args.nan_at_step=99",
                "--trainer.max_steps=3", "--trainer.limit_val_batches=0", "--model.init_args.export_dir="])
    assert cli.trainer.global_step == 3
    assert all(torch.isfinite(p).all() for p in cli.model.parameters())


def test_tokenizer_without_eos_fails_at_start_up(tmp_path, tokenizer, small_compred):
    import json

    tokenizer.save_pretrained(tmp_path / "tok")
    cfg_path = tmp_path / "tok" / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("eos_token", None)
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="no EOS token"):
        main(["fit", "--config", DEMO, *quiet(tmp_path), f"--data.dataset={small_compred}",
              f"--model.init_args.model_name_or_path={tmp_path / 'tok'}", "--trainer.max_steps=1"])
    assert not (tmp_path / "lightning_logs").exists() or not list(Path(tmp_path / "lightning_logs").rglob("*.ckpt"))
