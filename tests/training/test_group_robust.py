"""Group-robust weights over communities (``personalm.training.group_robust``): the update on a hand-computed
example, eta 0 as the baselines its start implies, the same alpha on 2 processes as on 1, and exact resume."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from personalm.cli import main
from personalm.training.group_robust import RECORD, GroupRobustSettings, GroupWeights
from tests.helpers import DEMO_DPO, DEMO_REWARD, kill_at, quiet, safetensors_diff, step_scalars

COMMUNITIES, COUNTS = ["a", "b", "c"], [6, 3, 1]  # N = 10 training pairs


def test_two_steps_by_hand():
    """The reference code's rule (``eta_per: step``, ``decay: 0``): alpha starts at the shares [0.6, 0.3, 0.1]; eta
    0.5; the scaled-sum loss L_g = (N / N_g) sum_g l / B.

    Step 1, one micro-batch: a, a, b with losses 1.0, 0.5, 2.0 (B = 3). The pair weights w_g = alpha_g N / N_g are
    all 1, so the objective is the plain mean 3.5 / 3. L = [(10/6)(1.5)/3, (10/3)(2)/3, 0] = [0.833333, 2.222222, 0]
    (c is absent: its factor is exp(0) = 1). alpha * exp(0.5 L) = [0.6 * 1.516897, 0.3 * 3.037732, 0.1 * 1] =
    [0.910138, 0.911320, 0.1], sum 1.921458: alpha = [0.473671, 0.474286, 0.052044].

    Step 2, two micro-batches (accumulation): c with loss 3.0, then a with 1.0 (B = 2). They train with step 1's
    alpha: objectives 3.0 * 0.052044 * 10 = 1.561315 and 1.0 * 0.473671 * 10 / 6 = 0.789451. L = [(10/6)(1)/2, 0,
    10 * 3 / 2] = [0.833333, 0, 15]; b is absent (factor 1). alpha * exp(0.5 L) = [0.718509, 0.474286, 94.097440],
    sum 95.290235: alpha = [0.007540, 0.004977, 0.987483]."""
    w = GroupWeights(GroupRobustSettings(eta=0.5, eta_per="step", decay=0.0, start="share"), COMMUNITIES, COUNTS)
    assert_close(w.alpha, torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64))
    first = w.objective(torch.tensor([1.0, 0.5, 2.0]), ["a", "a", "b"])
    assert_close(first, torch.tensor(3.5 / 3))
    w.step()
    assert_close(w.alpha, torch.tensor([0.4736706512, 0.4742855257, 0.0520438231], dtype=torch.float64))
    assert_close(w.objective(torch.tensor([3.0]), ["c"]), torch.tensor(1.5613146929))
    assert_close(w.objective(torch.tensor([1.0]), ["a"]), torch.tensor(0.7894510853))
    w.step()
    assert_close(w.alpha, torch.tensor([0.0075402217, 0.0049772731, 0.9874825052], dtype=torch.float64))
    assert float(w.pairs) == 0 and float(w.loss_sums.abs().sum()) == 0  # the next step's sums start again


def test_eta_per_epoch_scales_a_step_by_its_share_of_the_epoch():
    """``eta_per: epoch`` (the default): step 1 of the example above (a, a, b with losses 1.0, 0.5, 2.0; B = 3,
    N = 10) scales L = [0.833333, 2.222222, 0] by B / N = 0.3: the exponents are eta * sum_g l / N_g = 0.5 * [1.5 / 6,
    2 / 3, 0] = [0.125, 0.333333, 0]; alpha * exp = [0.679889, 0.418684, 0.1], sum 1.198573: alpha = [0.567249,
    0.349319, 0.083433]. The objective is the same as the reference rule's (only the update is scaled)."""
    w = GroupWeights(GroupRobustSettings(eta=0.5), COMMUNITIES, COUNTS)
    assert_close(w.objective(torch.tensor([1.0, 0.5, 2.0]), ["a", "a", "b"]), torch.tensor(3.5 / 3))
    w.step()
    assert_close(w.alpha, torch.tensor([0.5672488748, 0.3493185627, 0.0834325625], dtype=torch.float64))


def test_decay_pulls_log_alpha_over_start_back_before_the_step_by_hand():
    """``decay: 5`` per epoch, the epoch example's two steps. Step 1 starts at the start, so it is step 1 above:
    alpha1 = [0.567249, 0.349319, 0.083433]. Step 2 (c with loss 3.0, then a with 1.0; B = 2, share 0.2): log(alpha1 /
    start) = [-0.056132, 0.152202, -0.181132] times exp(-5 * 0.2) = 0.367879 is [-0.020650, 0.055992, -0.066635];
    plus eta * share * L = 0.5 * 0.2 * [0.833333, 0, 15] = [0.083333, 0, 1.5]: [0.062684, 0.055992, 1.433365];
    start * exp(that) = [0.638814, 0.317277, 0.419279], sum 1.375369: alpha = [0.464467, 0.230685, 0.304848]
    (without decay: [0.460183, 0.260728, 0.279089]). With ``eta_per: step`` the pull is still per epoch,
    exp(-decay * B / N) (step 2: exp(-0.2)), and the exponent is eta * L, unscaled."""
    alphas = {}
    for decay in (5.0, 0.0):
        w = GroupWeights(GroupRobustSettings(eta=0.5, decay=decay), COMMUNITIES, COUNTS)
        w.objective(torch.tensor([1.0, 0.5, 2.0]), ["a", "a", "b"])
        w.step()
        assert_close(w.alpha, torch.tensor([0.5672488748, 0.3493185627, 0.0834325625], dtype=torch.float64))
        w.objective(torch.tensor([3.0]), ["c"])
        w.objective(torch.tensor([1.0]), ["a"])
        w.step()
        alphas[decay] = w.alpha
    assert_close(alphas[5.0], torch.tensor([0.4644672436, 0.2306847529, 0.3048480035], dtype=torch.float64))
    assert_close(alphas[0.0], torch.tensor([0.460183, 0.260728, 0.279089], dtype=torch.float64), rtol=0, atol=1e-6)
    per_step = GroupWeights(GroupRobustSettings(eta=0.5, eta_per="step", decay=1.0), COMMUNITIES, COUNTS)
    start = torch.tensor(COUNTS, dtype=torch.float64) / 10
    per_step.objective(torch.tensor([1.0, 0.5, 2.0]), ["a", "a", "b"])
    per_step.step()
    first = per_step.alpha
    per_step.objective(torch.tensor([3.0]), ["c"])
    per_step.objective(torch.tensor([1.0]), ["a"])
    per_step.step()
    pulled = torch.log(start) + math.exp(-1.0 * 2 / 10) * torch.log(first / start)
    expected = torch.softmax(pulled + 0.5 * torch.tensor([10 / 12, 0.0, 15.0], dtype=torch.float64), dim=0)
    assert_close(per_step.alpha, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("per", ["epoch", "step"])
def test_with_decay_alpha_settles_and_goes_back_to_its_start_once_the_losses_even_out(per):
    """Steps of all 10 pairs (B = N: a share of 1 either way). While c's loss is higher, alpha settles at the fixed
    point of z <- exp(-decay) z + eta L, z = log(alpha / start): softmax(log start + eta L / (1 - exp(-decay))).
    Once every community's loss is the same, alpha goes back to its start with decay and stays where it was without
    (equal losses move no community against another)."""
    groups = ["a"] * 6 + ["b"] * 3 + ["c"]
    behind = torch.tensor([0.3] * 6 + [0.5] * 3 + [1.5], dtype=torch.float64)
    start = torch.tensor(COUNTS, dtype=torch.float64) / 10
    ends = {}
    for decay in (1.0, 0.0):
        w = GroupWeights(GroupRobustSettings(eta=0.5, eta_per=per, decay=decay), COMMUNITIES, COUNTS)
        for _ in range(60):
            w.objective(behind, groups)
            w.step()
        if decay:
            settled = torch.softmax(torch.log(start) + 0.5 * torch.tensor([0.3, 0.5, 1.5], dtype=torch.float64)
                                    / (1 - math.exp(-decay)), dim=0)
            assert_close(w.alpha, settled, rtol=0, atol=1e-12)
        caught_up = w.alpha.clone()
        for _ in range(60):
            w.objective(torch.full((10,), 0.4, dtype=torch.float64), groups)
            w.step()
        ends[decay] = (caught_up, w.alpha)
    assert_close(ends[1.0][1], start, rtol=0, atol=1e-12)
    assert float(ends[1.0][0][2]) > 0.15  # it had moved: the check can tell
    assert_close(ends[0.0][1], ends[0.0][0], rtol=0, atol=1e-12)
    assert float(ends[0.0][1][2]) > 0.99


@pytest.mark.parametrize("per", ["epoch", "step"])
def test_over_an_epoch_alpha_moves_by_eta_times_each_mean_loss_whatever_the_batch(per):
    """Without decay, the same 10 pairs (losses fixed) in one step, in steps of 5 and in steps of 1: with
    ``eta_per: epoch`` alpha ends at softmax(log share + eta * each community's mean loss) every time; with the
    reference rule only the one step of the whole epoch does (B / N = 1) and smaller batches move alpha further."""
    groups = ["a", "b", "a", "c", "a", "b", "a", "a", "b", "a"]
    losses = torch.tensor([0.2, 1.0, 0.4, 2.5, 0.3, 0.8, 0.1, 0.5, 1.2, 0.6], dtype=torch.float64)
    ends = []
    for size in (10, 5, 1):
        w = GroupWeights(GroupRobustSettings(eta=2.0, eta_per=per, decay=0.0), COMMUNITIES, COUNTS)
        for start in range(0, 10, size):
            w.objective(losses[start:start + size], groups[start:start + size])
            w.step()
        ends.append(w.alpha)
    means = torch.tensor([2.1 / 6, 3.0 / 3, 2.5 / 1], dtype=torch.float64)
    expected = torch.softmax(torch.log(torch.tensor(COUNTS, dtype=torch.float64) / 10) + 2.0 * means, dim=0)
    if per == "epoch":
        for end in ends:
            assert_close(end, expected, rtol=0, atol=1e-12)
    else:
        assert_close(ends[0], expected, rtol=0, atol=1e-12)
        assert float((ends[1] - expected).abs().max()) > 0.05 and float((ends[2] - expected).abs().max()) > 0.1


def test_eta_0_is_the_baseline_its_start_implies():
    """eta 0 never moves alpha. Started at the shares, the objective and its gradient are plain DPO's mean; started
    uniform, each pair is weighted N / (G N_g) = [10/18, 10/9, 10/3]: the inverse share of its community."""
    losses = torch.tensor([0.3, 1.2, 0.7, 2.0, 0.1], requires_grad=True)
    groups = ["a", "b", "a", "c", "b"]
    share = GroupWeights(GroupRobustSettings(eta=0.0, start="share"), COMMUNITIES, COUNTS)
    for _ in range(3):
        objective = share.objective(losses, groups)
        (grad,) = torch.autograd.grad(objective, losses)
        assert_close(objective, losses.mean(), rtol=0, atol=1e-7)
        assert_close(grad, torch.full((5,), 1 / 5), rtol=0, atol=1e-8)
        share.step()
    assert_close(share.alpha, torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64))
    uniform = GroupWeights(GroupRobustSettings(eta=0.0, start="uniform"), COMMUNITIES, COUNTS)
    inverse = torch.tensor([10 / 18, 10 / 9, 10 / 3])[torch.tensor([0, 1, 0, 2, 1])]
    (grad,) = torch.autograd.grad(uniform.objective(losses, groups), losses)
    assert_close(grad, inverse / 5)
    uniform.step()
    assert_close(uniform.alpha, torch.full((3,), 1 / 3, dtype=torch.float64))


def test_balanced_draws_are_weighted_back_out():
    """With community-balanced draws (each community a third of them, q = 1/3), a pair weighs alpha_g / q_g: at the
    shares [0.6, 0.3, 0.1] that is [1.8, 0.9, 0.3], so a large community's few draws count for its many pairs (eta 0
    is plain DPO's objective in expectation); the step's L_g divides by B q_g: c's one loss of 3.0 in a step of 3
    pairs gives 3.0 / (3 / 3) = 3.0, its mean loss, not the 30.0 of N / N_g scaling."""
    w = GroupWeights(GroupRobustSettings(eta=1.0, eta_per="step"), COMMUNITIES, COUNTS, drawn=[1 / 3] * 3)
    losses = torch.tensor([1.0, 1.0, 3.0], requires_grad=True)
    (grad,) = torch.autograd.grad(w.objective(losses, ["a", "b", "c"]), losses)
    assert_close(grad, torch.tensor([1.8, 0.9, 0.3]) / 3)
    w.step()
    expected = torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64) * torch.exp(torch.tensor([1.0, 1.0, 3.0],
                                                                                           dtype=torch.float64))
    assert_close(w.alpha, expected / expected.sum())


def test_large_losses_do_not_overflow_and_settings_are_checked():
    w = GroupWeights(GroupRobustSettings(eta=100.0), COMMUNITIES, COUNTS)
    w.objective(torch.tensor([50.0]), ["c"])
    w.step()
    assert torch.isfinite(w.alpha).all() and float(w.alpha[2]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="eta must be >= 0"):
        GroupRobustSettings(eta=-1)
    with pytest.raises(ValueError, match="eta_per must be epoch or step"):
        GroupRobustSettings(eta_per="batch")
    with pytest.raises(ValueError, match="decay must be >= 0"):
        GroupRobustSettings(decay=-0.5)
    with pytest.raises(ValueError, match="start must be share or uniform"):
        GroupRobustSettings(start="equal")


def _dpo_args(root, data, start, *extra):
    return [*DEMO_DPO, *quiet(root), f"--data.dataset={data}", f"--model.init_args.model_name_or_path={start}",
            "--data.max_train_pairs=null", "--data.subset=finance", "--trainer.limit_val_batches=0", *extra]


def test_dpo_with_eta_0_at_the_shares_trains_plain_dpos_weights(sft_run, small_compred, tmp_path):
    """Four DPO steps with and without ``group_robust: {eta: 0}`` (alpha at the shares): the same weights (1e-6),
    and the record beside the export holds alpha, unmoved."""
    sft, _ = sft_run
    plain = main(["fit", *_dpo_args(tmp_path / "plain", small_compred, sft.model.export_path,
                                    "--trainer.max_steps=4")])
    robust = main(["fit", *_dpo_args(tmp_path / "robust", small_compred, sft.model.export_path,
                                     "--trainer.max_steps=4", '--model.init_args.group_robust={"eta": 0.0}')])
    assert safetensors_diff(plain.model.export_path, robust.model.export_path) <= 1e-6
    assert safetensors_diff(sft.model.export_path, plain.model.export_path) > 1e-4  # both trained: the check can tell
    record = json.loads((Path(robust.model.export_path) / RECORD).read_text())
    shares = {c: n / sum(record["pairs"].values()) for c, n in record["pairs"].items()}
    assert record["alpha"] == pytest.approx(shares) and len(shares) == 4


def test_reward_model_takes_the_same_weights(sft_run, small_compred, tmp_path):
    """The reward model with ``group_robust``: alpha moves towards the communities it gets wrong, logged per
    community, recorded beside the export."""
    sft, _ = sft_run
    cli = main(["fit", *DEMO_REWARD, *quiet(tmp_path), f"--data.dataset={small_compred}",
                f"--model.init_args.model_name_or_path={sft.model.export_path}", "--trainer.max_steps=5",
                "--trainer.limit_val_batches=0",
                '--model.init_args.group_robust={"eta": 1.0, "eta_per": "step", "decay": 0.0, "start": "uniform"}',
                "--trainer.log_every_n_steps=1"])
    record = json.loads((Path(cli.model.export_path) / RECORD).read_text())
    assert len(record["alpha"]) == 8 and max(record["alpha"].values()) > 1 / 8 > min(record["alpha"].values())
    logged = step_scalars(Path(cli.trainer.log_dir))
    assert len(logged["train/group_robust/alpha/r_Frugal"]) == 5
    assert logged["train/group_robust/alpha/r_Frugal"][4] == pytest.approx(record["alpha"]["Frugal"], abs=1e-6)


# the reference rule: alpha carries every step's losses (a resume that lost it would show); it moves in 6-8 steps
GR = '--model.init_args.group_robust={"eta": 2.0, "eta_per": "step", "decay": 0.0}'


@pytest.mark.slow
def test_two_processes_hold_the_alpha_of_one_process_over_the_same_pairs(sft_run, small_compred, tmp_path):
    """DDP on 2 gloo processes with 4 pairs each a step, against 1 process with 8: the sampler's one shuffle puts
    the same 8 pairs in each step, the per-community sums and the step's pair count (``eta_per: epoch`` scales by
    B / N, and so does the default decay) are reduced across processes, so alpha after 6 steps is the same (1e-6),
    and so are the weights."""
    sft, _ = sft_run
    common = _dpo_args(tmp_path, small_compred, sft.model.export_path, "--trainer.max_steps=6",
                       '--model.init_args.group_robust={"eta": 20.0, "eta_per": "epoch"}')
    one = main(["fit", *common, "--data.batch_size=8", f"--trainer.default_root_dir={tmp_path / 'one'}"])
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    two = subprocess.run([sys.executable, "-m", "personalm", "fit", *common, "--data.batch_size=4",
                          f"--trainer.default_root_dir={tmp_path / 'two'}", "--trainer.accelerator=cpu",
                          "--trainer.devices=2", "--trainer.strategy=ddp"], env=env, capture_output=True, text=True,
                         timeout=300)
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    export = next((tmp_path / "two").rglob("hf_model"))
    a, b = (json.loads((Path(p) / RECORD).read_text())["alpha"] for p in (one.model.export_path, export))
    assert a == pytest.approx(b, abs=1e-6)
    record = json.loads((Path(one.model.export_path) / RECORD).read_text())
    shares = {c: n / sum(record["pairs"].values()) for c, n in record["pairs"].items()}
    assert max(abs(a[c] - shares[c]) for c in a) > 0.05  # alpha moved from its start: the check can tell
    assert safetensors_diff(one.model.export_path, export) <= 1e-5


@pytest.mark.slow
def test_group_robust_dpo_killed_and_resumed_ends_with_the_same_weights_and_alpha(sft_run, small_compred, tmp_path):
    """Group-robust DPO with balanced draws (tau 0) and a stratified cap, 2 micro-batches a step, a checkpoint
    every 2 steps, SIGKILLed at step 5 and resumed with ``--ckpt_path last``: the export and alpha equal the
    uninterrupted run's (1e-6), and so do the logged alphas after the resume point."""
    sft, _ = sft_run
    args = _dpo_args(tmp_path, small_compred, sft.model.export_path, GR, "--trainer.max_steps=8",
                     "--trainer.accumulate_grad_batches=2", "--data.batch_size=4", "--data.community_tau=0",
                     "--data.max_train_pairs=60", "--data.cap_floor=10", "--checkpoints.every_n_steps=2",
                     "--trainer.log_every_n_steps=1")
    args = [a for a in args if not a.startswith("--trainer.default_root_dir")]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}

    def fit(root, *extra):
        return subprocess.run([sys.executable, "-m", "personalm", "fit", *args, f"--trainer.default_root_dir={root}",
                               *extra], env=env, capture_output=True, text=True, timeout=300)
    main(["fit", *args, f"--trainer.default_root_dir={tmp_path / 'full'}"])
    killed = fit(tmp_path / "killed", kill_at(5))
    assert killed.returncode == -9, killed.stderr[-2000:]
    resumed = fit(tmp_path / "killed", "--ckpt_path=last")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    full, again = (tmp_path / run / "lightning_logs" / "version_0" for run in ("full", "killed"))
    assert safetensors_diff(full / "hf_model", again / "hf_model") <= 1e-6
    a, b = (json.loads((run / "hf_model" / RECORD).read_text())["alpha"] for run in (full, again))
    assert a == pytest.approx(b, abs=1e-6) and max(a.values()) - min(a.values()) > 0.05
    logged_full, logged_again = step_scalars(full), step_scalars(again)
    tag = "train/group_robust/alpha/r_investing"
    assert {s: v for s, v in logged_full[tag].items() if s > 4} == pytest.approx(
        {s: logged_again[tag][s] for s in logged_full[tag] if s > 4}, abs=1e-6)
    assert not math.isnan(sum(a.values()))
