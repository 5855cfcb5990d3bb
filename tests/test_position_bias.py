"""Bridges with position logits (``composition.position_buckets``): each head's learned logit by the distance
between anchor and augment position, distance 0 starting at ``aligned_logit``."""
import pytest
import torch

import calm_dist
from calm_dist.model.bridge import BridgeInput, CrossAttentionBridge, CrossMask
from tests.hf_fixtures import bpe_tokenizer, save_base_models
from tests.tiny_models import random_ids, randomise_bridges, tiny_model, tiny_pair

pytestmark = pytest.mark.timeout(120)
CONNECTIONS = [(0, -1), (1, 0), (3, 2)]


def _bridge_reading(position_buckets: int, aligned_logit: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(what a bridge with no query weights adds at each of 6 positions, each position's own augment state
    projected as the bridge projects values)."""
    torch.manual_seed(0)
    bridge = CrossAttentionBridge(augment_dim=12, anchor_dim=16, num_heads=4, position_buckets=position_buckets,
                                  aligned_logit=aligned_logit)
    for linear in (bridge.proj, bridge.v_proj, bridge.o_proj):
        torch.nn.init.normal_(linear.weight, std=0.5)
    torch.nn.init.zeros_(bridge.q_proj.weight)  # the anchor's state says nothing: only positions can choose
    hidden, states = torch.randn(2, 6, 16), torch.randn(2, 6, 12)
    with torch.no_grad():
        added = bridge(hidden, BridgeInput(states, CrossMask.causal(0, 6, "cpu")))
        own = bridge.o_proj(bridge.v_proj(bridge.proj(states)))
    return added, own


def test_an_aligned_logit_makes_each_anchor_position_read_the_augment_state_of_its_own_token():
    added, own = _bridge_reading(position_buckets=4, aligned_logit=40.0)
    torch.testing.assert_close(added, own, atol=1e-5, rtol=1e-5)
    plain, own = _bridge_reading(position_buckets=0, aligned_logit=0.0)
    assert (plain[:, 1:] - own[:, 1:]).abs().max() > 0.1  # without positions: a mean over the prefix
    torch.testing.assert_close(plain[:, 0], own[:, 0], atol=1e-5, rtol=1e-5)  # (position 0 has one key)


def test_position_logits_are_trained_and_the_composed_model_still_equals_the_anchor_at_init():
    reference = tiny_model("llama", hidden=48, layers=3, heads=6, seed=1)
    model = tiny_pair("llama", "gpt2", connections=CONNECTIONS, position_buckets=4)
    ids = random_ids(3, 9)
    with torch.no_grad():
        assert (model(ids).logits - reference(input_ids=ids).logits).abs().max().item() <= 1e-5
    biases = [bridge.position_bias for bridge in model.bridges]
    assert all(bias.shape == (6, 4) and bias[:, 0].eq(8.0).all() and bias[:, 1:].eq(0).all() for bias in biases)
    assert all(any(bias is parameter for parameter in model.trainable_parameters()) for bias in biases)
    randomise_bridges(model)
    model(ids, labels=ids).loss.backward()
    assert all(bias.grad is not None and bias.grad.abs().sum() > 0 for bias in biases)


def test_with_position_logits_nothing_leaks_from_future_tokens_and_cached_generation_equals_recomputation():
    model = tiny_pair("llama", "qwen2", connections=CONNECTIONS, position_buckets=3, aligned_logit=2.0)
    randomise_bridges(model)
    for bridge in model.bridges:
        torch.nn.init.normal_(bridge.position_bias, std=2.0)
    ids = random_ids(2, 10)
    changed = ids.clone()
    changed[:, 6:] = random_ids(2, 10, seed=7)[:, 6:]
    with torch.no_grad():
        before, after = model(ids).logits, model(changed).logits
    assert (before[:, :6] - after[:, :6]).abs().max().item() == 0.0
    mask = torch.ones_like(ids[:, :6])
    mask[0, :2] = 0  # a left-padded row: distances count tokens, and both models share the padding
    cached = model.generate(ids[:, :6], attention_mask=mask, max_new_tokens=8, eos_token_id=None)
    full = model.generate(ids[:, :6], attention_mask=mask, max_new_tokens=8, eos_token_id=None, use_cache=False)
    assert torch.equal(cached, full)


def test_position_logits_are_refused_for_an_augmenting_model_with_a_tokenizer_of_its_own():
    anchor = tiny_model("llama", hidden=48, layers=3, heads=6, seed=1)
    augment = tiny_model("gpt2", hidden=32, layers=4, heads=4, seed=2)
    with pytest.raises(ValueError, match="tokenizer of their own, so their positions are not the anchor's"):
        calm_dist.compose(anchor, augment, connections=CONNECTIONS, shared_tokenizer=False, position_buckets=4)
    with pytest.raises(ValueError, match="position_buckets must be an integer >= 0"):
        calm_dist.compose(anchor, augment, connections=CONNECTIONS, position_buckets=-1)


def test_an_export_with_position_logits_loads_with_them(tmp_path):
    tokenizer = bpe_tokenizer()
    anchor_dir, (augment_dir,) = save_base_models(tmp_path, "llama", ["gpt2"], tokenizer)
    load = transformers_model
    calm = calm_dist.compose(load(anchor_dir), load(augment_dir), connections=CONNECTIONS, position_buckets=5)
    randomise_bridges(calm)
    for bridge in calm.bridges:
        torch.nn.init.normal_(bridge.position_bias, std=2.0)
    target = calm_dist.save_composition(tmp_path / "export", calm.composition_state_dict(), anchor_dir, [augment_dir],
                                        calm.augment_connections, position_buckets=calm.position_buckets)
    loaded = calm_dist.CALMForCausalLM.from_pretrained(target)
    assert loaded.config.position_buckets == 5
    ids = random_ids(2, 7)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, calm(ids).logits, atol=1e-5, rtol=1e-5)


def transformers_model(path):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(path).eval()
