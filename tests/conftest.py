"""Fixtures: offline, caches in a temporary folder, small synthetic ComPreD data, tokenizers, one short SFT
run that several tests start from. Helpers that are not fixtures live in ``tests.helpers``."""

import atexit
import os
import shutil
import tempfile

# before anything imports datasets / transformers: never touch the network or the user's caches
_CACHE = tempfile.mkdtemp(prefix="personalm-tests-")
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)  # removed when the test session ends
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):  # two workers on two cores: one thread each (their subprocesses too)
    os.environ["OMP_NUM_THREADS"] = "1"
os.environ["PERSONALM_CACHE"] = os.path.join(_CACHE, "personalm")
os.environ["HF_DATASETS_CACHE"] = os.path.join(_CACHE, "datasets")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from personalm.data import synthetic  # noqa: E402
from tests.helpers import DEMO, DEMO_REWARD, SMALL_POSTS, eos_prone_llama, quiet, write_mistral_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer():
    from personalm.models import load_tokenizer

    return load_tokenizer("embedded:tiny-llama")


@pytest.fixture(scope="session")
def mistral_tokenizer(tmp_path_factory):
    from personalm.models import load_tokenizer

    tok = load_tokenizer(str(write_mistral_tokenizer(tmp_path_factory.mktemp("mistral-tokenizer"))))
    assert len(tok) == 32000 and tok.bos_token_id == 1 and tok.eos_token_id == 2
    return tok


@pytest.fixture(scope="session")
def mistral_llama(tmp_path_factory, small_compred) -> Path:
    """A random 19.5M-parameter Llama with the Mistral tokenizer (pad = EOS) that stops at EOS on some of
    ``small_compred``'s test prompts (``tests.helpers.eos_prone_llama``)."""
    return eos_prone_llama(tmp_path_factory.mktemp("mistral-llama"), small_compred)


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


@pytest.fixture(scope="session")
def sft_run(train_compred, tmp_path_factory):
    """A short contextualized SFT fit (demo config, 150 steps on ``train_compred``); DPO tests start
    from its export."""
    from personalm.cli import main

    root = tmp_path_factory.mktemp("sft")
    cli = main(["fit", *DEMO, *quiet(root), f"--data.dataset={train_compred}",
                "--trainer.max_steps=150", "--trainer.val_check_interval=50", "--trainer.max_epochs=10"])
    return cli, root


@pytest.fixture(scope="session")
def reward_run(sft_run, train_compred, tmp_path_factory):
    """Reward model from the SFT export, 80 steps on ``train_compred`` (lr 3e-4: at the demo's 1e-3 this
    short run is still near chance, measured 0.53), then ``test`` on test_pref."""
    from personalm.cli import main

    sft, _ = sft_run
    root = tmp_path_factory.mktemp("reward")
    common = [*DEMO_REWARD, *quiet(root), f"--data.dataset={train_compred}", "--data.max_train_pairs=null",
              "--data.max_eval_pairs=null"]
    fit = main(["fit", *common, f"--model.init_args.model_name_or_path={sft.model.export_path}",
                "--trainer.max_steps=80", "--trainer.val_check_interval=40", "--model.init_args.lr=3e-4"])
    test = main(["test", *common, f"--model.init_args.model_name_or_path={fit.model.export_path}"])
    return fit, test
