"""The KV-arithmetic recipe on the generic job: its settings, its base-model cache, and the tiny recipe end
to end through the real CLI (`python -m launcher.train --config configs/tiny.yaml`)."""
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from calm_dist.config import load_config
from calm_dist.train.models import plan_models
from recipes.kv_arithmetic import KVArithmeticRecipe
from recipes.kv_arithmetic.base_models import TrainingRecord, Vocabulary, build_model
from recipes.kv_arithmetic.models import anchor_task
from recipes.kv_arithmetic.pretrain import seen_token_ids, tokenised, zero_unseen_embeddings
from recipes.kv_arithmetic.settings import recipe_settings
from recipes.kv_arithmetic.task_data import TaskFiles
from recipes.kv_arithmetic.tokenizer import load_tokenizer

ROOT = Path(__file__).parent.parent
TINY = ROOT / "configs/tiny.yaml"
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
TABLE_SETS = {"kv_substitution", "numeric_arithmetic", "kv_arithmetic"}
EVAL_SETS = [*sorted(TABLE_SETS), "kv_arithmetic_heldin"]
pytestmark = pytest.mark.timeout(600)


# ---------------------------------------------------------------- settings


@pytest.mark.parametrize("path", [p for p in CONFIGS if load_config(p).recipe is not None],
                         ids=lambda p: p.name)
def test_every_shipped_recipe_section_is_valid(path):
    settings = recipe_settings(load_config(path))
    assert settings.name == "kv_arithmetic"
    assert settings.data.num_keys > 0 and settings.anchor.pretrain.steps > 0


def test_recipe_settings_reach_their_dataclasses():
    settings = recipe_settings(load_config(TINY, ["recipe.data.num_keys=64", "recipe.anchor.model.arch=gpt2",
                                                  "recipe.anchor.zero_unseen_embeddings=true",
                                                  "recipe.baselines.lora_target_modules=[q_proj, v_proj]"]))
    assert settings.data.num_keys == 64 and settings.data.value_max == 5  # the rest from tiny.yaml
    assert settings.anchor.model.arch == "gpt2" and settings.anchor.zero_unseen_embeddings
    assert settings.baselines.lora_target_modules == ["q_proj", "v_proj"]


@pytest.mark.parametrize("override,needle", [
    ("recipe.data.heldin_fraction=1.5", "recipe.data.heldin_fraction"),
    ("recipe.data.max_operands=1", "recipe.data.max_operands"),
    ("recipe.data.num_keyz=3", "recipe.data.num_keyz"),
    ("recipe.data.num_keys=three", "recipe.data.num_keys"),
    ("recipe.data.composition_operand_weights=[1]", "recipe.data.composition_operand_weights"),
    ("recipe.data.composition_operand_weights=[0,0]", "recipe.data.composition_operand_weights"),
    ("recipe.anchor.model.arch=bert", "recipe.anchor.model.arch"),
    ("recipe.augment.model.hidden_size=33", "recipe.augment.model.hidden_size"),
    ("recipe.augment.pretrain.steps=0", "recipe.augment.pretrain.steps"),
    ("recipe.baselines.lora=maybe", "recipe.baselines.lora"),
    ("recipe.baselines.bogus=true", "recipe.baselines.bogus"),
    ("recipe.baselines.lora_alpha_per_rank=0", "recipe.baselines.lora_alpha_per_rank"),
    ("recipe.baselines.lora_target_modules=[]", "recipe.baselines.lora_target_modules"),
    ("recipe.baselines.lora_target_modules=q_proj", "recipe.baselines.lora_target_modules"),
])
def test_bad_recipe_settings_name_the_key(override, needle):
    config = load_config(TINY, [override])
    with pytest.raises(ValueError, match=re.escape(needle)):
        recipe_settings(config)


@pytest.mark.parametrize("override,key", [
    ("anchor.model.path=/models/anchor", "anchor.model.path"),
    ("augment.model.path=/models/augment", "augment[0].model.path"),
    ("data.train=/data/train.jsonl", "data.train"),
    ("augment=[{}, {}]", "augment"),
])
def test_models_or_data_given_to_the_recipe_are_refused_before_anything_is_written(tmp_path, override, key):
    config = load_config(TINY, [override, f"run.cache_dir={tmp_path}"])
    with pytest.raises(ValueError, match=re.escape(f"'{key}'")):
        KVArithmeticRecipe().prepare(config)
    assert not any(tmp_path.iterdir())


# ---------------------------------------------------------------- the tiny recipe through the CLI


def run_cli(*overrides):
    command = [sys.executable, "-m", "launcher.train", "--config", str(TINY), "--set", "run.launcher=local",
               *overrides]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=500)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The tiny recipe from an empty cache (one thread: m_A and m_B one after the other, not in two
    spawned processes, which would double this test's time)."""
    base = tmp_path_factory.mktemp("kv_recipe")
    result = run_cli(f"run.cache_dir={base / 'cache'}", f"run.output_dir={base / 'runs'}", "run.threads=1",
                     "eval.every_steps=5")
    assert result.returncode == 0, result.stderr[-3000:]
    return base, result


def run_dir_of(output) -> Path:
    return Path(output.stdout.strip().splitlines()[-1])


def test_last_line_is_the_run_directory_and_the_table_is_printed(tiny_run):
    base, first = tiny_run
    run_dir = run_dir_of(first)
    assert run_dir.is_dir() and run_dir.parent == (base / "runs").resolve()
    for label in ("m_A (augment)", "m_B (anchor)", "CALM m_A+m_B", "CALM, held-in keys"):
        assert label in first.stdout
    assert "| model" in first.stdout and "kv_substitution" in first.stdout


def test_results_json_keeps_the_generic_results_and_adds_the_table(tiny_run):
    results = json.loads((run_dir_of(tiny_run[1]) / "results.json").read_text())
    assert set(results) == {"anchor", "calm", "m_A", "m_B", "calm_heldin_keys"}
    for row in ("m_A", "m_B"):
        assert set(results[row]) == TABLE_SETS
    assert set(results["calm_heldin_keys"]) == {"kv_arithmetic"}
    for name in EVAL_SETS:  # the generic job's metrics of every evaluation set, at step 0 and at the end
        for metrics in (results["anchor"], results["calm"]):
            assert {f"{name}_loss", f"{name}_exact_match", f"{name}_perplexity"} <= set(metrics)
    for name in TABLE_SETS:
        assert results["calm"][name] == results["calm"][f"{name}_exact_match"]
        # m_B alone, evaluated by the recipe, is the composition at step 0 (its bridges start at zero)
        assert results["m_B"][name] == pytest.approx(results["anchor"][f"{name}_exact_match"])
    assert results["calm_heldin_keys"]["kv_arithmetic"] == results["calm"]["kv_arithmetic_heldin_exact_match"]
    cells = [value for row in ("m_A", "m_B", "calm_heldin_keys") for value in results[row].values()]
    assert all(0.0 <= value <= 100.0 for value in cells)


def test_metrics_hold_every_step_and_the_evaluations(tiny_run):
    run_dir = run_dir_of(tiny_run[1])
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 11))  # tiny.yaml: train.max_steps = 10
    assert sorted((r["step"], r["eval"]) for r in records if "eval" in r) == \
        sorted((step, name) for step in (0, 5, 10) for name in EVAL_SETS)
    summary = json.loads((run_dir / "run_summary.json").read_text())["recipe"]
    assert {"task_data_s", "base_models_s", "job_composition_s", "base_model_eval_s"} <= set(summary["timings"])
    assert summary["key_counts"] == {"heldin": 8, "val": 0, "heldout": 32}
    tracked = summary["exact_match_during_training"]
    assert set(tracked) == {"numeric_arithmetic", "kv_arithmetic", "kv_arithmetic_heldin"}
    assert [step for step, _ in tracked["kv_arithmetic"]] == [0, 5, 10]
    assert "exact match during training: numeric_arithmetic 0:" in tiny_run[1].stdout
    assert (run_dir / "recipe_losses.png").stat().st_size > 1000


def test_base_models_are_ordinary_model_directories_with_their_tokenizer(tiny_run):
    run_dir = run_dir_of(tiny_run[1])
    job = load_config(run_dir / "config.yaml")  # the config the job ran: paths filled in by the recipe
    plan, _ = plan_models(job)  # the framework's own checks accept what the recipe made
    task_tokenizer = load_tokenizer(TaskFiles(Path(job.data.train).parent).tokenizer_dir)
    for path, steps in ((plan.augment_dirs[0], 20), (plan.anchor_dir, 20)):
        tokenizer = AutoTokenizer.from_pretrained(path)
        assert tokenizer.backend_tokenizer.to_str() == task_tokenizer.backend_tokenizer.to_str()
        assert tokenizer("qz =")["input_ids"][0] == tokenizer.bos_token_id
        assert len(TrainingRecord.read(path).losses) == steps
    assert sorted(job.data.eval) == sorted(EVAL_SETS) and job.data.max_length == 13


def test_a_second_prepare_reuses_the_cache_and_a_changed_setting_misses_it(tiny_run, capsys, monkeypatch):
    base, first = tiny_run
    assert "pretrain" in first.stderr  # the first run trained its base models (their progress bars)
    monkeypatch.chdir(base)
    config = load_config(TINY, ["run.cache_dir=cache", "run.threads=1"])  # relative: the job gets absolute paths
    before = load_config(run_dir_of(first) / "config.yaml")
    weights = [Path(path) / "model.safetensors" for path in (before.anchor.model.path, before.augment[0].model.path)]
    stamps = [path.stat().st_mtime_ns for path in weights]
    job = KVArithmeticRecipe().prepare(config)
    assert (job.anchor.model.path, job.augment[0].model.path) == (before.anchor.model.path, before.augment[0].model.path)
    assert (job.data.train, job.data.eval) == (before.data.train, before.data.eval)
    assert [path.stat().st_mtime_ns for path in weights] == stamps
    assert "pretrain" not in capsys.readouterr().err
    changed = load_config(TINY, [f"run.cache_dir={base / 'cache'}", "recipe.anchor.pretrain.lr=1.0e-3"])
    files = TaskFiles(Path(job.data.train).parent)
    assert anchor_task(changed, recipe_settings(changed), files).model_dir() != Path(job.anchor.model.path)


def test_zero_unseen_embeddings_zeroes_exactly_the_tokens_absent_from_training(tiny_run):
    base, first = tiny_run
    config = load_config(TINY, [f"run.cache_dir={base / 'cache'}"])
    files = TaskFiles(Path(load_config(run_dir_of(first) / "config.yaml").data.train).parent)
    task = anchor_task(config, recipe_settings(config), files)
    tokenizer = load_tokenizer(files.tokenizer_dir)
    model = build_model(task.settings.model, Vocabulary.of(tokenizer), seed=0)
    seen_ids = seen_token_ids(tokenised(task))
    seen = set(seen_ids.tolist())
    zeroed = zero_unseen_embeddings(model, seen_ids)
    rows_zero = model.get_input_embeddings().weight.abs().sum(-1) == 0
    assert zeroed == len(tokenizer) - len(seen) >= 40  # every key is unseen by m_B (tiny.yaml: 40 keys)
    assert rows_zero.nonzero().flatten().tolist() == sorted(set(range(len(tokenizer))) - seen)


def test_unseen_embeddings_can_be_reset_to_the_mean_embedding_of_the_values_a_key_stands_for(tiny_run):
    base, first = tiny_run
    config = load_config(TINY, [f"run.cache_dir={base / 'cache'}", "recipe.anchor.unseen_as_mean_value=true",
                                "recipe.anchor.zero_unseen_embeddings=true"])
    files = TaskFiles(Path(load_config(run_dir_of(first) / "config.yaml").data.train).parent)
    task = anchor_task(config, recipe_settings(config), files)
    assert task.value_tokens == tuple(str(v) for v in range(recipe_settings(config).data.value_max + 1))
    tokenizer = load_tokenizer(files.tokenizer_dir)
    model = build_model(task.settings.model, Vocabulary.of(tokenizer), seed=0)
    values = torch.tensor(tokenizer.convert_tokens_to_ids(list(task.value_tokens)))
    seen_ids = seen_token_ids(tokenised(task))
    expected = model.get_input_embeddings().weight[values].mean(0).detach().clone()
    zero_unseen_embeddings(model, seen_ids, values)
    weight = model.get_input_embeddings().weight.detach()
    unseen = sorted(set(range(len(tokenizer))) - set(seen_ids.tolist()))
    assert torch.equal(weight[unseen], expected.expand(len(unseen), -1)) and expected.abs().sum() > 0
    with pytest.raises(ValueError, match="recipe.anchor.unseen_as_mean_value"):
        recipe_settings(load_config(TINY, ["recipe.anchor.unseen_as_mean_value=true",
                                           "recipe.anchor.zero_unseen_embeddings=false"]))


def test_bad_override_fails_before_anything_runs(tmp_path):
    result = run_cli("recipe.data.num_keyz=3", f"run.output_dir={tmp_path / 'runs'}",
                     f"run.cache_dir={tmp_path / 'cache'}")
    assert result.returncode == 2
    assert "recipe.data.num_keyz" in result.stderr
    assert not any(tmp_path.iterdir())


DRIVER_THAT_DIES = """
import os, signal, sys, time
from recipes.kv_arithmetic.pretrain import side_by_side_pool


def children(parent):
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = open(f"/proc/{entry}/stat").read()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == parent:
            found.append(entry)
    return found


if __name__ == "__main__":
    pool = side_by_side_pool()
    started = [pool.submit(time.sleep, 0.5) for _ in range(2)]
    [future.result() for future in started]  # both workers are up and armed
    pool.submit(time.sleep, 600)
    with open(sys.argv[1], "w") as out:
        out.write(" ".join(children(os.getpid())))
    os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_pretraining_workers_die_with_a_killed_driver(tmp_path):
    """Base models pretrain in a process pool: a driver killed by SIGKILL must leave no process of it behind
    (not a worker training on, nor a helper such as a ``multiprocessing.Manager``'s server)."""
    import time

    script = tmp_path / "driver.py"
    script.write_text(DRIVER_THAT_DIES)
    root = Path(__file__).resolve().parents[1]
    children_file, log = tmp_path / "children", tmp_path / "driver.log"
    with log.open("w") as output:  # a file, not a pipe: a surviving worker would hold a pipe open
        done = subprocess.run([sys.executable, str(script), str(children_file)], stdout=output, stderr=output,
                              timeout=120, cwd=root, env={**os.environ, "PYTHONPATH": str(root)})
    assert done.returncode == -9, log.read_text()
    children = [int(pid) for pid in children_file.read_text().split()]
    assert len(children) >= 2, children  # the two workers at least
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(map(_alive, children)):
        time.sleep(0.2)
    survivors = [pid for pid in children if _alive(pid)]
    for pid in survivors:
        os.kill(pid, signal.SIGKILL)
    assert not survivors, f"processes {survivors} outlived their killed driver"


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"
