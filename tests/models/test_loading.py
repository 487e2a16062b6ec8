"""Model loading: the embedded default, local folders, LoRA, export in Hugging Face format."""

import pytest
import torch

from personalm.models import LoraSettings, export_hf, load_causal_lm, load_tokenizer, resolve


def test_embedded_default_is_small_deterministic_and_in_train_mode():
    a, b = load_causal_lm("embedded:tiny-llama"), load_causal_lm("embedded:tiny-llama")
    n = sum(p.numel() for p in a.parameters())
    assert 5e5 < n < 5e6, n
    assert a.training  # transformers 5 returns eval mode; we want train
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb), name


def test_embedded_init_does_not_touch_the_global_rng():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    load_causal_lm("embedded:tiny-llama")
    assert torch.equal(torch.rand(3), expected)


def test_missing_local_folder_fails_clearly_without_asking_the_hub(monkeypatch):
    """A path that looks local and does not exist is our error at once, never a Hub id (offline, transformers
    would wait on the network or fail about it); how long it takes is benchmarks/missing_model.py's."""
    import huggingface_hub

    def no_hub(*a, **k):
        raise AssertionError("the Hub was asked")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_hub)
    for name in ("./no/such/model", "/no/such/model", "~/no/such/model", "no/such/model"):
        with pytest.raises(FileNotFoundError, match="does not exist"):
            resolve(name)
    with pytest.raises(ValueError, match="unknown embedded name"):
        resolve("embedded:nope")


def test_lora_targets_llama_projections_and_merged_export_loads_plainly(tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM

    model = load_causal_lm("embedded:tiny-llama", lora=LoraSettings(r=4, alpha=8, dropout=0.0))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert any(proj in n for n in trainable), proj
    with torch.no_grad():  # make the adapter matter, so a lost merge would show
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    ids = torch.tensor([[5, 6, 7, 8]])
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    merged = export_hf(model, tokenizer, str(tmp_path / "m"), merge_lora=True)
    assert not hasattr(merged, "peft_config")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-4)


def test_adapter_export_loads_back_with_its_base(tmp_path, tokenizer):
    export_hf(load_causal_lm("embedded:tiny-llama"), tokenizer, str(tmp_path / "base"))
    model = load_causal_lm(str(tmp_path / "base"), lora=LoraSettings(r=4, alpha=8, dropout=0.0))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        expected = model.eval()(input_ids=ids).logits
    export_hf(model, tokenizer, str(tmp_path / "adapter"), merge_lora=False)
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    again = load_causal_lm(str(tmp_path / "adapter"))  # peft loads the base named in adapter_config.json
    assert hasattr(again, "peft_config") and again.training
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-4)


def test_pad_token_falls_back_to_eos(tmp_path, tokenizer):
    tokenizer.save_pretrained(tmp_path)
    import json

    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg.pop("pad_token", None)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = load_tokenizer(str(tmp_path))
    assert tok.pad_token_id == tok.eos_token_id


def test_an_export_over_an_older_one_keeps_none_of_its_files(tmp_path, tokenizer):
    """A merged export written where an adapter export (and a DPO record) was: the old adapter_config.json would
    make the next load pick the old adapter, the old personalm_dpo.json the wrong reference. None is left."""
    export_hf(load_causal_lm("embedded:tiny-llama"), tokenizer, str(tmp_path / "base"))
    adapter = load_causal_lm(str(tmp_path / "base"), lora=LoraSettings(r=4, alpha=8, dropout=0.0))
    out = tmp_path / "hf_model"
    export_hf(adapter, tokenizer, str(out), merge_lora=False, extra_files={"personalm_dpo.json": "{}"})
    assert (out / "adapter_config.json").is_file() and (out / "personalm_dpo.json").is_file()
    plain = load_causal_lm("embedded:tiny-llama")
    with torch.no_grad():
        for p in plain.parameters():
            p.add_(0.01)
    export_hf(plain, tokenizer, str(out))
    assert not (out / "adapter_config.json").exists() and not (out / "personalm_dpo.json").exists()
    assert not list(tmp_path.glob(".hf_model*"))  # no temporary folder left beside it
    again = load_causal_lm(str(out))
    assert not hasattr(again, "peft_config")
    for (name, a), b in zip(again.named_parameters(), plain.parameters()):
        assert torch.equal(a, b), name
