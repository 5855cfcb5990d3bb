"""Distributed runtime facts: staged activations, real partitioning, bytes on the wire, checkpointing."""
import copy
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from calm_dist.config import load_config
from calm_dist.distributed.augment_pipeline import AugmentStage
from calm_dist.distributed.worker import RunInputs
from calm_dist.train.pretrain import ensure_base_models
from calm_dist.train.task_data import prepare_task_data
from tests.dist_helpers import spawn
from tests.dist_workers import partition_facts, reporting_run
from tests.tiny_models import random_ids, tiny_model

pytestmark = pytest.mark.timeout(300)
CONNECTIONS = "composition.connections=[[0, -1], [1, 0], [1, 1]]"


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    config = load_config("configs/tiny.yaml", [f"run.cache_dir={cache}", "train.max_steps=3", "train.batch_size=8",
                                               CONNECTIONS, "parallel.timeout_s=60"])
    task_data = prepare_task_data(config)
    return config, task_data, ensure_base_models(config, task_data)


def inputs_with(prepared, **parallel) -> RunInputs:
    config, task_data, model_dirs = prepared
    config = copy.deepcopy(config)
    for key, value in parallel.items():
        section, name = key.split("__")
        setattr(getattr(config, section), name, value)
    return RunInputs(config, task_data, model_dirs)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_staged_activations_equal_the_unsplit_hidden_states(arch):
    reference = tiny_model(arch, hidden=32, layers=6, heads=4, seed=2)
    ids = random_ids(3, 9)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with torch.no_grad():
        hidden = reference.base_model(input_ids=ids, attention_mask=mask,
                                      position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                                      output_hidden_states=True).hidden_states
    taps = [1, 3, 5]
    stages = [AugmentStage(tiny_model(arch, hidden=32, layers=6, heads=4, seed=2), layers, {t for t in taps if t in layers} | {layers[-1]})
              for layers in (range(0, 2), range(2, 4), range(4, 6))]
    outputs, inject = {}, None
    for stage in stages:
        result = stage.forward(ids, mask, inject)
        outputs.update(result)
        inject = result[stage.layers[-1]]
    for layer in taps:
        assert (outputs[layer] - hidden[layer + 1]).abs().max().item() <= 1e-6, layer


def test_partitioning_is_real_and_optimizer_state_is_composition_only(prepared, tmp_path):
    inputs = inputs_with(prepared, parallel__anchor_ranks=2, parallel__augment_stages=1,
                         deepspeed__param_persistence_threshold=0)
    results = [r for r in spawn(partition_facts, 3, (inputs,), tmp_path) if "partitions" in r]
    assert len(results) == 2
    plain = AutoModelForCausalLM.from_pretrained(inputs.model_dirs["anchor"])
    for result in results:
        for name, (local, full) in result["partitions"].items():
            assert local == math.ceil(full / 2), name
        for name, tensor in plain.named_parameters():
            assert torch.equal(result["weights"][name], tensor.detach()), name
        # AdamW: exp_avg + exp_avg_sq for this rank's partition of the bridges, nothing for the anchor
        assert result["optimizer_numel"] == 2 * result["bridge_partition_numel"]


@pytest.mark.parametrize("wire,width", [("float32", 4), ("bfloat16", 2)])
def test_wire_bytes_per_step_are_exactly_the_taps(prepared, tmp_path, wire, width):
    inputs = inputs_with(prepared, parallel__anchor_ranks=1, parallel__augment_stages=1, parallel__wire_dtype=wire)
    results = spawn(reporting_run, 2, (inputs,), tmp_path)
    reports = results[0]["reports"]
    taps = 2  # CONNECTIONS read augment layers 0 and 1; layer 1 feeds two bridges but is sent once
    hidden = inputs.config.augment.model.hidden_size
    from calm_dist.train.composition import composition_reader

    reader = composition_reader(inputs.config, inputs.task_data)
    for report in reports:
        batch = next(reader)
        batch_size, seq_len = batch["input_ids"].shape
        assert report.bytes_received == taps * batch_size * seq_len * hidden * width
    if wire == "bfloat16":  # bf16 on the wire still trains
        assert all(math.isfinite(r.loss) for r in reports)


def test_activation_checkpointing_gives_the_same_losses(prepared, tmp_path):
    plain = spawn(reporting_run, 2, (inputs_with(prepared),), tmp_path / "plain")
    checkpointed = spawn(reporting_run, 2, (inputs_with(prepared, deepspeed__activation_checkpointing=True),),
                         tmp_path / "checkpointed")
    assert max(abs(a - b) for a, b in zip(plain[0]["losses"], checkpointed[0]["losses"])) <= 1e-5


def test_bf16_anchor_trains_and_stays_close_to_fp32(prepared, tmp_path):
    fp32 = spawn(reporting_run, 2, (inputs_with(prepared),), tmp_path / "fp32")
    bf16 = spawn(reporting_run, 2, (inputs_with(prepared, deepspeed__bf16=True, parallel__wire_dtype="bfloat16"),),
                 tmp_path / "bf16")
    losses = bf16[0]["losses"]
    assert all(math.isfinite(loss) for loss in losses)
    assert max(abs(a - b) for a, b in zip(fp32[0]["losses"], losses)) < 0.1
