"""The distributed-runtime benchmarks run (--quick) and print only well-formed JSON figure lines."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks._common import figure_line

REPO_ROOT = Path(__file__).resolve().parents[1]
REQUIRED_KEYS = {"figure", "value", "goal", "better"}
RUNTIME_FIGURES = {
    "zero3_step_time_ratio_1rank_vs_plain",
    "anchor_param_bytes_per_rank_times_n_over_full",
    "wire_bytes_per_step_over_minimum",
    "anchor_stall_fraction",
}
MEMORY_FIGURES = {"peak_rss_per_anchor_rank_over_full_size_n2", "peak_rss_per_anchor_rank_over_full_size_n4"}


def run_quick(module: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, DS_ACCELERATOR="cpu")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", module, "--quick"], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=380)


def parse_figures(result: subprocess.CompletedProcess) -> dict[str, dict]:
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in result.stdout.splitlines()]  # every stdout line is JSON
    for record in records:
        assert REQUIRED_KEYS <= record.keys(), record
        for key in ("value", "goal"):
            assert isinstance(record[key], (int, float)) and not isinstance(record[key], bool), record
            assert math.isfinite(record[key]) and record[key] > 0, record
        assert record["better"] in ("lower", "higher"), record
    return {record["figure"]: record for record in records}


@pytest.mark.timeout(400)
def test_runtime_benchmark_quick():
    figures = parse_figures(run_quick("benchmarks.bench_runtime"))
    assert set(figures) == RUNTIME_FIGURES
    zero3 = figures["zero3_step_time_ratio_1rank_vs_plain"]
    assert zero3["value"] == pytest.approx(zero3[f"ratio_{zero3['best_setting']['name']}"], rel=1e-3)
    partition = figures["anchor_param_bytes_per_rank_times_n_over_full"]
    assert partition["n"] == 2 and 0.99 <= partition["value"] <= 1.1  # ZeRO-3 pads partitions only slightly
    wire = figures["wire_bytes_per_step_over_minimum"]
    assert wire["value"] >= 1.0 - 1e-9  # nothing arrives below the minimum
    assert 0 < figures["anchor_stall_fraction"]["value"] < 1


@pytest.mark.timeout(400)
def test_anchor_memory_benchmark_quick():
    figures = parse_figures(run_quick("benchmarks.bench_anchor_memory"))
    assert set(figures) == MEMORY_FIGURES
    for ranks in (2, 4):
        record = figures[f"peak_rss_per_anchor_rank_over_full_size_n{ranks}"]
        assert record["goal"] == pytest.approx(1 / ranks + 0.1)
        assert record["checkpoint_peak_over_full"] == pytest.approx(record["value"], rel=0.01)  # the whole life
        assert len(record["peak_increase_bytes_per_rank"]) == ranks
        assert record["params"] == record["full_fp32_bytes"] // 4


def test_param_count_formula_matches_transformers():
    import torch
    from transformers import LlamaForCausalLM

    from benchmarks.bench_anchor_memory import DEFAULT_SIZE, QUICK_SIZE

    for size in (QUICK_SIZE, DEFAULT_SIZE):
        with torch.device("meta"):
            model = LlamaForCausalLM(size.hf_config())
        assert sum(p.numel() for p in model.parameters()) == size.param_count()
    assert 0.5e9 <= DEFAULT_SIZE.param_count() <= 0.6e9 and 15e6 <= QUICK_SIZE.param_count() <= 25e6


def test_figure_line_keeps_small_values_and_rejects_non_positive():
    assert json.loads(figure_line("f", 1.234e-5, 0.05, "lower"))["value"] > 0
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(RuntimeError):
            figure_line("f", bad, 1.0, "lower")


@pytest.mark.timeout(400)
def test_checkpoint_benchmark_quick():
    figures = parse_figures(run_quick("benchmarks.bench_checkpoint"))
    assert set(figures) == {"checkpoint_bytes_over_composition_state", "seconds_from_worker_kill_to_next_trained_step",
                            "checkpoint_save_over_step_time"}
    size = figures["checkpoint_bytes_over_composition_state"]
    assert 1.0 <= size["value"] <= 1.1 and size["bytes"] >= 3 * 4 * size["composition_parameters"]


@pytest.mark.timeout(400)
def test_gather_bytes_benchmark_quick():
    figures = parse_figures(run_quick("benchmarks.bench_gather_bytes"))
    assert set(figures) == {"gathered_bytes_per_step_relative_error_n2", "gathered_bytes_per_step_relative_error_n4"}
    for ranks in (2, 4):
        record = figures[f"gathered_bytes_per_step_relative_error_n{ranks}"]
        assert record["model_numel"] == record["predicted_model_numel"]  # the cost model counts the real model


def test_cost_model_counts_a_transformers_llama_with_grouped_query_attention():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from benchmarks.cost_model import CASE, DecoderSize, even_connections

    size = DecoderSize(hidden=64, layers=3, heads=8, kv_heads=2, intermediate=96, vocab=100)
    config = LlamaConfig(vocab_size=100, hidden_size=64, num_hidden_layers=3, num_attention_heads=8,
                         num_key_value_heads=2, intermediate_size=96, tie_word_embeddings=False)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    assert sum(p.numel() for p in model.parameters()) == size.params()
    assert even_connections(80, 32)[0] == (3, 9) and even_connections(80, 32)[-1] == (31, 79)
    assert 70e9 <= CASE.anchor.params() <= 71e9


@pytest.mark.timeout(240)
def test_the_cost_model_predicts_what_autograd_keeps_per_token_of_a_composition_step():
    figures = parse_figures(run_quick("benchmarks.bench_activation_memory"))
    assert set(figures) == {"activation_saved_bytes_per_token_relative_error",
                            "activation_peak_growth_per_token_vs_saved",
                            "activation_peak_growth_per_token_checkpointed_vs_cost_model"}
    saved = figures["activation_saved_bytes_per_token_relative_error"]
    assert saved["value"] <= saved["goal"], saved  # cost_model.saved_activation_elements against autograd's saves
    assert figures["activation_peak_growth_per_token_vs_saved"]["value"] >= 1  # the peak holds what is kept
    checkpointed = figures["activation_peak_growth_per_token_checkpointed_vs_cost_model"]
    assert checkpointed["over_peak_without_checkpointing"] < 0.75, checkpointed  # checkpointing keeps less
