"""Errors a user can cause are caught before training, with a message that names the problem."""
import pytest
import torch
from torch import nn

import calm_dist
from tests.tiny_models import tiny_model


def test_an_embedding_padded_beyond_the_tokenizer_composes():
    anchor = tiny_model("llama")
    augment = tiny_model("gpt2")
    augment.resize_token_embeddings(60)  # e.g. 32016 rows for a 32000-token tokenizer
    model = calm_dist.compose(anchor, augment, every_n=2)
    ids = torch.randint(3, 48, (2, 5))
    assert model(ids).logits.shape == (2, 5, 48)


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


def test_generate_rejects_negative_length():
    model = calm_dist.compose(tiny_model("llama"), tiny_model("llama", seed=5), every_n=2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(torch.ones(1, 3, dtype=torch.long), max_new_tokens=-1)


def test_a_model_with_its_own_tokenizer_never_reads_the_anchor_ids():
    model = calm_dist.compose(tiny_model("llama"), tiny_model("llama", seed=5), every_n=2, shared_tokenizer=False)
    with pytest.raises(ValueError, match=r"augmenting models \[0\] have their own tokenizer: pass .*augment_inputs"):
        model(torch.randint(3, 48, (1, 4)))
