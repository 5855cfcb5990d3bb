"""The single-device composed model with several augmenting models at once (same tokenizer as the anchor)."""
import pytest
import torch

import calm_dist
from calm_dist.model import CALMModel, model_shape
from calm_dist.model.masks import position_ids_from_mask
from tests.tiny_models import random_ids, randomise_bridges, tiny_model, train_and_check_only_bridges_change

pytestmark = pytest.mark.timeout(120)

FIRST = [(0, -1), (1, 0), (3, 2)]  # the first augmenting model's connections (4 layers)
SECOND = [(0, 0), (2, 2)]  # the second's (3 layers): both feed anchor layers the first also feeds
# (anchor arch, first augment arch, second augment arch)
TRIOS = [("llama", "gpt2", "llama"), ("gpt_neox", "qwen2", "gpt2")]


def anchor_model(arch):
    return tiny_model(arch, hidden=48, layers=3, heads=6, seed=1)


def first_augment(arch):
    return tiny_model(arch, hidden=32, layers=4, heads=4, seed=2)


def second_augment(arch):
    return tiny_model(arch, hidden=40, layers=3, heads=4, seed=5)


def two_augment_model(anchor_arch, first_arch, second_arch, **kwargs):
    kwargs = kwargs or {"connections": [FIRST, SECOND]}
    return calm_dist.compose(anchor_model(anchor_arch), [first_augment(first_arch), second_augment(second_arch)],
                             **kwargs)


def perturb(bridge, seed, std=0.3, include_output=True):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in bridge.named_parameters():
            if include_output or not name.startswith("o_proj"):
                parameter.normal_(0, std, generator=generator)


def trained_single_and_silent_pair(anchor_arch, first_arch, second_arch):
    """The single-augment model with perturbed bridges, and the two-augment model with the same
    first bridges plus second-model bridges that compute (non-zero q/k/v/proj) but output zero."""
    single = calm_dist.compose(anchor_model(anchor_arch), first_augment(first_arch), connections=FIRST)
    for index, bridge in enumerate(single.bridges):
        perturb(bridge, seed=10 + index)
    pair = two_augment_model(anchor_arch, first_arch, second_arch)
    for index in range(len(FIRST)):
        pair.bridges[index].load_state_dict(single.bridges[index].state_dict())
    for index in range(len(FIRST), len(pair.bridges)):
        perturb(pair.bridges[index], seed=20 + index, include_output=False)
        assert torch.count_nonzero(pair.bridges[index].q_proj.weight) > 0
        assert torch.count_nonzero(pair.bridges[index].o_proj.weight) == 0
    return single, pair


@pytest.mark.parametrize("anchor_arch,first_arch,second_arch", TRIOS)
def test_silent_second_model_leaves_the_single_composition_unchanged(anchor_arch, first_arch, second_arch):
    single, pair = trained_single_and_silent_pair(anchor_arch, first_arch, second_arch)
    ids, mask = random_ids(3, 9), torch.ones(3, 9, dtype=torch.long)
    mask[1, :3] = 0
    with torch.no_grad():
        expected = single(ids, attention_mask=mask).logits
        composed = pair(ids, attention_mask=mask).logits
        anchor_alone = anchor_model(anchor_arch)(input_ids=ids, attention_mask=mask).logits
    assert (expected - anchor_alone).abs().max() > 1e-3  # the first model's bridges do act
    assert (composed - expected).abs().max().item() <= 1e-6


@pytest.mark.parametrize("anchor_arch,first_arch,second_arch", TRIOS)
def test_second_model_changes_the_output_once_its_bridges_output(anchor_arch, first_arch, second_arch):
    single, pair = trained_single_and_silent_pair(anchor_arch, first_arch, second_arch)
    for index in range(len(FIRST), len(pair.bridges)):
        perturb(pair.bridges[index], seed=30 + index)
    ids = random_ids(2, 7)
    with torch.no_grad():
        assert (pair(ids).logits - single(ids).logits).abs().max() > 1e-3


@pytest.mark.parametrize("anchor_arch,first_arch,second_arch", TRIOS)
def test_no_leak_from_future_tokens_with_two_augments(anchor_arch, first_arch, second_arch):
    model = two_augment_model(anchor_arch, first_arch, second_arch)
    randomise_bridges(model)
    ids = random_ids(2, 10)
    changed = ids.clone()
    t = 4
    changed[:, t + 1:] = random_ids(2, 10, seed=7)[:, t + 1:]
    with torch.no_grad():
        before, after = model(ids).logits, model(changed).logits
    assert (before[:, : t + 1] - after[:, : t + 1]).abs().max().item() == 0.0
    assert (before[:, t + 1:] - after[:, t + 1:]).abs().max().item() > 0


@pytest.mark.parametrize("anchor_arch,first_arch,second_arch", TRIOS)
def test_cached_generation_equals_full_recomputation_with_two_augments(anchor_arch, first_arch, second_arch):
    model = two_augment_model(anchor_arch, first_arch, second_arch)
    randomise_bridges(model)
    ids = random_ids(3, 6)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    cached = model.generate(ids, attention_mask=mask, max_new_tokens=10, eos_token_id=None)
    full = model.generate(ids, attention_mask=mask, max_new_tokens=10, eos_token_id=None, use_cache=False)
    assert cached.shape == (3, 16)
    assert torch.equal(cached, full)
    assert len(model.new_caches().augments) == 2


def test_only_bridge_parameters_get_gradients_with_two_augments():
    model = two_augment_model("llama", "gpt2", "qwen2")
    randomise_bridges(model)
    assert any(name.startswith("augments.1.") for name, _ in model.named_parameters())
    train_and_check_only_bridges_change(model, steps=2)


def test_bridges_follow_model_order_and_each_models_width():
    model = two_augment_model("llama", "gpt2", "llama")
    assert model.connections == FIRST + SECOND
    assert model.augment_connections == [FIRST, SECOND]
    assert model.bridge_sources == [0, 0, 0, 1, 1]
    assert model.tapped_layers_of(0) == [0, 1, 3] and model.tapped_layers_of(1) == [0, 2]
    assert [bridge.proj.in_features for bridge in model.bridges] == [32, 32, 32, 40, 40]
    assert model.augment is model.augments[0]
    with pytest.raises(ValueError, match="tapped_layers_of"):
        model.tapped_layers


def test_composition_state_dict_is_flat_and_round_trips():
    model = two_augment_model("llama", "gpt2", "llama")
    randomise_bridges(model)
    state = {key: value.clone() for key, value in model.composition_state_dict().items()}
    assert {key.split(".")[1] for key in state} == {"0", "1", "2", "3", "4"}
    other = two_augment_model("llama", "gpt2", "llama")
    other.load_composition_state_dict(state)
    ids = random_ids(2, 6)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, other(ids).logits)


def test_augment_hidden_states_are_each_models_hf_hidden_states_in_bridge_order():
    model = two_augment_model("llama", "gpt2", "llama")
    ids, mask = random_ids(2, 7), torch.ones(2, 7, dtype=torch.long)
    with torch.no_grad():
        taps = model.augment_hidden_states(ids, mask, torch.arange(7)[None].expand(2, -1))
        first = first_augment("gpt2").base_model(input_ids=ids, output_hidden_states=True).hidden_states
        second = second_augment("llama").base_model(input_ids=ids, output_hidden_states=True).hidden_states
    expected = [first[layer + 1] for layer, _ in FIRST] + [second[layer + 1] for layer, _ in SECOND]
    assert len(taps) == len(expected) == len(model.bridges)
    for tap, reference in zip(taps, expected):
        assert torch.allclose(tap, reference, atol=1e-6)


def test_states_computed_elsewhere_reproduce_the_full_model():
    """The distributed contract: a model without augmenting models, fed one state per bridge."""
    model = two_augment_model("llama", "gpt2", "llama")
    randomise_bridges(model)
    shapes = [model_shape(first_augment("gpt2")), model_shape(second_augment("llama"))]
    headless = CALMModel(anchor_model("llama"), None, [FIRST, SECOND], shapes)
    headless.load_composition_state_dict(model.composition_state_dict())
    ids, mask = random_ids(2, 8), torch.ones(2, 8, dtype=torch.long)
    mask[0, :2] = 0
    with torch.no_grad():
        states = model.augment_hidden_states(ids, mask, position_ids_from_mask(mask))
        assert torch.equal(headless(ids, mask, augment_states=states).logits, model(ids, mask).logits)
        with pytest.raises(ValueError, match="expected 5 augment states"):
            headless(ids, mask, augment_states=states[:3])
        with pytest.raises(ValueError, match="no augmenting models"):
            headless(ids, mask)


def test_every_n_applies_to_each_model():
    anchor = tiny_model("llama", 48, 8, 6, seed=1)
    model = calm_dist.compose(anchor, [tiny_model("llama", 32, 8, 4, seed=2), tiny_model("gpt2", 32, 4, 4, seed=3)],
                              every_n=4)
    assert model.augment_connections == [[(3, 3), (7, 7)], [(3, 7)]]
    assert model.connections == [(3, 3), (7, 7), (3, 7)]


def _first_and_second():
    return [first_augment("llama"), second_augment("llama")]


def _shapes():
    return [model_shape(first_augment("llama")), model_shape(second_augment("llama"))]


INVALID = {
    "too few connection lists": (lambda: calm_dist.compose(anchor_model("llama"), _first_and_second(),
                                                           connections=[FIRST]), "one list of"),
    "flat pairs for two models": (lambda: calm_dist.compose(anchor_model("llama"), _first_and_second(),
                                                            connections=FIRST[:2]), "one list of"),
    "every_n and connections": (lambda: calm_dist.compose(anchor_model("llama"), _first_and_second(), every_n=2,
                                                          connections=[FIRST, SECOND]), "either every_n"),
    "layer out of range": (lambda: calm_dist.compose(anchor_model("llama"), _first_and_second(),
                                                     connections=[FIRST, [(3, 0)]]),
                           "augmenting model 1: .*out of range"),
    "empty list of models": (lambda: calm_dist.compose(anchor_model("llama"), []), "at least one"),
    "flags per model": (lambda: calm_dist.compose(anchor_model("llama"), _first_and_second(),
                                                  shared_tokenizer=[True]), "one flag per"),
    "some models missing": (lambda: CALMModel(anchor_model("llama"), [first_augment("llama"), None],
                                              [FIRST, SECOND], _shapes()), "every augmenting model or none"),
    "counts differ": (lambda: CALMModel(anchor_model("llama"), [first_augment("llama")], [FIRST, SECOND],
                                        _shapes()), "1 models, 2 connection lists, 2 shapes"),
    "one shape for a list": (lambda: CALMModel(anchor_model("llama"), _first_and_second(), [FIRST, SECOND],
                                               _shapes()[0]), "one shape per model"),
    "model without connections": (lambda: CALMModel(anchor_model("llama"), _first_and_second(), [FIRST, []],
                                                    _shapes()), r"models \[1\] have no connections"),
}


@pytest.mark.parametrize("case", sorted(INVALID))
def test_invalid_arguments_raise_clear_errors(case):
    build, message = INVALID[case]
    with pytest.raises(ValueError, match=message):
        build()
