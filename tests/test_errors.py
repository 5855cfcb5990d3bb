"""Errors a user can cause are caught before training, with a message that names the problem."""
import pytest
import torch
from torch import nn

import calm_dist
from calm_dist.config import load_config
from tests.tiny_models import tiny_model


def test_vocab_size_mismatch():
    anchor = tiny_model("llama")
    augment = tiny_model("gpt2")
    augment.resize_token_embeddings(60)
    with pytest.raises(ValueError, match="vocabulary size mismatch"):
        calm_dist.compose(anchor, augment, every_n=2)


@pytest.mark.parametrize("every_n", [0, 5, -1])
def test_every_n_out_of_range(every_n):
    with pytest.raises(ValueError, match="every_n"):
        calm_dist.compose(tiny_model("llama"), tiny_model("llama"), every_n=every_n)


@pytest.mark.parametrize("connections,needle", [
    ([(4, 0)], "augment layer 4"),
    ([(0, 4)], "anchor layer 4"),
    ([(0, -2)], "anchor layer -2"),
    ([], "empty"),
    ([(0, 1), (0, 1)], "twice"),
    ([(0,)], "expected"),
])
def test_connection_out_of_range(connections, needle):
    with pytest.raises(ValueError, match=needle):
        calm_dist.compose(tiny_model("llama"), tiny_model("llama"), connections=connections)


def test_every_n_and_connections_together():
    with pytest.raises(ValueError, match="either every_n or connections"):
        calm_dist.compose(tiny_model("llama"), tiny_model("llama"), every_n=2, connections=[(0, 0)])


def test_unsupported_model_names_its_class():
    class NotAnLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(2, 2)

    with pytest.raises(ValueError, match="NotAnLM"):
        calm_dist.compose(tiny_model("llama"), NotAnLM())


def test_composing_an_anchor_twice_is_refused():
    anchor = tiny_model("llama")
    calm_dist.compose(anchor, tiny_model("llama", seed=5), every_n=2)
    with pytest.raises(ValueError, match="already part of a composed model"):
        calm_dist.compose(anchor, tiny_model("llama", seed=6), every_n=2)


def test_missing_model_path(tmp_path):
    from calm_dist.train.base_models import load_pretrained

    with pytest.raises(FileNotFoundError, match="anchor.model.path"):
        load_pretrained(tmp_path / "missing", "anchor")


def test_generate_rejects_negative_length():
    model = calm_dist.compose(tiny_model("llama"), tiny_model("llama", seed=5), every_n=2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(torch.ones(1, 3, dtype=torch.long), max_new_tokens=-1)


def test_bad_model_path_in_config_fails_before_training(tmp_path):
    from calm_dist.train.pretrain import ensure_base_models
    from calm_dist.train.task_data import prepare_task_data

    config = load_config("configs/tiny.yaml", [f"run.cache_dir={tmp_path}", f"anchor.model.path={tmp_path}/nope"])
    with pytest.raises(FileNotFoundError, match="anchor.model.path"):
        ensure_base_models(config, prepare_task_data(config))
