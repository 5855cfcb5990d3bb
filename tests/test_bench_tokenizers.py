"""The benchmark of models with different tokenizers runs (--quick) and prints well-formed JSON figure lines."""
import pytest

from tests.test_bench_runtime import parse_figures, run_quick


@pytest.mark.timeout(400)
def test_tokenizers_benchmark_quick():
    figures = parse_figures(run_quick("benchmarks.bench_tokenizers"))
    assert set(figures) == {"wire_bytes_per_step_over_minimum_own_tokenizer",
                            "generation_own_tokenizer_cached_over_recompute_time"}
    wire = figures["wire_bytes_per_step_over_minimum_own_tokenizer"]
    assert wire["value"] == 1.0  # exactly the augment's own taps at its own padded length
    assert wire["augment_over_anchor_padded_length"] > 1  # chunks of 2 characters: longer than the BPE's
    generation = figures["generation_own_tokenizer_cached_over_recompute_time"]
    positions = generation["positions_per_new_token"]
    cached, recomputed = positions["cached"], positions["recomputed"]
    assert all(c < r for c, r in zip(cached, recomputed))
