"""The bf16 / fp32 benchmark runs (--quick) and prints well-formed JSON figure lines whose ratios are its timings'."""
import pytest

from tests.test_bench_runtime import parse_figures, run_quick


@pytest.mark.timeout(400)
def test_precision_benchmark_quick():
    figures = parse_figures(run_quick("benchmarks.bench_precision"))
    assert set(figures) == {"composition_step_time_ratio_bf16_vs_fp32_one_process",
                            "anchor_rank_step_time_ratio_bf16_vs_fp32"}
    for figure in figures.values():
        assert isinstance(figure["cpu_bf16_kernels"], bool)
        assert figure["fp32_step_s"] > 0 and figure["bf16_step_s"] > 0
        assert figure["value"] == pytest.approx(figure["bf16_step_s"] / figure["fp32_step_s"], rel=1e-2)
