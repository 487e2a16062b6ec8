"""The study command: every stage runs once, a rerun skips finished stages, a broken stage is redone
(and only what depends on it), a failed stage leaves nothing a rerun would trust."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from personalm import study
from personalm.evaluation import judge as judging
from personalm.evaluation.synthetic_judge import SyntheticJudge
from personalm.study.steps import Steps
from tests.helpers import kill_at, step_scalars, vllm_python

pytestmark = pytest.mark.slow  # every test here runs the study end to end (CI runs them too)

TINY = ["--trainer.max_steps=2", "--trainer.limit_val_batches=1", "--trainer.limit_test_batches=2",
        "--trainer.limit_predict_batches=1", "--model.init_args.generation.max_new_tokens=4"]


def study_args(root: Path, data: Path, dpo_args=(), n_boot: int = 50) -> list[str]:
    args = {"all": TINY, "dpo": list(dpo_args)}
    return ["--config", str(Path(study.REPO) / "configs/study/demo.yaml"), f"--root={root}", f"--dataset={data}",
            "--progress=false", f"--n_boot={n_boot}", f"--args={json.dumps(args)}"]


def run(root: Path, data: Path, dpo_args=(), n_boot: int = 50) -> dict:
    return study.main(study_args(root, data, dpo_args, n_boot))


def ran(capsys) -> list[str]:
    out = capsys.readouterr().out
    return [line.split("=== ")[1].split(" ===")[0] for line in out.splitlines() if line.startswith("[study] === ")]


@pytest.fixture(scope="module")
def first(small_compred, tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    return root, run(root, small_compred)


def test_study_runs_every_stage_and_writes_the_report(first, small_compred):
    data = small_compred
    root, done = first
    names = [s.name for s in study.stages(study.StudySettings())]
    assert list(done) == names
    assert all((root / n / "done.json").is_file() for n in names)
    report = (root / "report" / "report.md").read_text()
    for heading in ("Preference accuracy on test_pref", "Context vs no context", "Context vs random community"):
        assert heading in report
    assert "r/AskHistorians" in report and "95% CI" in report and str(data) in report
    assert (root / "report" / "win_rates.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    judged = json.loads((root / "judge_context_vs_random" / "judge.json").read_text())
    assert judged["a"] == "context" and judged["overall"]["n"] > 0 and len(judged["overall"]["ci95"]) == 2


def test_rerun_skips_finished_and_redoes_a_broken_stage_and_what_depends_on_it(first, small_compred, tmp_path, capsys):
    root = tmp_path / "study"  # a copy: the other tests start from the finished study as it was
    shutil.copytree(first[0], root)
    capsys.readouterr()
    run(root, small_compred)
    assert ran(capsys) == []  # everything finished: nothing runs again
    old_judge = (root / "judge_context_vs_random" / "judge.json").read_text()
    # an interrupted predict: its folder is there, its done.json is not
    (root / "predict_random" / "done.json").unlink()
    (root / "predict_random" / "predictions.jsonl").write_text('{"post_id": "half a li')
    run(root, small_compred)
    assert ran(capsys) == ["predict_random", "judge_context_vs_random", "report"]
    assert json.loads((root / "predict_random" / "done.json").read_text())["outputs"]
    stale = sorted(root.glob("judge_context_vs_random.stale-*"))
    assert stale and (stale[0] / "judge.json").read_text() == old_judge  # moved aside, not overwritten
    # a changed setting redoes the stages that depend on it, and only those
    run(root, small_compred, n_boot=60)
    assert ran(capsys) == ["judge_context_vs_no_context", "judge_context_vs_random", "report"]
    assert json.loads((root / "judge_context_vs_random" / "judge.json").read_text())["n_boot"] == 60


def test_failed_stage_leaves_no_trusted_output_and_the_rerun_resumes(small_compred, tmp_path, capsys):
    with pytest.raises(ValueError, match="beta"):
        run(tmp_path, small_compred, ["--model.init_args.beta=0"])
    assert (tmp_path / "sft_context" / "done.json").is_file()
    assert not (tmp_path / "dpo_context" / "done.json").exists()
    capsys.readouterr()
    with pytest.raises(ValueError, match="beta"):  # still refused; the finished SFT stages are not redone
        run(tmp_path, small_compred, ["--model.init_args.beta=0"])
    assert ran(capsys) == ["dpo_context"]


def test_isolated_stage_runs_the_cli_in_its_own_process(small_compred, tmp_path):
    """With ``isolate`` (multi-process strategies relaunch the command they started from) a stage is a
    ``python -m personalm`` subprocess; its outputs are found where the CLI writes them."""
    settings = study.parse(["--config", str(Path(study.REPO) / "configs/study/demo.yaml"), f"--root={tmp_path}",
                            f"--dataset={small_compred}", "--progress=false", "--isolate=true",
                            f"--args={json.dumps({'all': TINY})}"])
    stage = study.stages(settings)[0]
    done = study.run_stage(tmp_path, stage, {})
    assert done["outputs"]["model"] == "lightning_logs/version_0/hf_model"
    assert (tmp_path / stage.name / done["outputs"]["model"] / "config.json").is_file()


def test_a_study_killed_during_dpo_resumes_that_stage_from_its_checkpoint(small_compred, tmp_path, capsys):
    """The study process is SIGKILLed at step 3 of the first DPO stage (checkpoints every 2 steps). Rerun with
    the same settings, it skips the finished SFT stages, resumes DPO from step 2 in the same run folder
    (logs go on there) and finishes the study with the outputs an uninterrupted stage has."""
    marker = tmp_path / "killed-once"  # the kill happens in the first run only; the arguments stay the same
    dpo = ["--trainer.max_steps=6", "--checkpoints.every_n_steps=2", kill_at(3, once=marker)]
    root = tmp_path / "study"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    killed = subprocess.run([sys.executable, "-m", "personalm.study", *study_args(root, small_compred, dpo)],
                            env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9 and marker.exists(), killed.stdout[-3000:] + killed.stderr[-3000:]
    stage = root / "dpo_context"
    assert not (stage / "done.json").exists()
    assert (stage / "lightning_logs/version_0/checkpoints/last.ckpt").resolve().name == "step=2.ckpt"

    capsys.readouterr()
    done = run(root, small_compred, dpo)
    out = capsys.readouterr().out
    assert f"[study] === dpo_context === resuming from {stage.resolve()}/lightning_logs/version_0/checkpoints/" \
           "step=2.ckpt" in out, out[-3000:]
    assert [line for line in out.splitlines() if "dpo_context" in line and "resuming" in line]
    assert "[study] sft_context: done, skipped" in out
    assert done["dpo_context"]["outputs"] == {"model": "lightning_logs/version_0/hf_model",
                                              "logs": "lightning_logs/version_0",
                                              "checkpoint": "lightning_logs/version_0/checkpoints/step=6.ckpt"}
    assert sorted(step_scalars(stage / "lightning_logs/version_0")["train/loss"]) == [0, 1, 2, 3, 4, 5]  # steps 1-6
    assert (root / "report" / "report.md").is_file() and not (root / "dpo_context.stale").exists()


def test_prediction_stages_with_vllm_write_what_hf_wrote(first, small_compred, tmp_path):
    """The finished study, copied and rerun in the vLLM environment with ``predict_backend: vllm`` (64 prompts per
    call, as the HF stages' one batch of 64: all 32 test posts): only the prediction stages and what depends on them
    run again, and each predictions file is the one the HF backend wrote. (Token-for-token equality on a trained
    model, for every demo prompt, is ``tests/training/test_vllm_generation.py``'s.)"""
    root = tmp_path / "study"
    shutil.copytree(first[0], root)
    args = {"all": TINY, "predict": ["--model.init_args.generation.vllm.prompts_per_call=64"]}
    proc = subprocess.run([vllm_python(), "-m", "personalm.study", *study_args(root, small_compred)[:-1],
                           f"--args={json.dumps(args)}", "--predict_backend=vllm"], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHONWARNINGS": "ignore"}, cwd=study.REPO)
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-3000:]
    assert "[study] dpo_context: done, skipped" in out and "--model.init_args.generation.backend=vllm" in out
    for stage in ("predict_context", "predict_no_context", "predict_random"):
        (hf,) = root.glob(f"{stage}.stale-*")
        vllm = (root / stage / "predictions.jsonl").read_text()
        assert vllm == (hf / "predictions.jsonl").read_text() and len(vllm.splitlines()) == 32, stage
        assert len({json.loads(line)["response"] for line in vllm.splitlines()}) > 1, stage


def test_a_dpo_variant_runs_beside_plain_dpo_and_the_report_shows_both(first, small_compred, tmp_path, capsys):
    """The finished study, copied and rerun with a group-robust DPO variant: only the variant's stages and the
    report run; the report puts it beside plain DPO (accuracy with n, macro, worst), with its weights alpha at the
    end and its win rates against the model without context."""
    root = tmp_path / "study"
    shutil.copytree(first[0], root)
    capsys.readouterr()
    robust = ['--model.init_args.group_robust={"eta": 1.0, "start": "uniform"}']
    done = study.main([*study_args(root, small_compred), f"--dpo_variants={json.dumps({'robust': robust})}"])
    assert ran(capsys) == ["dpo_robust", "test_dpo_robust", "predict_robust", "judge_robust_vs_no_context", "report"]
    report = json.loads((root / "report" / "report.json").read_text())
    names = [v["name"] for v in report["variants"]]
    assert names == ["context", "robust"]
    plain, variant = report["variants"]
    assert variant["alpha"] and plain["alpha"] is None and len(variant["alpha"]) == 8
    assert set(variant["accuracy"]) >= {"r/AskHistorians", "all pairs", "macro", "worst"}
    assert variant["accuracy"]["all pairs"][1] == plain["accuracy"]["all pairs"][1] > 0  # the same test pairs
    assert "all" in variant["win_rates"] and done["judge_robust_vs_no_context"]["outputs"]["result"] == "judge.json"
    md = (root / "report" / "report.md").read_text()
    assert "## DPO variants, side by side" in md and "| community | pairs | context | robust |" in md
    assert "Weights alpha at the end of training:" in md


def test_the_synthetic_judge_redoes_the_judging_alone_and_the_report_says_so(first, small_compred, tmp_path, capsys):
    """The finished study, copied and rerun with ``judge: synthetic``: only the judge stages and the report run,
    their verdicts are the synthetic judge's own on the same predictions, and the report names the judge and counts
    the responses of no style. Where the tastes are unknown (a subset that is not synthetic) it stops first."""
    root = tmp_path / "study"
    shutil.copytree(first[0], root)
    capsys.readouterr()
    study.main([*study_args(root, small_compred), "--judge=synthetic"])
    assert ran(capsys) == ["judge_context_vs_no_context", "judge_context_vs_random", "report"]
    judged = json.loads((root / "judge_context_vs_no_context" / "judge.json").read_text())
    direct = judging.compare(root / "predict_context" / "predictions.jsonl",
                             root / "predict_no_context" / "predictions.jsonl", SyntheticJudge(["finance", "history"]),
                             name_a="context", name_b="no context", seed=judged["seed"], n_boot=judged["n_boot"])
    assert judged["judge"]["kind"] == "synthetic" and judged["overall"]["n"] > 0
    assert (judged["overall"], judged["communities"]) == (direct["overall"], direct["communities"])
    odd, cut = judged["judge"]["stats"]["no_style"], judged["judge"]["stats"]["incomplete"]
    md = (root / "report" / "report.md").read_text()
    assert "the synthetic data's own tastes" in md
    assert (f"responses of no style: {odd['a']} of context's, {odd['b']} of no context's; opening a style but not "
            f"one of its comments in full: {cut['a']} of context's, {cut['b']} of no context's") in md
    with pytest.raises(SystemExit, match=r"judge synthetic: .*politics"):
        study.main([*study_args(root, small_compred), "--judge=synthetic", "--subsets=[politics]"])
    with pytest.raises(SystemExit, match=r"judge synthetic: dataset allenai/compred is neither"):
        study.main([*study_args(root, small_compred), "--judge=synthetic", "--dataset=allenai/compred"])
    assert ran(capsys) == []


def test_predict_backend_vllm_without_vllm_fails_before_any_stage(small_compred, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm raises ImportError, as where it is not installed
    with pytest.raises(SystemExit, match="predict_backend vllm: generation.backend vllm needs vLLM"):
        study.main([*study_args(tmp_path, small_compred), "--predict_backend=vllm"])
    assert not list(tmp_path.iterdir())  # nothing ran


@pytest.mark.parametrize("name", ["random", "context", "no_context", "two words"])
def test_a_dpo_variant_may_not_take_a_stage_of_the_study(name):
    with pytest.raises(ValueError, match="are not the study's own|letters, digits"):
        study.stages(study.StudySettings(dpo_variants={name: []}))


@pytest.mark.parametrize("logger", ["csv", "wandb"])
def test_stages_find_their_outputs_under_another_logger(logger, small_compred, tmp_path):
    """A fit stage and a test stage with a CSV logger of its own name or a W&B logger (offline; through the
    study's ``args``): each finds its export or metrics in its CLI run's folder, not in the logger's."""
    logs = tmp_path / "logs"
    chosen = {"csv": ["--trainer.logger=CSVLogger", f"--trainer.logger.init_args.save_dir={logs}",
                      "--trainer.logger.init_args.name=csv"],
              "wandb": ["--trainer.logger=WandbLogger", f"--trainer.logger.init_args.save_dir={logs}",
                        "--trainer.logger.init_args.offline=true"]}
    settings = study.parse(["--config", str(Path(study.REPO) / "configs/study/demo.yaml"), f"--root={tmp_path}",
                            f"--dataset={small_compred}", "--progress=false",
                            f"--args={json.dumps({'all': [*TINY, *chosen[logger]]})}"])
    steps = Steps(settings)
    fitted = study.run_stage(tmp_path, steps.fit("sft", "sft", context=True), {})
    tested = study.run_stage(tmp_path, steps.test("test", "dpo", "sft", context=True), {"sft": fitted})
    assert fitted["outputs"]["model"] == "lightning_logs/version_0/hf_model"
    assert (tmp_path / "sft" / fitted["outputs"]["model"] / "config.json").is_file()
    metrics = json.loads((tmp_path / "test" / tested["outputs"]["metrics"]).read_text())
    assert metrics["model"] == str(tmp_path / "sft" / fitted["outputs"]["model"]) and metrics["conditioning"]
    assert list(logs.rglob("metrics.csv" if logger == "csv" else "*.wandb"))  # the logger logged, where it logs
