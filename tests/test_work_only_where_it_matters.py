"""Work only where it matters, counted with hooks: logits only where a labelled token is predicted, no backward
through anchor layers below the first bridge, and augmenting models that stop at their deepest tapped layer."""
import torch

import calm_dist
from calm_dist.model.layers import find_decoder_layers
from calm_dist.model.loss import IGNORE_INDEX
from tests.tiny_models import random_ids, tiny_model


def composed(connections):
    return calm_dist.compose(tiny_model("llama", hidden=48, layers=4, heads=6, seed=1),
                             tiny_model("llama", hidden=32, layers=6, heads=4, seed=2), connections=connections, seed=0)


def prompt_completion_batch(batch=3, length=12, completion=3):
    ids = random_ids(batch, length)
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, -completion:] = ids[:, -completion:]
    return ids, labels


def test_logits_only_where_a_labelled_token_is_predicted():
    model = composed([(1, 0), (3, 2)])
    ids, labels = prompt_completion_batch()
    rows_seen = []
    handle = model.anchor.get_output_embeddings().register_forward_hook(
        lambda module, inputs, output: rows_seen.append(inputs[0].reshape(-1, inputs[0].shape[-1]).shape[0]))
    out = model(ids, labels=labels, logits_for="labels")
    handle.remove()
    assert rows_seen == [3 * 3]  # 3 rows x 3 predicted tokens, not 3 x 12 positions
    full = model(ids, labels=labels)  # the same loss as over every position's logits
    assert torch.allclose(out.loss, full.loss, atol=1e-6)
    assert out.statistics.tokens == 9 and out.statistics.rows == 3


def test_no_backward_through_anchor_layers_below_the_first_bridge():
    model = composed([(3, 2), (5, 3)])  # the first bridge adds to anchor layer 2's output
    backward_calls = []
    for index, layer in enumerate(find_decoder_layers(model.anchor)):
        inner = getattr(layer, "layer", layer)
        inner.register_full_backward_hook(lambda module, grad_in, grad_out, index=index: backward_calls.append(index))
    ids, labels = prompt_completion_batch()
    model.train()
    model(ids, labels=labels, logits_for="labels").loss.backward()
    assert sorted(set(backward_calls)) == [3]  # only above the bridge: layers 0-2 computed on frozen inputs


def test_augmenting_models_stop_at_their_deepest_tapped_layer():
    model = composed([(1, 0), (3, 2)])  # the augmenting model has 6 layers; the deepest tap is layer 3
    calls = []
    for index, layer in enumerate(find_decoder_layers(model.augment)):
        layer.layer.register_forward_hook(lambda module, inputs, output, index=index: calls.append(index))
    ids, labels = prompt_completion_batch()
    model(ids, labels=labels, logits_for="labels")
    assert calls == [0, 1, 2, 3]
