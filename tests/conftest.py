"""Shared fixtures: offline, caches in a temp folder, small synthetic ComPreD data, the tiny tokenizer."""

import os
import tempfile

# before anything imports datasets / transformers: never touch the network or the user's caches
_CACHE = tempfile.mkdtemp(prefix="personalm-tests-")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["PERSONALM_CACHE"] = os.path.join(_CACHE, "personalm")
os.environ["HF_DATASETS_CACHE"] = os.path.join(_CACHE, "datasets")

import json  # noqa: E402
import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from personalm import synthetic  # noqa: E402

SMALL_POSTS = {"train_pref": 10, "validation_pref": 3, "test_pref": 4}


@pytest.fixture(scope="session")
def tokenizer():
    from personalm.models import load_tokenizer

    return load_tokenizer("embedded:tiny-llama")


def write_mistral_tokenizer(folder: Path) -> Path:
    """The Mistral-7B v0.1 SentencePiece tokenizer (32,000 tokens, Llama-2's scheme: BOS, "▁" prefixes, byte
    fallback), shipped inside the mistral-common wheel (no download), in a folder AutoTokenizer loads.

    ``LlamaTokenizer(vocab_file=...)`` on that file gives a 3-token vocabulary under transformers 5;
    ``AutoTokenizer`` on a folder with ``tokenizer.model`` and this ``tokenizer_config.json`` loads all of it.
    """
    import mistral_common

    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1", folder / "tokenizer.model")
    config = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
              "add_bos_token": True, "add_eos_token": False, "legacy": False, "model_max_length": 4096}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="session")
def mistral_tokenizer(tmp_path_factory):
    from personalm.models import load_tokenizer

    tok = load_tokenizer(str(write_mistral_tokenizer(tmp_path_factory.mktemp("mistral-tokenizer"))))
    assert len(tok) == 32000 and tok.bos_token_id == 1 and tok.eos_token_id == 2
    return tok


@pytest.fixture(scope="session")
def small_compred(tmp_path_factory) -> Path:
    """A small synthetic ComPreD folder in the Hub layout (jsonl): finance and history subsets."""
    return synthetic.write_dataset(tmp_path_factory.mktemp("data") / "compred", n_posts=SMALL_POSTS)


@pytest.fixture(scope="session")
def train_compred(tmp_path_factory) -> Path:
    """Like ``small_compred`` with 40 training posts per community: enough for SFT and DPO to learn
    each community's taste in a few dozen steps (the DPO tests need a model that has learned something)."""
    posts = {**SMALL_POSTS, "train_pref": 40}
    return synthetic.write_dataset(tmp_path_factory.mktemp("train-data") / "compred", n_posts=posts)


def write_jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return path


def pref_rows(n_posts: int = 3, subset: str = "finance", split: str = "train_pref") -> list[dict]:
    """Valid preference rows (every schema field), to corrupt in bad-input tests."""
    return list(synthetic.preference_rows(subset, split, n_posts))


CONFIGS = Path(__file__).resolve().parents[1] / "configs"
DEMO = str(CONFIGS / "demo" / "sft.yaml")
DEMO_DPO = str(CONFIGS / "demo" / "dpo.yaml")


def scalars(log_dir: Path) -> dict:
    """TensorBoard scalars of a run: tag -> values in logging order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def quiet(root: Path) -> list[str]:
    return [f"--trainer.default_root_dir={root}", "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false"]


@pytest.fixture(scope="session")
def sft_run(train_compred, tmp_path_factory):
    """A short contextualized SFT fit (demo config, 150 steps on ``train_compred``); DPO tests start
    from its export."""
    from personalm.cli import main

    root = tmp_path_factory.mktemp("sft")
    cli = main(["fit", "--config", DEMO, *quiet(root), f"--data.dataset={train_compred}",
                "--trainer.max_steps=150", "--trainer.val_check_interval=50", "--trainer.max_epochs=10"])
    return cli, root
