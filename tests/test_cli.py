"""The CLI end to end, in-process (``LightningCLI(args=[...])``): fit, validate, predict on small data."""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from personalm.cli import main
from personalm.data import synthetic
from tests.helpers import DEMO, quiet, scalars


def test_fit_writes_tensorboard_scalars_and_val_loss_falls(sft_run):
    cli, root = sft_run
    log_dir = Path(cli.trainer.log_dir)
    assert log_dir.parent == root / "lightning_logs" and log_dir.name.startswith("version_")
    found = scalars(log_dir)
    assert len(found["train/loss"]) >= 3 and "train/tokens_per_sec" in found
    val = found["val/loss"]
    assert len(val) >= 3, val
    assert val[-1] < val[0] - 0.1, f"val/loss did not fall: {val}"
    assert list((log_dir / "checkpoints").glob("*.ckpt")), "no checkpoint written"


def test_export_loads_with_plain_transformers(sft_run, tokenizer):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cli, _ = sft_run
    export = Path(cli.model.export_path)
    model = AutoModelForCausalLM.from_pretrained(export)
    tok = AutoTokenizer.from_pretrained(export)
    assert tok.get_vocab() == tokenizer.get_vocab()
    trained = cli.model.model.state_dict()
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, trained[name], msg=name)


def test_predict_writes_one_line_per_post(sft_run, small_compred, tmp_path):
    cli, _ = sft_run
    out = tmp_path / "preds.jsonl"
    main(["predict", *DEMO, *quiet(tmp_path), f"--data.dataset={small_compred}",
          f"--model.init_args.model_name_or_path={cli.model.export_path}", f"--predictions.output_path={out}",
          "--model.init_args.generation.max_new_tokens=8", "--data.eval_batch_size=3"])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    expected = [r["post_id"] for r in synthetic.prompt_rows("finance", 4)]
    expected += [r["post_id"] for r in synthetic.prompt_rows("history", 4)]
    assert [r["post_id"] for r in rows] == list(dict.fromkeys(expected))  # each post once, file order
    for r in rows:
        assert set(r) == {"post_id", "community", "prompt_community", "title", "post", "prompt", "response"}
        assert r["prompt_community"] == r["community"]  # contextualized
        assert r["prompt"].startswith(f"<|domain|>\n{r['community']}\n<|user|>\n{r['title']}\n")
        assert r["prompt"].endswith("<|assistant|>\n")
        assert r["prompt"] not in r["response"]
    assert not list(tmp_path.glob("*.part")), "per-rank part files left behind"


def test_predict_without_context_and_with_random_community(sft_run, small_compred, tmp_path):
    cli, _ = sft_run
    for extra, check in ((["--data.contextualize=False"], lambda r: r["prompt_community"] == "Reddit"),
                         (["--data.random_community=true"],
                          lambda r: r["prompt_community"].startswith("r/")
                          and r["prompt_community"] != r["community"])):
        out = tmp_path / f"preds{len(extra[0])}.jsonl"
        main(["predict", *DEMO, *quiet(tmp_path), f"--data.dataset={small_compred}",
              f"--model.init_args.model_name_or_path={cli.model.export_path}", f"--predictions.output_path={out}",
              "--model.init_args.generation.max_new_tokens=4", *extra])
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        assert rows and all(check(r) for r in rows), rows[0]


def test_fit_on_unseen_parquet_folder(tmp_path):
    """A folder this project never wrote: parquet, other subset name, labels 0 and 1, SHP-style domains."""
    root = tmp_path / "elsewhere"
    for split, n in (("train_pref", 6), ("validation_pref", 2), ("test_pref", 2)):
        rows = list(synthetic.preference_rows("history", split, n, seed=7))
        assert {r["labels"] for r in rows} == {0, 1}
        (root / "askstuff").mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows), root / "askstuff" / f"{split}.parquet")
    cli = main(["fit", *DEMO, *quiet(tmp_path), f"--data.dataset={root}", "--data.subset=askstuff",
                "--trainer.max_steps=3", "--trainer.limit_val_batches=1", "--model.init_args.export_dir="])
    assert cli.trainer.global_step == 3
    assert cli.datamodule.stats["train_pref"].rows_out > 0
    assert "train/loss" in cli.trainer.logged_metrics


def test_validate_subcommand(sft_run, small_compred, tmp_path):
    cli, _ = sft_run
    v = main(["validate", *DEMO, *quiet(tmp_path), f"--data.dataset={small_compred}",
              f"--model.init_args.model_name_or_path={cli.model.export_path}"])
    assert "val/loss" in v.trainer.callback_metrics


def test_runs_with_an_mlflow_logger_keep_their_own_folders(small_compred, tmp_path, monkeypatch):
    """Two fits into one root with an MLflow logger (a local file store, whose folder is not versioned by run):
    each run's checkpoints, export and config.yaml are in its own ``lightning_logs/version_<N>``, none in MLflow's
    folder, and the second run overwrites nothing of the first."""
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks for it to write a local file store
    args = ["fit", *DEMO, *quiet(tmp_path), f"--data.dataset={small_compred}", "--trainer.limit_val_batches=0",
            "--trainer.logger=MLFlowLogger", f"--trainer.logger.init_args.tracking_uri=file:{tmp_path / 'mlruns'}"]
    first = main([*args, "--trainer.max_steps=1"])
    second = main([*args, "--trainer.max_steps=2"])
    for cli, version, step in ((first, 0, 1), (second, 1, 2)):
        folder = tmp_path / "lightning_logs" / f"version_{version}"
        assert Path(cli.model.export_path) == folder / "hf_model"
        assert (folder / "hf_model" / "model.safetensors").is_file() and (folder / "config.yaml").is_file()
        assert (folder / "checkpoints" / "last.ckpt").resolve().name == f"step={step}.ckpt"
    assert not [p for p in (tmp_path / "mlruns").rglob("*") if p.name in ("hf_model", "checkpoints", "config.yaml")]
    assert len(list((tmp_path / "mlruns").glob("*/*/metrics"))) == 2  # two MLflow runs, logged where MLflow logs
