"""Every shipped config parses, composed as it runs (litgpt's test_config_hub idea), and starts with the command
that runs it; recipes are thin overlays on one trainer block per kind of hardware."""

from pathlib import Path

import pytest
import yaml

from personalm.cli import PersonalmCLI

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
RECIPES = sorted([*CONFIGS.glob("demo/*.yaml"), *CONFIGS.glob("paper/*.yaml")])
TRAINERS = sorted((CONFIGS / "trainer").glob("*.yaml"))
STRATEGIES = sorted((CONFIGS / "strategies").glob("*.yaml"))
HARDWARE_KEYS = {"accelerator", "devices", "strategy", "precision", "num_nodes"}


def composed(recipe: Path) -> list[str]:
    """The ``--config`` arguments a recipe runs with: its hardware's trainer block first (and FSDP2 for the
    full fine-tuning recipe, which needs sharding)."""
    hardware = CONFIGS / "trainer" / ("gpu.yaml" if recipe.parent.name == "paper" else "cpu.yaml")
    extra = [CONFIGS / "strategies" / "fsdp2.yaml"] if recipe.name == "dpo_full.yaml" else []
    return [a for p in (hardware, *extra, recipe) for a in ("--config", str(p))]


class ParseOnly(PersonalmCLI):
    """Parse and validate against the classes' signatures, without building anything (no GPU here)."""

    def instantiate_classes(self) -> None:
        pass


def parse(*args: str):
    return ParseOnly(args=list(args), run=False).config


@pytest.mark.parametrize("path", [*RECIPES, *TRAINERS, *STRATEGIES], ids=lambda p: str(p.relative_to(CONFIGS)))
def test_config_starts_with_the_command_that_runs_it(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("#"), f"{path} must start with a comment"
    assert f"--config configs/{path.relative_to(CONFIGS)}" in path.read_text(), "header lacks its command"


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_recipe_parses_composed_with_its_hardware_and_holds_no_hardware(path):
    cfg = parse(*composed(path))
    assert cfg.model.class_path.startswith("personalm.")
    assert cfg.data.tokenizer == cfg.model.init_args.model_name_or_path  # linked
    assert cfg.trainer.max_epochs == 1 and cfg.trainer.gradient_clip_val == 1.0  # from the trainer block
    trainer = yaml.safe_load(path.read_text()).get("trainer") or {}
    assert not HARDWARE_KEYS & set(trainer), f"{path.name} repeats the hardware's trainer block: {trainer}"


@pytest.mark.parametrize("path", TRAINERS, ids=lambda p: p.name)
def test_trainer_blocks_hold_the_trainer_only(path):
    assert set(yaml.safe_load(path.read_text())) <= {"trainer", "checkpoints"}
    cfg = parse("--config", str(path), "--config", str(CONFIGS / "demo" / "sft.yaml"))
    assert cfg.trainer.devices in (1, -1)


@pytest.mark.parametrize("path", STRATEGIES, ids=lambda p: p.name)
def test_strategy_configs_compose_with_the_paper_recipe(path):
    assert set(yaml.safe_load(path.read_text())["trainer"]) == {"strategy"}
    cfg = parse(*composed(CONFIGS / "paper" / "sft.yaml"), "--config", str(path))
    assert cfg.trainer.strategy not in (None, "auto", "ddp")


def test_paper_recipe_values():
    """The paper's SFT settings (ComPO, arXiv 2410.16027): lr 1e-5, 1 epoch, LoRA r64/a16/d0.1, bf16."""
    cfg = parse(*composed(CONFIGS / "paper" / "sft.yaml"))
    m = cfg.model.init_args
    assert (m.lr, cfg.trainer.max_epochs, m.warmup_ratio) == (1e-5, 1, 0.03)
    assert (m.lora.r, m.lora.alpha, m.lora.dropout) == (64, 16, 0.1)
    assert cfg.trainer.precision == "bf16-mixed" and cfg.data.max_length == 1024
    assert (cfg.data.min_score_ratio, cfg.data.max_pairs_per_post) == (2.0, 5)
    assert (m.generation.repetition_penalty, m.generation.do_sample) == (1.1, False)


def test_contextualize_is_a_real_bool():
    """The original parsed the string "False" as true; here it is a YAML/CLI boolean or an error."""
    for text, expected in (("False", False), ("false", False), ("true", True)):
        cfg = parse(*composed(CONFIGS / "demo" / "sft.yaml"), f"--data.contextualize={text}")
        assert cfg.data.contextualize is expected
    with pytest.raises(SystemExit):
        parse(*composed(CONFIGS / "demo" / "sft.yaml"), "--data.contextualize=maybe")


def test_paper_dpo_recipe_is_lora_against_the_adapter_free_sft_model():
    """ComPO's scripts/dpo.sh trained DPO with LoRA; beta 0.1, lr 2e-7, 1000 warmup steps; bf16 compute with
    a bf16 frozen base (the adapters are held in fp32), exported in fp32 so the change of lr 2e-7 survives."""
    cfg = parse(*composed(CONFIGS / "paper" / "dpo.yaml"))
    m = cfg.model.init_args
    assert (m.beta, m.lr, m.warmup_steps, m.reference) == (0.1, 2e-7, 1000, "adapters_off")
    assert (m.lora.r, m.lora.alpha, m.lora.dropout, m.lora.merge_on_export) == (64, 16, 0.1, True)
    assert m.dtype == "bfloat16" and m.export_dtype == "float32" and cfg.trainer.precision == "bf16-mixed"
    assert (cfg.data.max_prompt_length, cfg.data.max_length) == (512, 1024)
    full = parse(*composed(CONFIGS / "paper" / "dpo_full.yaml"))
    assert full.model.init_args.lora is None and full.model.init_args.reference == "copy"
    assert "FSDP2" in full.trainer.strategy.class_path and full.trainer.precision == "bf16-mixed"


@pytest.mark.parametrize("name", ["demo", "paper"])
def test_study_configs_parse_and_name_existing_configs(name):
    from personalm import study

    s = study.parse(["--config", str(CONFIGS / "study" / f"{name}.yaml")])
    for path in (s.trainer_config, s.sft_config, s.dpo_config, s.reward_config):
        assert (CONFIGS.parent / path).is_file(), path


# ---------------------------------------------------------------- personalm.configs: what a stage hashes


def test_compose_reads_arguments_as_the_cli_does(tmp_path):
    """``--key value`` and ``--key=value`` give the same configuration; ``--config <file>`` merges the file
    where it stands; ``+=`` appends; later wins. (Reading only ``--key=value`` once let the study miss a
    changed ``--trainer.max_steps 50`` and reuse the old stage.)"""
    from personalm.configs import compose

    extra = tmp_path / "extra.yaml"
    extra.write_text("trainer:\n  max_steps: 7\n  precision: bf16-mixed\n")
    base = tmp_path / "base.yaml"
    base.write_text("trainer:\n  max_steps: 1\n  devices: 1\nmodel:\n  init_args:\n    lr: 0.1\n")
    spaced = compose([str(base)], ["--trainer.max_steps", "50", "--config", str(extra), "--model.init_args.lr", "2e-7"])
    equals = compose([str(base)], ["--trainer.max_steps=50", f"--config={extra}", "--model.init_args.lr=2e-7"])
    assert spaced == equals == {"trainer": {"max_steps": 7, "devices": 1, "precision": "bf16-mixed"},
                                "model": {"init_args": {"lr": 2e-7}}}
    assert compose([str(base)], ["--trainer.max_steps", "5"]) != compose([str(base)], ["--trainer.max_steps", "50"])
    appended = compose([], ['--trainer.callbacks+={"class_path": "A"}', '--trainer.callbacks+={"class_path": "B"}'])
    assert appended == {"trainer": {"callbacks": [{"class_path": "A"}, {"class_path": "B"}]}}
    with pytest.raises(ValueError, match="expected --key=value"):
        compose([], ["max_steps=5"])
