"""The paper's baselines (config.baselines): LoRA matched to the composition's trainable parameters,
CALM with an untrained m_A, CALM with an m_A trained on Numeric-Arithmetic; their rows reach
results.json through the job's entry point."""
import copy
import json
from pathlib import Path

import pytest
import torch

import calm_dist
from calm_dist.config import load_config, to_dict
from calm_dist.train.base_models import build_model
from calm_dist.train.baselines import LORA_PARAMETER_TOLERANCE, build_lora
from calm_dist.train.composition import compose_kwargs
from calm_dist.train.report import format_table
from launcher.train import main

ROOT = Path(__file__).parent.parent
SPECIAL = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
ALL_BASELINES = ("baselines.lora=true", "baselines.random_augment=true", "baselines.vanilla_augment=true",
                 "baselines.two_augments=true", "baselines.different_tokenizer=true")
TASKS = {"kv_substitution", "numeric_arithmetic", "kv_arithmetic", "kv_arithmetic_heldin"}
ROWS = ("lora", "calm_random_augment", "calm_vanilla_augment", "calm_two_augments", "calm_different_tokenizer")
pytestmark = pytest.mark.timeout(300)

# A setting where CALM learns KV-Arithmetic through m_A within a test's budget, and the untrained m_A
# cannot stand in for it. On tiny.yaml (8 held-in keys) an untrained m_A does as well as the trained
# one: the bridges memorise the few held-in keys through the anchor's random key embeddings and the
# random m_A's distinct hidden states. Here the anchor's never-trained key embeddings are zero (it
# cannot tell keys apart), and 160 held-in keys are more than the bridges can memorise from a random
# m_A's 32-wide states in 800 steps, while m_A's values are linearly readable from its states (over
# seeds 0 and 1: CALM 53 and 52, random m_A 16 and 11; with a 64-wide m_A 47/41 against 20/14).
SEPARATION = (
    "run.seed=0", "data.num_keys=200", "data.heldin_fraction=0.8", "data.value_max=5", "data.min_operands=2",
    "data.max_operands=3", "data.base_train_examples=2000", "data.composition_train_examples=20000",
    "data.eval_examples=64",
    "augment.model={arch: llama, hidden_size: 32, num_layers: 2, num_heads: 2, intermediate_size: 64}",
    "augment.pretrain={steps: 500, batch_size: 64, lr: 3.0e-3, warmup_steps: 20}",
    "anchor.model={arch: llama, hidden_size: 64, num_layers: 2, num_heads: 4, intermediate_size: 128}",
    "anchor.pretrain={steps: 800, batch_size: 64, lr: 3.0e-3, warmup_steps: 20}",
    "anchor.zero_unseen_embeddings=true", "composition.connections=[[1, 0]]",
    "train.max_steps=800", "train.batch_size=64", "train.lr=3.0e-3", "train.warmup_steps=20",
    "baselines.random_augment=true",
)


def run_job(base: Path, *overrides: str) -> Path:
    """The job through launcher.train in this process (one thread, no Ray); returns its run directory."""
    threads = torch.get_num_threads()
    try:
        code = main(["--config", str(ROOT / "configs/tiny.yaml"), "--set", "run.launcher=local", "run.threads=1",
                     f"run.cache_dir={base / 'cache'}", f"run.output_dir={base / 'runs'}", *overrides])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    (run_dir,) = (base / "runs").iterdir()
    return run_dir


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return run_job(tmp_path_factory.mktemp("baselines"), *ALL_BASELINES)


@pytest.fixture(scope="module")
def separation_run(tmp_path_factory):
    return run_job(tmp_path_factory.mktemp("separation"), *SEPARATION)


def composition_and_anchor(config):
    """A composition over untrained models of the config's sizes (parameter counts need no training)."""
    vocab = 64
    anchor = build_model(config.anchor.model, vocab, SPECIAL, seed=0)
    augment = build_model(config.augment.model, vocab, SPECIAL, seed=1)
    composed = calm_dist.compose(copy.deepcopy(anchor), augment, **compose_kwargs(config))
    return sum(p.numel() for p in composed.trainable_parameters()), anchor


@pytest.mark.parametrize("name", ["tiny.yaml", "kv_arithmetic.yaml"])
def test_lora_matches_the_composition_parameter_count(name):
    config = load_config(ROOT / "configs" / name)
    composition, anchor = composition_and_anchor(config)
    model, details = build_lora(anchor, composition, config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == details["trainable_parameters"]
    assert abs(trainable - composition) <= LORA_PARAMETER_TOLERANCE * composition
    assert details["rank"] > 1 and "q_proj" in details["target_modules"]


def test_lora_without_a_matching_rank_is_refused():
    # One bridge of tiny.yaml (10,800 parameters); LoRA on every linear layer has 1,632 per rank:
    # rank 7 gives 11,424 (+5.8%), rank 6 gives 9,792 (-9.3%).
    config = load_config(ROOT / "configs/tiny.yaml", ["composition.connections=[[0, 0]]"])
    composition, anchor = composition_and_anchor(config)
    assert composition == 10800
    with pytest.raises(ValueError, match="baselines.lora_target_modules"):
        build_lora(anchor, composition, config)


@pytest.mark.parametrize("override,needle", [
    ("baselines.lora=maybe", "baselines.lora"),
    ("baselines.bogus=true", "baselines.bogus"),
    ("baselines.lora_alpha_per_rank=0", "baselines.lora_alpha_per_rank"),
    ("baselines.lora_target_modules=[]", "baselines.lora_target_modules"),
    ("baselines.lora_target_modules=q_proj", "baselines.lora_target_modules"),
])
def test_bad_baseline_settings_name_the_key(override, needle):
    with pytest.raises(ValueError, match=needle.replace(".", r"\.")):
        load_config(None, [override])


@pytest.mark.parametrize("flag", ["random_augment", "vanilla_augment", "two_augments", "different_tokenizer"])
def test_augment_ablations_need_an_m_a_built_by_the_job(flag):
    with pytest.raises(ValueError, match=f"baselines.{flag}"):
        load_config(None, [f"baselines.{flag}=true", "augment.model.path=/some/model"])


def test_extended_config_is_the_default_job_plus_every_baseline():
    default = to_dict(load_config(ROOT / "configs/kv_arithmetic.yaml"))
    extended = to_dict(load_config(ROOT / "configs/kv_arithmetic_extended.yaml"))
    assert extended.pop("baselines") == {**default.pop("baselines"), "lora": True, "random_augment": True,
                                         "vanilla_augment": True, "two_augments": True,
                                         "different_tokenizer": True}
    assert extended["run"].pop("name") != default["run"].pop("name")
    assert extended == default


def test_rows_reach_results_json(tiny_run):
    results = json.loads((tiny_run / "results.json").read_text())
    assert {"m_A", "m_B", "calm", "calm_heldin_keys", *ROWS} == set(results)
    for row in ROWS:
        assert set(results[row]) == TASKS
        assert all(0.0 <= value <= 100.0 for value in results[row].values())
    table = format_table(results)
    for label in ("LoRA (anchor)", "CALM (random m_A)", "CALM (vanilla m_A)", "CALM (2 augmenting models)",
                  "CALM (different tokenizer)", "kv_arith (held-in)"):
        assert label in table


def test_each_baseline_logs_its_training(tiny_run):
    config = load_config(tiny_run / "config.yaml")
    for row in ROWS:
        records = [json.loads(line) for line in (tiny_run / f"metrics_{row}.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records] == list(range(1, config.train.max_steps + 1))
        assert all(r["loss"] > 0 for r in records)
        assert any((tiny_run / "tensorboard" / row).iterdir())
    composition = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in composition] == list(range(1, config.train.max_steps + 1))


def test_run_summary_records_the_baselines(tiny_run):
    summary = json.loads((tiny_run / "run_summary.json").read_text())
    composition, baselines = summary["composition_parameters"], summary["baselines"]
    lora = baselines["lora"]
    assert lora["composition_parameters"] == composition
    assert abs(lora["trainable_parameters"] - composition) <= LORA_PARAMETER_TOLERANCE * composition
    assert baselines["calm_random_augment"]["trainable_parameters"] == composition
    assert baselines["calm_vanilla_augment"]["trainable_parameters"] == composition
    assert baselines["calm_different_tokenizer"]["trainable_parameters"] == composition
    assert baselines["calm_two_augments"]["trainable_parameters"] == 2 * composition  # same connections per m_A
    halves = baselines["calm_two_augments"]["augments"]
    assert [half["keys"] for half in halves] == ["keys0of2", "keys1of2"] and halves[0]["path"] != halves[1]["path"]
    characters = baselines["calm_different_tokenizer"]["augment"]
    assert characters["tokenizer"] == "characters" and characters["vocab_size"] < 50
    vanilla = Path(baselines["calm_vanilla_augment"]["augment"]["path"])
    assert vanilla.name.startswith("vanilla_augment-")
    assert vanilla not in {Path(info["path"]) for info in summary["base_models"].values()}
    assert json.loads((vanilla / "calm_dist_base.json").read_text())["split"] == "anchor_train"
    assert {f"baseline_{row}_s" for row in ROWS} <= set(summary["timings"])


def test_untrained_m_a_cannot_stand_in_for_m_a(separation_run):
    results = json.loads((separation_run / "results.json").read_text())
    calm = results["calm_heldin_keys"]["kv_arithmetic"]
    random_m_a = results["calm_random_augment"]["kv_arithmetic_heldin"]
    # 64 examples per cell; the random m_A stays at the anchor's guessing level (values 0..5: ~15%).
    assert random_m_a <= 25.0, results
    assert calm >= random_m_a + 25.0, results
