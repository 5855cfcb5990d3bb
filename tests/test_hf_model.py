"""CALMForCausalLM: the composed model behind transformers' causal-LM interface (generate, cache, options)."""
import pytest
import torch
from transformers import DynamicCache, GenerationConfig
from transformers.generation.streamers import BaseStreamer

import calm_dist
from calm_dist import CALMForCausalLM
from calm_dist.model.cache import CALMCache
from tests.tiny_models import PAD, random_ids, randomise_bridges, tiny_model, tiny_pair

pytestmark = pytest.mark.timeout(180)

# (anchor, augment): different hidden sizes, depths, head counts; GQA in qwen2; learned positions in gpt2
ARCH_PAIRS = [("llama", "gpt2"), ("gpt_neox", "qwen2")]


def hf_model(calm) -> CALMForCausalLM:
    model = CALMForCausalLM.from_composed(calm)
    model.generation_config.eos_token_id = None  # random tiny models: every call generates its full length
    return model


def trained(anchor_arch="llama", augment_arch="gpt2", **compose_kwargs) -> CALMForCausalLM:
    calm = tiny_pair(anchor_arch, augment_arch, **compose_kwargs)
    randomise_bridges(calm)
    return hf_model(calm)


def left_padded(batch=3, length=7, seed=0):
    ids = random_ids(batch, length, seed=seed)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    mask[1, :1] = 0
    return ids.masked_fill(mask == 0, PAD), mask


@pytest.mark.parametrize("anchor_arch,augment_arch", ARCH_PAIRS)
@pytest.mark.parametrize("sampling", [False, True], ids=["greedy", "sampling"])
def test_generation_with_the_cache_equals_full_recomputation(anchor_arch, augment_arch, sampling):
    model = trained(anchor_arch, augment_arch)
    ids, mask = left_padded()
    options = dict(max_new_tokens=10, do_sample=sampling, temperature=0.7, top_p=0.9) if sampling else \
        dict(max_new_tokens=10, do_sample=False)
    torch.manual_seed(0)
    cached = model.generate(input_ids=ids, attention_mask=mask, **options)
    torch.manual_seed(0)
    full = model.generate(input_ids=ids, attention_mask=mask, use_cache=False, **options)
    assert cached.shape == (3, 17)
    assert torch.equal(cached, full)
    if not sampling:  # the composed model's own greedy decoding agrees, and so does a batch without padding
        assert torch.equal(cached, model.calm.generate(ids, attention_mask=mask, max_new_tokens=10, eos_token_id=None))
        unpadded = random_ids(3, 7, seed=1)  # generate passes no attention mask: no model builds a padding mask
        assert torch.equal(model.generate(input_ids=unpadded, **options),
                           model.calm.generate(unpadded, max_new_tokens=10, eos_token_id=None))


@pytest.mark.parametrize("anchor_arch,augment_arch", ARCH_PAIRS)
def test_composed_model_generates_as_the_anchor_at_init(anchor_arch, augment_arch):
    model = hf_model(tiny_pair(anchor_arch, augment_arch))  # zero-initialised output projections
    anchor = tiny_model(anchor_arch, hidden=48, layers=3, heads=6, seed=1)
    anchor.generation_config.eos_token_id = None
    ids, mask = left_padded()
    with torch.no_grad():
        composed_logits = model(input_ids=ids, attention_mask=mask).logits
        anchor_logits = anchor(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    assert (composed_logits[real] - anchor_logits[real]).abs().max().item() <= 1e-5
    options = dict(max_new_tokens=8, do_sample=False, pad_token_id=PAD)
    assert torch.equal(model.generate(input_ids=ids, attention_mask=mask, **options),
                       anchor.generate(input_ids=ids, attention_mask=mask, **options))


def _record_lengths(model: CALMForCausalLM) -> dict[str, list[int]]:
    """Positions each forward feeds the anchor, the augmenting model and each bridge (new augment states)."""
    seen = {"anchor": [], "augment": [], **{f"bridge {i}": [] for i in range(len(model.calm.bridges))}}

    def hook(name):
        return lambda module, args: seen[name].append(args[0].shape[1])

    model.calm.anchor.get_input_embeddings().register_forward_pre_hook(hook("anchor"))
    model.calm.augment.get_input_embeddings().register_forward_pre_hook(hook("augment"))
    for index, bridge in enumerate(model.calm.bridges):
        bridge.register_forward_pre_hook(
            lambda module, args, name=f"bridge {index}": seen[name].append(args[1].augment_hidden.shape[1]))
    return seen


@pytest.mark.parametrize("use_cache", [True, False])
def test_each_generation_step_feeds_only_the_new_token(use_cache):
    model = trained()
    seen = _record_lengths(model)
    ids, mask = left_padded(length=7)
    model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, use_cache=use_cache)
    expected = [7, 1, 1, 1, 1, 1] if use_cache else [7, 8, 9, 10, 11, 12]  # without it the prefix is recomputed
    assert seen == {name: expected for name in seen}


def test_forward_returns_a_cache_that_continues_the_sequence():
    model = trained("qwen2", "llama")
    ids, mask = left_padded(length=8)
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        first = model(input_ids=ids[:, :5], attention_mask=mask[:, :5], use_cache=True)
        assert isinstance(first.cache, CALMCache) and first.cache.get_seq_length() == 5
        rest = model(input_ids=ids[:, 5:], attention_mask=mask, cache=first.cache).logits
    torch.testing.assert_close(rest, full[:, 5:], atol=1e-5, rtol=1e-5)


def test_two_augmenting_models_generate_with_their_caches():
    anchor = tiny_model("llama", hidden=48, layers=3, heads=6, seed=1)
    augments = [tiny_model("gpt2", hidden=32, layers=4, heads=4, seed=2), tiny_model("llama", 40, 3, 4, seed=5)]
    calm = calm_dist.compose(anchor, augments, connections=[[(0, -1), (1, 0), (3, 2)], [(0, 0), (2, 2)]])
    randomise_bridges(calm)
    model = hf_model(calm)
    seen = _record_lengths(model)
    ids, mask = left_padded()
    cached = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    assert seen["bridge 4"] == [7] + [1] * 7  # a bridge of the second model
    full = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, use_cache=False)
    assert torch.equal(cached, full)


def test_eos_stops_a_row_and_pads_it():
    model = trained()
    ids = random_ids(4, 5)
    free = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False)[:, 5:]
    eos = int(free[0, 1])  # pretend row 0's second token is EOS
    out = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False, eos_token_id=eos, pad_token_id=PAD)[:, 5:]
    first = (free[0] == eos).nonzero()[0].item()
    assert torch.equal(out[0, : first + 1], free[0, : first + 1])
    assert (out[0, first + 1:] == PAD).all()


def test_a_generation_config_and_a_streamer_are_honoured():
    class Collect(BaseStreamer):
        def __init__(self):
            self.chunks = []

        def put(self, value):
            self.chunks.append(value.reshape(-1).tolist())

        def end(self):
            self.chunks.append("end")

    model = trained()
    ids = random_ids(1, 5)
    streamer = Collect()
    config = GenerationConfig(max_new_tokens=4, do_sample=True, temperature=0.7, top_k=5, pad_token_id=PAD)
    torch.manual_seed(1)
    out = model.generate(input_ids=ids, generation_config=config, streamer=streamer)
    torch.manual_seed(1)
    same = model.generate(input_ids=ids, max_new_tokens=4, do_sample=True, temperature=0.7, top_k=5, pad_token_id=PAD)
    assert out.shape == (1, 9) and torch.equal(out, same)
    assert streamer.chunks == [ids[0].tolist()] + [[token] for token in out[0, 5:].tolist()] + ["end"]


def test_beam_search_and_assisted_decoding_use_the_cache_correctly():
    model = trained()
    ids, mask = left_padded()
    beams = dict(max_new_tokens=6, num_beams=3, do_sample=False, pad_token_id=PAD)
    assert torch.equal(model.generate(input_ids=ids, attention_mask=mask, **beams),
                       model.generate(input_ids=ids, attention_mask=mask, use_cache=False, **beams))
    samples = dict(max_new_tokens=5, do_sample=True, num_return_sequences=2)  # the batch grows before the cache
    torch.manual_seed(2)
    several = model.generate(input_ids=ids, attention_mask=mask, **samples)
    torch.manual_seed(2)
    assert several.shape == (6, 12) and torch.equal(several, model.generate(input_ids=ids, attention_mask=mask,
                                                                            use_cache=False, **samples))
    one = random_ids(1, 6, seed=4).repeat(1, 2)  # repeated n-grams give the lookup candidates to verify
    greedy = model.generate(input_ids=one, max_new_tokens=10, do_sample=False)
    assert torch.equal(model.generate(input_ids=one, max_new_tokens=10, do_sample=False, prompt_lookup_num_tokens=3),
                       greedy)
    assistant = tiny_model("llama", hidden=48, layers=3, heads=6, seed=1)  # drafts tokens the cache must take back
    assert torch.equal(model.generate(input_ids=one, max_new_tokens=10, do_sample=False, assistant_model=assistant),
                       greedy)


def test_generation_continues_from_the_cache_it_returned():
    model = trained()
    ids, mask = left_padded()
    first = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                           return_dict_in_generate=True)
    assert isinstance(first.cache, CALMCache) and first.cache.get_seq_length() == ids.shape[1] + 3
    longer_mask = torch.cat([mask, torch.ones(3, 4, dtype=torch.long)], dim=1)
    continued = model.generate(input_ids=first.sequences, attention_mask=longer_mask, cache=first.cache,
                               max_new_tokens=4, do_sample=False)
    assert torch.equal(continued, model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8,
                                                 do_sample=False))


def test_unsupported_options_are_refused_with_the_reason():
    model = trained()
    ids = random_ids(2, 5)
    with pytest.raises(ValueError, match="cache_implementation='static' is not supported"):
        model.generate(input_ids=ids, max_new_tokens=2, cache_implementation="static")
    with pytest.raises(ValueError, match="generates with a CALMCache"):
        model.generate(input_ids=ids, max_new_tokens=2, cache=DynamicCache())
    with pytest.raises(ValueError, match="inputs_embeds: the augmenting models read token ids"):
        model(input_ids=ids, inputs_embeds=torch.zeros(2, 5, 48))
    with pytest.raises(ValueError, match="position_ids: positions come from the attention mask"):
        model(input_ids=ids, position_ids=torch.arange(5)[None])
    with pytest.raises(ValueError, match="output_attentions"):
        model(input_ids=ids, output_attentions=True)
    with pytest.raises(ValueError, match=r"attention_mask must be 2D \[batch, cached \+ new tokens\] = \[2, 5\]"):
        model(input_ids=ids, attention_mask=torch.ones(2, 4, dtype=torch.long))


def test_labels_give_the_composed_models_loss():
    model = trained()
    ids, mask = left_padded()
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        expected = model.calm(ids, attention_mask=mask, labels=labels).loss
        assert torch.equal(model(input_ids=ids, attention_mask=mask, labels=labels).loss, expected)


def test_bfloat16_and_to_device():
    model = trained().to("cpu").to(torch.bfloat16)
    assert {parameter.dtype for parameter in model.parameters()} == {torch.bfloat16}
    assert model.device == torch.device("cpu") and model.dtype == torch.bfloat16
    ids, mask = left_padded()
    cached = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    assert cached.shape == (3, 12)
    assert torch.equal(cached, model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False,
                                              use_cache=False))


def test_wrapping_needs_a_composed_model_with_its_augmenting_models():
    with pytest.raises(TypeError, match="wraps a CALMModel"):
        CALMForCausalLM.from_composed(tiny_model("llama"))
    with pytest.raises(ValueError, match="does not know where its base models"):
        trained().save_pretrained("unused")
