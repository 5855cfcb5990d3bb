"""Augmenting models with tokenizers of their own in the generic job: the data (one tokenisation per distinct
tokenizer, with end offsets, cached), the augment-side length rule, and the distributed runtime (2 ZeRO-3
anchor ranks + one stage per model) against its single-process twin, with the no-leak check on the anchor
ranks' per-token losses; on Ray, the run's export and ``python -m launcher.export`` from its checkpoints.

The pair: the project's byte-level BPE anchor (no BOS, merges across spaces) with two augmenting models, one
reading chunks of 2 characters (no BOS) and one reading characters (with a BOS of its own): their tokens
straddle the BPE tokens' boundaries and each other's."""
import dataclasses
import random

import pytest
import torch

import data_pipeline as dp
from calm_dist.checkpoint import checkpoint_name
from launcher.runtime import runtime_inputs
from tests.dist_helpers import spawn
from tests.dist_workers import token_loss_run
from tests.user_project import (WORDS, chunk_tokenizer, prepared_job, save_own_tokenizer_augment, single_process_run,
                                write_jsonl)

STEPS = 6
CHUNKS, CHARACTERS = "augment[0] (chunks of 2)", "augment[1] (characters, BOS)"
LEAK_ROWS = 8


def two_own(project, first=None) -> str:
    first = first or save_own_tokenizer_augment(project, 2, False)
    characters = save_own_tokenizer_augment(project, 1, True, seed=8)
    return (f"augment=[{{model: {{path: {first}}}, connections: [[1, 0], [2, 2]]}}, "
            f"{{model: {{path: {characters}}}, connections: [[0, 0], [2, 1]]}}]")


def leak_texts(seed: int = 11) -> tuple[list[str], list[str], list[int]]:
    """Two sets of text rows that agree up to a character offset per row and differ after it."""
    rng = random.Random(seed)
    same, changed, offsets = [], [], []
    for _ in range(LEAK_ROWS):
        prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 6))) + " =>"
        first = " " + " ".join(rng.choice(WORDS) for _ in range(3))
        second = " " + " ".join(rng.choice([w for w in WORDS if w not in first]) for _ in range(3))
        same.append(prompt + first)
        changed.append(prompt + second)
        offsets.append(len(prompt) + 1)  # after the space both continuations start with
    return same, changed, offsets


@pytest.fixture(scope="module")
def leak_sets(project):
    same, changed, offsets = leak_texts()
    write_jsonl(project.data("leak_a.jsonl"), [{"text": text} for text in same])
    write_jsonl(project.data("leak_b.jsonl"), [{"text": text} for text in changed])
    return offsets


@pytest.fixture(scope="module")
def job(project, leak_sets, tmp_path_factory):
    evals = f"data.eval={{eval: {project.data('eval.jsonl')}, a: {project.data('leak_a.jsonl')}, " \
            f"b: {project.data('leak_b.jsonl')}}}"
    return prepared_job(project, tmp_path_factory.mktemp("own"), two_own(project), evals, f"train.max_steps={STEPS}",
                        "train.lr=1.0e-2", "eval.batch_size=4", evaluation=None)


@pytest.fixture(scope="module")
def reference(job):
    return single_process_run(job)


def test_each_row_is_tokenised_once_per_distinct_tokenizer_with_offsets_and_cached(job, project, tmp_path):
    assert job.data.augment_columns == ("aug0", "aug1") and job.models.composition.own_tokenizer == (True, True)
    rows = dp.TokenisedRows(job.data.train, ("input_ids", "end_offsets", "aug0_input_ids", "aug0_end_offsets",
                                             "aug1_input_ids", "aug1_end_offsets"))
    import datasets

    texts = datasets.load_from_disk(str(job.data.train))["text"]
    for name, tokenizer in (("aug0", chunk_tokenizer(2, False)), ("aug1", chunk_tokenizer(1, True))):
        ids, ends = rows.take(range(len(rows)))[2:4] if name == "aug0" else rows.take(range(len(rows)))[4:6]
        for row, text in enumerate(texts):
            encoded = tokenizer(text, return_offsets_mapping=True)  # the whole text: the anchor ends with EOS there
            assert ids[row].tolist() == encoded["input_ids"], (name, row)
            assert ends[row].tolist() == [end for _, end in encoded["offset_mapping"]], (name, row)
    anchor_ends = rows.take([0])[1][0].tolist()
    chunk_ends = rows.take([0])[3][0].tolist()
    assert set(chunk_ends) - set(anchor_ends)  # chunks end inside BPE tokens: they straddle each other's boundaries
    assert job.data.splits["train"].augment_longest == {"aug0": max(len(i) for i in rows.take(range(len(rows)))[2]),
                                                        "aug1": max(len(i) for i in rows.take(range(len(rows)))[4])}
    # One tokenisation per distinct tokenizer: a second model with the chunk tokenizer reads the same columns;
    # a model with the anchor's tokenizer reads the anchor's tokens.
    other_chunks = save_own_tokenizer_augment(project, 2, False, arch="gpt2", seed=9)
    shared = prepared_job(project, tmp_path, f"augment=[{{model: {{path: {project.augment}}}}}, {{model: {{path: "
                          f"{save_own_tokenizer_augment(project, 2, False)}}}, connections: [[2, 2]]}}, {{model: "
                          f"{{path: {other_chunks}}}, connections: [[1, 1]]}}]")
    assert shared.data.augment_columns == (None, "aug1", "aug1") and list(shared.data.tokenisations) == ["aug1"]
    assert shared.models.composition.own_tokenizer == (False, True, True)
    from calm_dist.train.job import prepare_job

    logs = []
    again = prepare_job(shared.config, log=logs.append)
    assert again.data.directory == shared.data.directory
    assert not any("data: tokenised" in line for line in logs)  # cached, its tokenisation included
    alone = prepared_job(project, tmp_path)  # the same rows without the tokenizer of its own: another directory
    assert alone.data.directory != shared.data.directory and alone.data.augment_columns == (None,)


@pytest.mark.parametrize("rule", ["drop", "truncate"])
def test_an_augmenting_tokenisation_longer_than_its_model_follows_the_overlong_rule(project, tmp_path, rule):
    limited = save_own_tokenizer_augment(project, 2, False, max_positions=16)
    job = prepared_job(project, tmp_path, f"augment={{model: {{path: {limited}}}, connections: [[1, 0], [2, 2]]}}",
                       f"data.overlong={rule}")
    split = job.data.splits["train"]
    lengths = [len(ids) for ids in dp.TokenisedRows(job.data.train, ("aug0_input_ids",)).take(range(split.rows))[0]]
    assert max(lengths) == split.augment_longest["aug0"] <= 16 and job.data.tokenisations["aug0"].max_length == 16
    if rule == "drop":
        assert split.dropped_augment > 0 and split.rows == split.rows_in - split.dropped_augment
        assert split.augment_truncated == 0
    else:
        assert split.augment_truncated > 0 and split.rows == split.rows_in and split.dropped_augment == 0
        assert max(lengths) == 16
    tiny = save_own_tokenizer_augment(project, 2, False, max_positions=2)
    with pytest.raises(ValueError, match=r"config key 'data.train'.*no row.*longer than an augmenting model's "
                                         r"positions"):
        prepared_job(project, tmp_path, f"augment={{model: {{path: {tiny}}}, connections: [[1, 0], [2, 2]]}}")


def test_evaluation_in_one_process_reads_every_tokenisation(job, reference):
    from calm_dist.model import token_end_offsets
    from calm_dist.train.evaluate import calm_statistics, evaluate_set
    from calm_dist.train.job import build_local_model

    model = build_local_model(job)  # bridges at zero: step 0
    statistics = calm_statistics(model, job.data.augment_columns)
    layout = dp.anchor_layout(job.data.augment_columns, job.data.pad_ids)
    report = evaluate_set(statistics, job.data.eval_dir("eval"), "eval", 5, job.data.pad_id, layout=layout)
    assert abs(report.loss - reference[1][(0, "eval")].loss) <= 1e-5
    with pytest.raises(ValueError, match="the batch has no 'aug0_input_ids'.*anchor_layout"):
        evaluate_set(statistics, job.data.eval_dir("eval"), "eval", 5, job.data.pad_id)
    padded = token_end_offsets(chunk_tokenizer(2, False), ["big dog", "a"])  # a tokenizer without a pad token
    assert padded.attention_mask.tolist() == [[1, 1, 1, 1], [1, 0, 0, 0]]
    assert padded.end_offsets.tolist() == [[2, 4, 6, 7], [1, 0, 0, 0]]


def with_plan(job, anchor_ranks: int):
    inputs = runtime_inputs(job)
    return dataclasses.replace(inputs, parallel=dataclasses.replace(inputs.parallel, anchor_ranks=anchor_ranks))


def minimum_wire_bytes(job, column: str, taps: int, hidden: int, micro: int, anchor_ranks: int) -> int:
    """fp32 bytes of ``taps`` distinct layers of a model over every micro-batch of the run, each padded to its
    own longest row of ``column``: training micro-batches in reader order, then every evaluation's."""
    layout = dp.BatchLayout(False, False, ((column, 0),))
    total = 0
    for rank in range(anchor_ranks):
        reader = dp.ShardedReader(job.data.train, micro, rank=rank, world_size=anchor_ranks, seed=job.config.run.seed,
                                  layout=layout)
        total += sum(next(reader)[f"{column}_input_ids"].numel() for _ in range(STEPS))
        for name in job.data.eval_names:
            batches = dp.EvalBatches(job.data.eval_dir(name), job.config.eval.batch_size, rank=rank,
                                     world_size=anchor_ranks, layout=layout)
            total += 2 * sum(batches.batch(i)[f"{column}_input_ids"].numel() for i in range(len(batches)))
    return total * taps * hidden * 4


def common_prefix(first: list, second: list) -> int:
    count = 0
    while count < min(len(first), len(second)) and first[count] == second[count]:
        count += 1
    return count


def final_evaluation_losses(anchors: list[dict], job) -> dict[str, list[list]]:
    """Per evaluation set, each row's per-token losses at the last evaluation, rows in dataset order."""
    sets = {name: dp.EvalBatches(job.data.eval_dir(name), job.config.eval.batch_size, rank=0,
                                 world_size=len(anchors)) for name in job.data.eval_names}
    count = sum(len(batches) for batches in sets.values())
    rows: dict[str, list] = {name: [] for name in sets}
    finals = [result["token_losses"][-count:] for result in anchors]
    index = 0
    for name, batches in sets.items():
        for _ in range(len(batches)):
            for rank_records in finals:
                rows[name] += rank_records[index]
            index += 1
    return rows


@pytest.mark.timeout(600)
def test_distributed_matches_single_process_and_no_anchor_token_reads_past_its_end(job, reference, leak_sets,
                                                                                   tmp_path):
    from calm_dist.reports import EvalReport

    reference_losses, reference_evals, reference_bridges = reference
    inputs = with_plan(job, 2)
    results = spawn(token_loss_run, inputs.world_size, (inputs,), tmp_path)
    assert [r["role"] for r in results] == ["anchor-rank-0", "anchor-rank-1", "augment-stage-0", "augment1-stage-0"]
    anchors = results[:2]
    differences = [abs(a - b) for result in anchors for a, b in zip(result["losses"], reference_losses)]
    print(f"own tokenizers, 2 anchor ranks + 1 stage per model: max |distributed - single-process| loss over "
          f"{STEPS} steps: {max(differences):.2e}")
    assert len(reference_losses) == STEPS and reference_losses[0] != reference_losses[-1]
    assert all(len(result["losses"]) == STEPS for result in anchors) and max(differences) <= 1e-4
    evaluations = {(r.step, r.name): r for r in anchors[0]["reports"] if isinstance(r, EvalReport)}
    assert set(evaluations) == set(reference_evals) == {(s, n) for s in (0, STEPS) for n in ("eval", "a", "b")}
    for key, expected in reference_evals.items():
        assert abs(evaluations[key].loss - expected.loss) <= 1e-4, key
        assert evaluations[key].totals.rows == expected.totals.rows
    for name, tensor in reference_bridges.items():
        assert torch.allclose(anchors[0]["bridges"][name], tensor, atol=1e-5), name

    # Each stage sent exactly its model's taps at its own tokenisation's padded length, no more.
    micro = job.config.train.batch_size // 2
    for result, column, taps in ((results[2], "aug0", 2), (results[3], "aug1", 2)):
        assert result["bytes_sent"] == minimum_wire_bytes(job, column, taps, 24, micro, 2), column

    # No leak: rows of a and b agree up to a character offset; every anchor token that ends there or before
    # has the same loss in both, and the changed text does change later losses.
    losses = final_evaluation_losses(anchors, job)
    read = dp.TokenisedRows
    same, changed = (read(job.data.eval_dir(name), ("input_ids", "end_offsets")).take(range(LEAK_ROWS))
                     for name in ("a", "b"))
    compared, largest_same, largest_after = 0, 0.0, 0.0
    for row, offset in enumerate(leak_sets):
        ids, other_ids = same[0][row].tolist(), changed[0][row].tolist()
        ends = same[1][row].tolist()
        agreed = min(common_prefix(ids, other_ids), common_prefix(ends, changed[1][row].tolist()))
        last = max(k for k in range(agreed) if ends[k] <= offset)  # the last shared anchor token ending by offset
        first_losses, second_losses = dict(losses["a"][row]), dict(losses["b"][row])
        for k in range(1, last + 2):  # predicted from positions 0..last, whose reach is within the offset
            if k < len(ids) and k < len(other_ids) and ids[k] == other_ids[k]:
                largest_same = max(largest_same, abs(first_losses[k] - second_losses[k]))
                compared += 1
        later = [abs(first_losses[k] - second_losses[k]) for k in first_losses
                 if k > last + 1 and k in second_losses]
        largest_after = max([largest_after, *later])
    print(f"no leak: {compared} anchor-token losses compared, max difference {largest_same:.2e}; "
          f"after the offset up to {largest_after:.2e}")
    assert compared >= 3 * LEAK_ROWS and largest_same <= 1e-6
    assert largest_after > 1e-3


RAY_NODES = [{"num_cpus": 1, "resources": {"anchor": 2}}, {"num_cpus": 1, "resources": {"augment": 2}}]


@pytest.fixture(scope="module")
def cluster():
    from launcher.simulated_cluster import simulated_cluster

    with simulated_cluster(RAY_NODES) as running:
        yield running


@pytest.mark.timeout(600)
def test_the_job_on_a_simulated_two_node_ray_cluster_matches_the_single_process_run(job, reference, cluster,
                                                                                     tmp_path):
    import copy
    import json

    import ray

    from calm_dist.train.report import read_jsonl
    from launcher.ray_job import run_ray_job

    config = copy.deepcopy(job.config)
    config.run.launcher, config.parallel.anchor_ranks, config.parallel.timeout_s = "ray", 2, 120
    config.ray.cpus_per_worker = 0.5
    config.ray.anchor_resources, config.ray.augment_resources = {"anchor": 1}, {"augment": 1}
    config.checkpoint.every_steps = STEPS // 2  # for launcher.export below
    run_dir = run_ray_job(config)
    reference_losses, reference_evals, _ = reference
    losses = [record["loss"] for record in read_jsonl(run_dir / "metrics.jsonl") if "loss" in record]
    print(f"own tokenizers on Ray (2 nodes, 2 anchor ranks + 1 stage per model): max |Ray - single-process| loss "
          f"over {STEPS} steps: {max(abs(a - b) for a, b in zip(losses, reference_losses)):.2e}")
    assert len(losses) == STEPS and max(abs(a - b) for a, b in zip(losses, reference_losses)) <= 1e-4
    results = json.loads((run_dir / "results.json").read_text())
    for (step, name), expected in reference_evals.items():
        assert abs(results["anchor" if step == 0 else "calm"][f"{name}_loss"] - expected.loss) <= 1e-4, (step, name)
    summary = json.loads((run_dir / "run_summary.json").read_text())
    resources = {node["NodeID"]: node["Resources"] for node in ray.nodes()}
    nodes = summary["placement"]["nodes_by_rank"]
    assert nodes[0] == nodes[1] and resources[nodes[0]].get("anchor")
    assert nodes[2] == nodes[3] != nodes[0] and resources[nodes[2]].get("augment")
    assert summary["augment_tokenizers"] == [str(path) for path in job.models.augment_tokenizer_dirs]
    assert summary["data"]["splits"]["train"]["augment_longest"]["aug1"] > summary["data"]["splits"]["train"]["longest"]
    # The run's export keeps both models' tokenizers and generates from text, equal to full recomputation
    from transformers import AutoTokenizer

    from calm_dist import CALMForCausalLM
    from calm_dist.model import generate_text

    exported = CALMForCausalLM.from_pretrained(run_dir / "export")
    assert exported.own_tokenizer_models == [0, 1]
    prompts = [" ".join(WORDS[:3]) + " =>", WORDS[4]]
    cached = exported.generate_text(prompts, max_new_tokens=5, eos_token_id=None)
    recomputed = generate_text(exported.calm, AutoTokenizer.from_pretrained(run_dir / "export"),
                               exported.augment_tokenizers(), prompts, 5, eos_token_id=None, use_cache=False)
    assert cached.new_token_ids == recomputed.new_token_ids and cached.texts == recomputed.texts

    # python -m launcher.export from the run's checkpoints: the latest (the last step) is the run's own export,
    # each augmenting model's tokenizer taken from the checkpoint's record of the composition.
    from launcher.export import main as export_main

    assert export_main(["--run", str(run_dir), "--out", str(tmp_path / "latest")]) == 0
    from_checkpoint = CALMForCausalLM.from_pretrained(tmp_path / "latest")
    assert from_checkpoint.own_tokenizer_models == [0, 1]
    assert from_checkpoint.config.calm_metadata["step"] == STEPS
    assert [entry["tokenizer"] for entry in from_checkpoint.config.augments] == ["augment0", "augment1"]
    for saved, original in zip(from_checkpoint.augment_tokenizers(), (chunk_tokenizer(2, False),
                                                                      chunk_tokenizer(1, True))):
        assert saved(prompts[0], return_offsets_mapping=True).data == \
            original(prompts[0], return_offsets_mapping=True).data
    state, trained = from_checkpoint.calm.composition_state_dict(), exported.calm.composition_state_dict()
    assert state.keys() == trained.keys() and all(torch.equal(state[k], trained[k]) for k in trained)
    again = from_checkpoint.generate_text(prompts, max_new_tokens=5, eos_token_id=None)
    assert again.new_token_ids == cached.new_token_ids and again.texts == cached.texts
    # An earlier checkpoint: other bridges, and its cached generation still equals full recomputation.
    assert export_main(["--run", str(run_dir), "--checkpoint", checkpoint_name(STEPS // 2), "--out",
                        str(tmp_path / "middle")]) == 0
    middle = CALMForCausalLM.from_pretrained(tmp_path / "middle")
    assert middle.config.calm_metadata["step"] == STEPS // 2 and middle.own_tokenizer_models == [0, 1]
    middle_state = middle.calm.composition_state_dict()
    assert middle_state.keys() == trained.keys() and any(not torch.equal(middle_state[k], trained[k]) for k in trained)
    cached_middle = middle.generate_text(prompts, max_new_tokens=5, eos_token_id=None)
    recomputed_middle = generate_text(middle.calm, AutoTokenizer.from_pretrained(tmp_path / "middle"),
                                      middle.augment_tokenizers(), prompts, 5, eos_token_id=None, use_cache=False)
    assert cached_middle.new_token_ids == recomputed_middle.new_token_ids
