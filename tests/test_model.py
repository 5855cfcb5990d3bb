"""Invariants of the single-device composed model, for every tested architecture pair."""
import copy

import pytest
import torch

import calm_dist
from calm_dist.model.loss import per_example_loss
from tests.tiny_models import (EOS, PAD, PAIRS, random_ids, randomise_bridges, tiny_model, tiny_pair,
                               train_and_check_only_bridges_change)

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize("anchor_arch,augment_arch", PAIRS)
def test_composed_equals_anchor_at_init(anchor_arch, augment_arch):
    reference = tiny_model(anchor_arch, hidden=48, layers=3, heads=6, seed=1)
    model = tiny_pair(anchor_arch, augment_arch)
    ids = random_ids(3, 9)
    with torch.no_grad():
        expected = reference(input_ids=ids).logits
        composed = model(ids).logits
    assert (composed - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize("anchor_arch,augment_arch", PAIRS)
def test_no_leak_from_future_tokens(anchor_arch, augment_arch):
    model = tiny_pair(anchor_arch, augment_arch)
    randomise_bridges(model)
    ids = random_ids(2, 10)
    changed = ids.clone()
    t = 5
    changed[:, t + 1:] = random_ids(2, 10, seed=7)[:, t + 1:]
    with torch.no_grad():
        before, after = model(ids).logits, model(changed).logits
    assert (before[:, : t + 1] - after[:, : t + 1]).abs().max().item() == 0.0
    assert (before[:, t + 1:] - after[:, t + 1:]).abs().max().item() > 0  # the test can see a change


@pytest.mark.parametrize("anchor_arch,augment_arch", PAIRS)
def test_bridges_change_the_output_once_trained(anchor_arch, augment_arch):
    reference = tiny_model(anchor_arch, hidden=48, layers=3, heads=6, seed=1)
    model = tiny_pair(anchor_arch, augment_arch)
    randomise_bridges(model)
    ids = random_ids(2, 6)
    with torch.no_grad():
        assert (model(ids).logits - reference(input_ids=ids).logits).abs().max() > 1e-3


@pytest.mark.parametrize("anchor_arch,augment_arch", PAIRS)
def test_cached_generation_equals_full_recomputation(anchor_arch, augment_arch):
    model = tiny_pair(anchor_arch, augment_arch)
    randomise_bridges(model)
    ids = random_ids(3, 6)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # a left-padded row
    cached = model.generate(ids, attention_mask=mask, max_new_tokens=10, eos_token_id=None)
    full = model.generate(ids, attention_mask=mask, max_new_tokens=10, eos_token_id=None, use_cache=False)
    assert cached.shape == (3, 16)
    assert torch.equal(cached, full)


def test_generation_stops_rows_at_eos_and_pads_them():
    model = tiny_pair("llama", "llama")
    randomise_bridges(model)
    ids = random_ids(4, 5)
    free = model.generate(ids, max_new_tokens=6, eos_token_id=None)[:, 5:]
    eos = int(free[0, 1])  # pretend the second generated token of row 0 is EOS
    out = model.generate(ids, max_new_tokens=6, eos_token_id=eos, pad_token_id=PAD)[:, 5:]
    first = (free[0] == eos).nonzero()[0].item()
    assert torch.equal(out[0, : first + 1], free[0, : first + 1])
    assert (out[0, first + 1:] == PAD).all()


@pytest.mark.parametrize("anchor_arch,augment_arch", [("llama", "gpt2"), ("gpt_neox", "qwen2")])
def test_only_composition_parameters_get_gradients(anchor_arch, augment_arch):
    model = tiny_pair(anchor_arch, augment_arch)
    randomise_bridges(model)
    train_and_check_only_bridges_change(model, steps=3)


def _pad(ids, lengths, side):
    width = max(lengths)
    out = torch.full((len(lengths), width), PAD)
    mask = torch.zeros((len(lengths), width), dtype=torch.long)
    for row, n in enumerate(lengths):
        span = slice(0, n) if side == "right" else slice(width - n, width)
        out[row, span], mask[row, span] = ids[row, :n], 1
    return out, mask


@pytest.mark.parametrize("anchor_arch,augment_arch", PAIRS)
def test_left_and_right_padding_agree(anchor_arch, augment_arch):
    model = tiny_pair(anchor_arch, augment_arch)
    randomise_bridges(model)
    ids, lengths = random_ids(3, 9), [9, 5, 7]
    results = {}
    for side in ("left", "right"):
        padded, mask = _pad(ids, lengths, side)
        labels = padded.masked_fill(mask == 0, -100)
        with torch.no_grad():
            losses = per_example_loss(model(padded, attention_mask=mask).logits, labels, mask)
        generated = model.generate(padded, attention_mask=mask, max_new_tokens=5, eos_token_id=None)
        results[side] = (losses, generated[:, -5:])
    torch.testing.assert_close(results["left"][0], results["right"][0], atol=1e-5, rtol=1e-5)
    assert torch.equal(results["left"][1], results["right"][1])
    for row, n in enumerate(lengths):  # and each row alone, unpadded
        alone = model.generate(ids[row:row + 1, :n], max_new_tokens=5, eos_token_id=None)[:, -5:]
        assert torch.equal(alone[0], results["left"][1][row])


def test_every_n_connections_follow_the_paper():
    anchor, augment = tiny_model("llama", 48, 8, 6, seed=1), tiny_model("llama", 32, 8, 4, seed=2)
    model = calm_dist.compose(anchor, augment, every_n=4)
    assert model.connections == [(3, 3), (7, 7)]
    assert model.tapped_layers == [3, 7]
    assert len(model.bridges) == 2


def test_many_to_one_and_one_to_many_connections():
    model = tiny_pair("llama", "llama", connections=[(0, 1), (2, 1), (3, 0), (3, 2)])
    randomise_bridges(model)
    ids = random_ids(2, 7)
    cached = model.generate(ids, max_new_tokens=4, eos_token_id=None)
    assert torch.equal(cached, model.generate(ids, max_new_tokens=4, eos_token_id=None, use_cache=False))


def test_composition_state_dict_holds_only_bridges_and_round_trips():
    model = tiny_pair("llama", "gpt2")
    randomise_bridges(model)
    state = copy.deepcopy(model.composition_state_dict())
    assert all(key.startswith("bridges.") for key in state)
    assert sum(t.numel() for t in state.values()) == sum(p.numel() for p in model.trainable_parameters())
    other = tiny_pair("llama", "gpt2")
    other.load_composition_state_dict(state)
    ids = random_ids(2, 6)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, other(ids).logits)


def test_bridge_projects_augment_width_to_anchor_width_with_anchor_heads():
    model = tiny_pair("llama", "gpt2")
    bridge = model.bridges[0]
    assert bridge.proj.in_features == 32 and bridge.proj.out_features == 48
    assert bridge.num_heads == 6
    assert torch.count_nonzero(tiny_pair("llama", "gpt2").bridges[0].o_proj.weight) == 0


@pytest.mark.parametrize("augment_arch", ["llama", "gpt2", "gpt_neox", "qwen2"])
def test_augment_taps_are_the_hf_hidden_states(augment_arch):
    reference = tiny_model(augment_arch, hidden=32, layers=4, heads=4, seed=2)
    model = tiny_pair("llama", augment_arch, connections=[(0, 0), (2, 1), (3, 2)])
    ids = random_ids(2, 7)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        hidden = reference.base_model(input_ids=ids, output_hidden_states=True).hidden_states
        taps = model.augment_hidden_states(ids, mask, torch.arange(7)[None].expand(2, -1))
    for tap, layer in zip(taps, (0, 2, 3)):  # the final layer's tap is after the final norm
        assert torch.allclose(tap, hidden[layer + 1], atol=1e-6)


def test_augment_layers_above_the_deepest_tap_do_not_run():
    model = tiny_pair("llama", "llama", connections=[(1, 0)])

    class Boom(torch.nn.Module):
        def forward(self, *args, **kwargs):
            raise AssertionError("layer above the deepest tap ran")

    layers = calm_dist.model.find_decoder_layers(model.augment)
    layers[3].layer = Boom()
    model(random_ids(1, 5))


@pytest.mark.parametrize("relative_scale,position_buckets", [(False, 0), (True, 0), (False, 3)])
def test_a_bridge_generating_through_its_folded_memory_equals_it_projecting_keys_and_values(relative_scale,
                                                                                           position_buckets):
    """Prefix then one token at a time through ``BridgeMemory`` (raw augment states, folded key/value
    weights) against one full forward that projects keys and values; padding leaves queries with no key."""
    from calm_dist.model.bridge import BridgeInput, CrossAttentionBridge, CrossMask
    from calm_dist.model.cache import BridgeMemory

    torch.manual_seed(0)
    bridge = CrossAttentionBridge(augment_dim=12, anchor_dim=16, num_heads=4, relative_scale=relative_scale,
                                  position_buckets=position_buckets)
    for parameter in bridge.parameters():
        torch.nn.init.normal_(parameter, std=0.5)
    hidden, states = torch.randn(2, 7, 16), torch.randn(2, 7, 12)
    real = torch.ones(2, 7, dtype=torch.bool)
    real[1, :3] = False  # row 1: three padding positions first
    allowed = torch.ones(7, 7, dtype=torch.bool).tril()[None, None] & real[:, None, None, :]
    with torch.no_grad():
        full = bridge(hidden, BridgeInput(states, CrossMask.from_allowed(allowed)))
        memory = BridgeMemory()
        pieces = [bridge(hidden[:, :4], BridgeInput(states[:, :4], CrossMask.from_allowed(allowed[..., :4, :4]),
                                                    memory))]
        for t in range(4, 7):
            pieces.append(bridge(hidden[:, t:t + 1], BridgeInput(states[:, t:t + 1],
                                                                 CrossMask.from_allowed(allowed[..., t:t + 1, :t + 1]),
                                                                 memory)))
    assert memory.states.shape == (2, 1, 7, 12)  # augment_dim numbers per position, not 2 x anchor_dim
    assert full[1, :3].abs().max() == 0  # queries with no key add nothing
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("anchor_arch", ["llama", "gpt2"])
def test_activation_checkpointing_recomputes_the_layers_above_the_first_bridge_only_and_changes_no_gradient(
        anchor_arch):
    import calm_dist
    from calm_dist.model.layers import find_decoder_layers

    plain = calm_dist.compose(tiny_model(anchor_arch, hidden=48, layers=4, heads=6, seed=1),
                              tiny_model("llama", hidden=32, layers=4, heads=4, seed=2), connections=[(1, 1), (3, 3)])
    randomise_bridges(plain)
    checkpointed = copy.deepcopy(plain).checkpoint_activations()
    ids = random_ids(2, 10)
    labels = ids.clone()
    labels[:, :4] = -100
    results = {}
    for name, model in (("plain", plain), ("checkpointed", checkpointed)):
        calls = [0] * 4

        def count(index):
            return lambda module, args: calls.__setitem__(index, calls[index] + 1)

        for index, layer in enumerate(find_decoder_layers(model.anchor)):
            # a pre-hook on the Hugging Face layer (inside a wrapper): a recomputation stops once it has what
            # backward needs, before the layer returns
            getattr(layer, "layer", layer).register_forward_pre_hook(count(index))
        embedded = []
        model.anchor.get_input_embeddings().register_forward_hook(
            lambda module, args, output: embedded.append(output.requires_grad))
        model.train()
        loss = model(ids, labels=labels, logits_for="labels").loss
        loss.backward()
        results[name] = (loss.detach(), [p.grad.clone() for p in model.trainable_parameters()], calls, embedded)
    (loss, grads, calls, embedded), (ck_loss, ck_grads, ck_calls, ck_embedded) = (results["plain"],
                                                                                  results["checkpointed"])
    assert calls == [1, 1, 1, 1]
    assert ck_calls == [1, 1, 2, 2]  # layers 2 and 3 run again in backward; 0 and 1 (up to the first bridge) never
    assert embedded == ck_embedded == [False]  # no gradient below the first bridge
    assert torch.equal(loss, ck_loss)
    for plain_grad, checkpointed_grad in zip(grads, ck_grads):
        torch.testing.assert_close(checkpointed_grad, plain_grad, atol=1e-6, rtol=1e-5)
