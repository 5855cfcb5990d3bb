"""The benchmark against calm_pytorch runs, and the two setups it times do comparable work."""
import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from benchmarks import bench_vs_calm_pytorch as bench

REPO_ROOT = Path(__file__).resolve().parents[1]
REQUIRED_KEYS = {"figure", "value", "goal", "better"}
EXPECTED_FIGURES = {
    "train_step_time_ratio_vs_calm_pytorch",
    "train_step_time_ratio_vs_calm_pytorch_composition_batch",
    "generation_tokens_per_s_ratio_vs_calm_pytorch",
    "generation_tokens_per_s_ratio_vs_calm_pytorch_batch1",
    "generation_time_per_token_ratio_512_vs_64_new_tokens",
}


def run_quick_benchmark() -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_vs_calm_pytorch", "--quick"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=280,
    )


def within_factor(a: float, b: float, factor: float) -> bool:
    return max(a, b) / min(a, b) <= factor


@pytest.mark.timeout(300)
def test_quick_benchmark_prints_one_json_figure_per_line():
    pytest.importorskip("CALM_pytorch", reason=bench.INSTALL_HINT)
    result = run_quick_benchmark()
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    records = [json.loads(line) for line in lines]  # every stdout line is JSON
    assert {record["figure"] for record in records} == EXPECTED_FIGURES
    for record in records:
        assert REQUIRED_KEYS <= record.keys(), record
        assert isinstance(record["value"], (int, float)), record
        assert math.isfinite(record["value"]) and record["value"] > 0, record
        assert record["better"] in ("lower", "higher"), record
    for train in (r for r in records if r["figure"].startswith("train_step")):
        assert within_factor(train["ours_trainable_params"], train["theirs_trainable_params"],
                             bench.PARAM_COUNT_FACTOR), train


def test_connections_map_to_the_same_blocks():
    config = bench.BenchConfig()
    # ours: 0-based decoder layers; calm_pytorch: 1-based blocks, both at the layer's output
    assert config.reference_connections == tuple((a + 1, b + 1) for a, b in config.connections)
    assert all(1 <= a <= config.augment_layers and 1 <= b <= config.anchor_layers
               for a, b in config.reference_connections)


def test_compared_setups_train_comparable_parameter_counts():
    """Ours vs calm_pytorch's count for the same config (from its source; checked live below)."""
    config = bench.BenchConfig()
    ours = bench.build_ours(config, *bench.base_models(config))
    assert len(ours.bridges) == len(config.connections)
    assert all(bridge.num_heads == config.anchor_heads for bridge in ours.bridges)
    ours_count = bench.ours_trainable_param_count(ours)
    theirs_count = bench.reference_trainable_param_count(config)
    assert within_factor(ours_count, theirs_count, bench.PARAM_COUNT_FACTOR), (ours_count, theirs_count)


def test_reference_setup_matches_its_description_when_installed():
    """Runs (without skipping) whether or not calm_pytorch is there; checks it when it is."""
    reference = bench.import_reference()
    if reference is None:
        return
    config = bench.BenchConfig()
    anchor, augment = bench.base_models(config)
    ours = bench.build_ours(config, anchor, augment)
    calm = bench.build_reference(config, anchor, augment, reference)
    assert sum(p.numel() for p in calm.parameters()) == bench.reference_trainable_param_count(config)
    data, _ = bench.make_data(config)
    ids = data[:, :-1]
    with torch.no_grad():
        plain = anchor(input_ids=ids).logits
        theirs_logits = calm(ids, prompt=ids, return_loss=False)
        ours_logits = ours(ids).logits
    # zero-initialised outputs on both sides: each composition equals the bare anchor at init
    assert (theirs_logits - plain).abs().max().item() <= 1e-5
    assert (ours_logits - plain).abs().max().item() <= 1e-5


def test_composition_batches_score_the_same_number_of_completion_targets_on_both_sides():
    """At init both compositions are the bare anchor, so each loss must be the anchor's cross-entropy over
    exactly the completion targets its side is said to score (checks calm_pytorch's ``mask=`` as we use it,
    when it is installed)."""
    config = replace(bench.BenchConfig(), vocab=600)
    anchor, augment = bench.base_models(config)
    data, _ = bench.make_data(config)
    batch = bench.composition_batch(config, data)
    prompt, targets = config.prompt_tokens, config.completion_targets
    assert (batch.labels != -100).sum(-1).tolist() == [targets] * data.shape[0]
    assert batch.mask[:, 1:].sum(-1).tolist() == [targets] * data.shape[0]
    with torch.no_grad():
        logits = anchor(input_ids=data).logits
        ours = bench.build_ours(config, anchor, augment)(batch.input_ids, labels=batch.labels, logits_for="labels")

    def anchor_loss(first_target: int) -> float:
        scored = slice(first_target - 1, first_target - 1 + targets)  # the positions predicting the targets
        return torch.nn.functional.cross_entropy(
            logits[:, scored].reshape(-1, config.vocab),
            data[:, first_target:first_target + targets].reshape(-1)).item()

    assert ours.statistics.tokens == data.shape[0] * targets
    assert ours.loss.item() == pytest.approx(anchor_loss(prompt), abs=1e-5)
    reference = bench.import_reference()
    if reference is not None:
        with torch.no_grad():
            theirs = bench.build_reference(config, anchor, augment, reference)(batch.seq, prompt=batch.prompt,
                                                                              mask=batch.mask)
        assert theirs.item() == pytest.approx(anchor_loss(prompt + 1), abs=1e-5)


def test_greedy_filter_keeps_only_the_top_logit():
    logits = torch.tensor([[0.1, 2.0, -1.0], [3.0, 0.0, 1.0]])
    filtered = bench.keep_top_logit(logits)
    assert torch.equal(torch.isfinite(filtered), torch.tensor([[False, True, False], [True, False, False]]))


def test_missing_reference_exits_with_install_hint(monkeypatch, capsys):
    monkeypatch.setattr(bench, "import_reference", lambda: None)
    assert bench.main([]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert 'pip install -e ".[bench]"' in captured.err
