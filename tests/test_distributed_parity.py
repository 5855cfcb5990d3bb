"""The distributed runtime (ZeRO-3 anchor ranks + augment pipeline stages) against its single-process twin."""
import pytest
import torch

from calm_dist.config import load_config
from calm_dist.distributed.worker import RunInputs
from calm_dist.train.composition import build_composed, composition_reader
from calm_dist.train.loop import OptimSettings, train_loop
from calm_dist.train.pretrain import ensure_base_models
from calm_dist.train.task_data import prepare_task_data
from tests.dist_helpers import spawn
from tests.dist_workers import composition_run, failing_run

STEPS = 10


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    overrides = [f"run.cache_dir={cache}", f"train.max_steps={STEPS}", "train.batch_size=8",
                 "composition.connections=[[0, -1], [1, 0], [1, 1]]", "parallel.timeout_s=60"]
    config = load_config("configs/tiny.yaml", overrides)
    task_data = prepare_task_data(config)
    return config, task_data, ensure_base_models(config, task_data)


def single_process(config, task_data, model_dirs):
    torch.set_num_threads(1)
    model = build_composed(config, model_dirs, task_data)
    model.train()
    reader = composition_reader(config, task_data)
    loss_fn = lambda b: model(b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss  # noqa
    losses = train_loop(loss_fn, model.trainable_parameters(), reader, OptimSettings.of(config.train),
                        description="reference", show_progress=False)
    return losses, model.composition_state_dict()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("anchor_ranks,stages", [(1, 1), (2, 2)])
def test_distributed_matches_single_process(prepared, tmp_path, anchor_ranks, stages):
    config, task_data, model_dirs = prepared
    config.parallel.anchor_ranks, config.parallel.augment_stages = anchor_ranks, stages
    reference_losses, reference_bridges = single_process(config, task_data, model_dirs)
    results = spawn(composition_run, anchor_ranks + stages, (RunInputs(config, task_data, model_dirs),), tmp_path)
    anchors = [r for r in results if "losses" in r]
    assert len(anchors) == anchor_ranks
    for result in anchors:  # every anchor rank reports the same global loss
        assert max(abs(a - b) for a, b in zip(result["losses"], reference_losses)) <= 1e-4
    assert len(reference_losses) == STEPS and reference_losses[0] != reference_losses[-1]
    for name, tensor in reference_bridges.items():
        assert torch.allclose(anchors[0]["bridges"][name], tensor, atol=1e-5), name


@pytest.mark.timeout(300)
def test_a_failing_rank_fails_every_rank(prepared, tmp_path):
    config, task_data, model_dirs = prepared
    config.parallel.anchor_ranks, config.parallel.augment_stages = 1, 1
    with pytest.raises(Exception, match="injected failure on rank 1"):
        spawn(failing_run, 2, (RunInputs(config, task_data, model_dirs), 1), tmp_path)
