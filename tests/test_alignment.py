"""Augmenting models with their own tokenizers: the offset-aligned cross-attention mask."""
import random

import pytest
import torch

import calm_dist
from calm_dist.model import AugmentInput, aligned_allowed, generate_text, token_end_offsets
from calm_dist.model.alignment import decode_with_end_offsets
from calm_dist.model.masks import cross_attention_allowed
from tests.tiny_models import ALPHABET, BOS, EOS, PAD, chunk_tokenizer, randomise_bridges, tiny_model

pytestmark = pytest.mark.timeout(120)

ANCHOR_TOKENIZER = chunk_tokenizer(2, bos=True)
TOKENIZERS = {"chunks of 3": chunk_tokenizer(3, bos=False), "characters": chunk_tokenizer(1, bos=True)}
CONNECTIONS = {"chunks of 3": [(0, -1), (1, 0), (3, 2)], "characters": [(0, 1), (2, 2)], "anchor's": [(1, 0), (2, 2)]}
# Each setup: the augmenting models' tokenizers (None = the anchor's, reading the anchor's ids).
SETUPS = {"two own tokenizers": ["chunks of 3", "characters"], "shared and own": [None, "chunks of 3"]}


def composed(augment_names):
    anchor = tiny_model("llama", hidden=48, layers=3, heads=6, seed=1, vocab=len(ANCHOR_TOKENIZER))
    with torch.no_grad():  # logit 0 for PAD, BOS, EOS: greedy decoding writes text
        anchor.lm_head.weight[[PAD, BOS, EOS]] = 0
    augments, connections = [], []
    for index, name in enumerate(augment_names):
        vocab = len(ANCHOR_TOKENIZER) if name is None else len(TOKENIZERS[name])
        augments.append(tiny_model(["gpt2", "qwen2"][index], hidden=32, layers=4, heads=4, seed=2 + index,
                                   vocab=vocab))
        connections.append(CONNECTIONS[name or "anchor's"])
    model = calm_dist.compose(anchor, augments, connections=connections,
                              shared_tokenizer=[name is None for name in augment_names])
    randomise_bridges(model)
    return model


def aligned_logits(model, augment_names, texts):
    anchor = token_end_offsets(ANCHOR_TOKENIZER, texts)
    augment_inputs = [None if name is None else token_end_offsets(TOKENIZERS[name], texts) for name in augment_names]
    with torch.no_grad():
        logits = model(anchor.input_ids, anchor.attention_mask, augment_inputs=augment_inputs,
                       anchor_end_offsets=anchor.end_offsets).logits
    return logits, anchor


def random_text(length, seed):
    rng = random.Random(seed)
    return "".join(rng.choice(ALPHABET) for _ in range(length))


def test_end_offsets_follow_each_tokenizer():
    encoded = token_end_offsets(TOKENIZERS["chunks of 3"], ["ab ba", "b"])
    assert encoded.input_ids.tolist() == [TOKENIZERS["chunks of 3"].convert_tokens_to_ids(["ab ", "ba"]),
                                          [TOKENIZERS["chunks of 3"].convert_tokens_to_ids("b"), 0]]
    assert encoded.end_offsets.tolist() == [[3, 5], [1, 0]]
    assert encoded.attention_mask.tolist() == [[1, 1], [1, 0]]
    assert token_end_offsets(ANCHOR_TOKENIZER, ["ab ba"]).end_offsets.tolist() == [[0, 2, 4, 5]]
    ids = token_end_offsets(ANCHOR_TOKENIZER, ["ab ba"]).input_ids[0].tolist()
    assert decode_with_end_offsets(ANCHOR_TOKENIZER, ids) == ("ab ba", [0, 2, 4, 5])


@pytest.mark.parametrize("setup", sorted(SETUPS))
def test_no_leak_from_text_after_an_anchor_token_across_tokenizers(setup):
    names = SETUPS[setup]
    model = composed(names)
    texts = [random_text(13, seed=1), random_text(13, seed=2)]
    before, anchor = aligned_logits(model, names, texts)
    three_chunk_ends = set(token_end_offsets(TOKENIZERS["chunks of 3"], texts).end_offsets[0].tolist())
    assert three_chunk_ends - set(anchor.end_offsets[0].tolist())  # some augment tokens straddle anchor boundaries
    for t in range(anchor.input_ids.shape[1] - 1):
        end = int(anchor.end_offsets[0, t])
        flipped = [text[:end] + "".join({"a": "b", "b": " ", " ": "a"}[c] for c in text[end:]) for text in texts]
        after, changed_anchor = aligned_logits(model, names, flipped)
        assert torch.equal(changed_anchor.input_ids[:, : t + 1], anchor.input_ids[:, : t + 1])
        assert (before[:, : t + 1] - after[:, : t + 1]).abs().max().item() == 0.0, f"anchor token {t} saw the future"
        assert (before[:, t + 1:] - after[:, t + 1:]).abs().max().item() > 0  # the test can see a change


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("query_start", [0, 3])
def test_one_tokenizer_gives_the_index_mask(padding_side, query_start):
    tokenizer = chunk_tokenizer(2, bos=True)
    tokenizer.padding_side = padding_side
    encoded = token_end_offsets(tokenizer, [random_text(11, seed=3), random_text(4, seed=4), random_text(7, seed=5)])
    query_len = encoded.input_ids.shape[1] - query_start
    aligned = aligned_allowed(encoded.end_offsets, encoded.end_offsets, encoded.attention_mask, query_start, query_len)
    index = cross_attention_allowed(encoded.attention_mask, query_start, query_len)
    real_queries = encoded.attention_mask[:, query_start:].bool()  # what padded anchor positions read is unused
    assert torch.equal(aligned[:, 0][real_queries], index[:, 0][real_queries])


def test_one_tokenizer_aligned_forward_equals_the_plain_forward():
    model = composed([None])
    texts = [random_text(12, seed=6), random_text(5, seed=7)]
    own = token_end_offsets(ANCHOR_TOKENIZER, texts)
    with torch.no_grad():
        plain = model(own.input_ids, own.attention_mask).logits
        aligned = model(own.input_ids, own.attention_mask, augment_inputs=[own], anchor_end_offsets=own.end_offsets)
    assert torch.equal(aligned.logits, plain)


def test_a_zero_width_token_after_text_reaches_as_far_as_that_text():
    anchor_end = torch.tensor([[2, 4, 6]])
    augment_end = torch.tensor([[3, 6, 0]])  # the last: a special token appended after the text
    allowed = aligned_allowed(anchor_end, augment_end, torch.ones_like(augment_end), 0, 3)
    assert allowed[0, 0].tolist() == [[False, False, False], [True, False, False], [True, True, True]]


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_augment_padding_is_never_read(padding_side):
    names = SETUPS["two own tokenizers"]
    model = composed(names)
    texts = [random_text(12, seed=8), random_text(4, seed=9)]
    anchor = token_end_offsets(ANCHOR_TOKENIZER, texts)
    inputs = []
    for name in names:
        TOKENIZERS[name].padding_side = padding_side
        inputs.append(token_end_offsets(TOKENIZERS[name], texts))
        TOKENIZERS[name].padding_side = "right"
    assert all(bool((own.attention_mask == 0).any()) for own in inputs)
    garbled = [AugmentInput(own.input_ids.masked_fill(own.attention_mask == 0, 5), own.attention_mask,
                            own.end_offsets) for own in inputs]
    with torch.no_grad():
        clean = model(anchor.input_ids, anchor.attention_mask, augment_inputs=inputs,
                      anchor_end_offsets=anchor.end_offsets).logits
        dirty = model(anchor.input_ids, anchor.attention_mask, augment_inputs=garbled,
                      anchor_end_offsets=anchor.end_offsets).logits
        alone, _ = aligned_logits(model, names, texts[1:])
    real = anchor.attention_mask.bool()
    assert (clean[real] - dirty[real]).abs().max().item() == 0.0
    torch.testing.assert_close(clean[1, real[1]], alone[0], atol=1e-5, rtol=1e-5)


def stepwise_reference(model, names, prompt, steps):
    """Greedy continuation of one prompt, every step one full forward on hand-built tokenisations."""
    tokens = ANCHOR_TOKENIZER.convert_ids_to_tokens(ANCHOR_TOKENIZER(prompt)["input_ids"])
    generated = []
    for _ in range(steps):
        pieces = ["" if token == "<s>" else token for token in tokens]
        text = "".join(pieces)
        anchor_ends = torch.tensor([[sum(len(piece) for piece in pieces[: k + 1]) for k in range(len(pieces))]])
        augment_inputs = [None if name is None else hand_tokenised(name, text) for name in names]
        ids = torch.tensor([ANCHOR_TOKENIZER.convert_tokens_to_ids(tokens)])
        with torch.no_grad():
            logits = model(ids, augment_inputs=augment_inputs, anchor_end_offsets=anchor_ends).logits
        next_id = int(logits[0, -1].argmax())
        generated.append(next_id)
        tokens.append(ANCHOR_TOKENIZER.convert_ids_to_tokens(next_id))
    return generated


def hand_tokenised(name, text):
    width = {"chunks of 3": 3, "characters": 1}[name]
    chunks = [text[start:start + width] for start in range(0, len(text), width)]
    ends = [min(start + width, len(text)) for start in range(0, len(text), width)]
    if name == "characters":  # this tokenizer starts with BOS
        chunks, ends = ["<s>"] + chunks, [0] + ends
    ids = torch.tensor([TOKENIZERS[name].convert_tokens_to_ids(chunks)])
    return AugmentInput(ids, torch.ones_like(ids), torch.tensor([ends]))


@pytest.mark.parametrize("use_cache", [True, False], ids=["cached", "recomputed"])
@pytest.mark.parametrize("setup", sorted(SETUPS))
def test_generate_text_equals_a_stepwise_full_forward_argmax(setup, use_cache):
    names = SETUPS[setup]
    model = composed(names)
    prompts = ["ab ba b", "b", "a ab"]
    tokenizers = [None if name is None else TOKENIZERS[name] for name in names]
    result = generate_text(model, ANCHOR_TOKENIZER, tokenizers, prompts, max_new_tokens=6, eos_token_id=None,
                           use_cache=use_cache)
    expected = [stepwise_reference(model, names, prompt, 6) for prompt in prompts]
    assert result.new_token_ids == expected
    assert len({tuple(ids) for ids in expected}) > 1  # the prompts steer the output
    for prompt, text, ids in zip(prompts, result.texts, result.new_token_ids):
        assert text == prompt + ANCHOR_TOKENIZER.decode(ids, skip_special_tokens=True)


def word_tokenizer():
    """Whole words of ``ALPHABET`` (runs of non-spaces, runs of spaces) as tokens: text appended to the last word
    re-cuts the last token, as a BPE merging across the new text does."""
    import itertools

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": PAD, "<s>": BOS, "</s>": EOS}
    for length in range(1, 9):
        for word in itertools.product("ab", repeat=length):
            vocab["".join(word)] = len(vocab)
        vocab[" " * length] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"\S+|\s+"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def re_cut_bases():
    """(anchor, [word-level gpt2, chunks-of-3 qwen2], the word tokenizer): base models of ``re_cut_model``."""
    words = word_tokenizer()
    anchor = tiny_model("llama", hidden=48, layers=3, heads=6, seed=1, vocab=len(ANCHOR_TOKENIZER))
    with torch.no_grad():
        anchor.lm_head.weight[[PAD, BOS, EOS]] = 0
    augments = [tiny_model("gpt2", hidden=32, layers=4, heads=4, seed=2, vocab=len(words)),
                tiny_model("qwen2", hidden=32, layers=4, heads=4, seed=3, vocab=len(TOKENIZERS["chunks of 3"]))]
    return anchor, augments, words


def re_cut_model():
    """Two augmenting models with their own tokenizers that re-cut their last token as text is appended."""
    anchor, augments, words = re_cut_bases()
    model = calm_dist.compose(anchor, augments, connections=[[(0, -1), (3, 2)], CONNECTIONS["chunks of 3"]],
                              shared_tokenizer=False)
    randomise_bridges(model)
    return model, [words, TOKENIZERS["chunks of 3"]]


def test_cached_generation_reruns_what_a_re_cut_changes_and_equals_a_full_forward_every_step():
    from calm_dist.model.generation import AlignedCaches

    model, tokenizers = re_cut_model()
    row = ANCHOR_TOKENIZER("a ab  b")["input_ids"]
    caches = AlignedCaches(model, ANCHOR_TOKENIZER, tokenizers)
    appended = [ANCHOR_TOKENIZER.convert_tokens_to_ids(t) for t in ["b", "ab", " a", "bb", "b ", "a", "ba", " "]]
    for token in appended:  # the words re-cut their last token at most steps; chunks of 3 their partial one
        logits = caches.next_logits(row)
        text, ends = decode_with_end_offsets(ANCHOR_TOKENIZER, row)  # generated rows need not be text's own cut
        with torch.no_grad():
            full = model(torch.tensor([row]), anchor_end_offsets=torch.tensor([ends]),
                         augment_inputs=[token_end_offsets(tokenizer, [text]) for tokenizer in tokenizers]).logits
        torch.testing.assert_close(logits, full[0, -1], atol=1e-5, rtol=1e-5)
        row = row + [token]
    steps = len(appended)
    words_final = len(tokenizers[0](text)["input_ids"])
    assert caches.work[0] > len(row) - 1  # some anchor positions read a re-cut word and ran again
    assert words_final < caches.work[1] < words_final + steps + 1  # only the re-cut last word ran again
    with pytest.raises(ValueError, match="with new tokens appended"):
        caches.next_logits(row[:2])
    with pytest.raises(ValueError, match="with new tokens appended"):
        caches.next_logits([row[1]] + row)


def test_a_token_that_adds_no_text_runs_no_augment_token_and_equals_a_full_forward():
    from calm_dist.model.generation import AlignedCaches

    model, tokenizers = re_cut_model()
    row = ANCHOR_TOKENIZER("a ab")["input_ids"]
    caches = AlignedCaches(model, ANCHOR_TOKENIZER, tokenizers)
    caches.next_logits(row)
    before = list(caches.work)
    for token in (EOS, PAD):  # special tokens: decoding skips them, so no augmenting tokenisation changes
        row = row + [token]
        logits = caches.next_logits(row)
        text, ends = decode_with_end_offsets(ANCHOR_TOKENIZER, row)
        with torch.no_grad():
            full = model(torch.tensor([row]), anchor_end_offsets=torch.tensor([ends]),
                         augment_inputs=[token_end_offsets(tokenizer, [text]) for tokenizer in tokenizers]).logits
        torch.testing.assert_close(logits, full[0, -1], atol=1e-5, rtol=1e-5)
    assert caches.work[1:] == before[1:] and caches.work[0] == before[0] + 2  # only the two anchor tokens ran


def test_cached_generate_text_equals_recomputed_generate_text_with_re_cuts():
    model, tokenizers = re_cut_model()
    prompts = ["ab ba b", "bab", "a ab  b"]
    cached = generate_text(model, ANCHOR_TOKENIZER, tokenizers, prompts, max_new_tokens=8, eos_token_id=None)
    full = generate_text(model, ANCHOR_TOKENIZER, tokenizers, prompts, max_new_tokens=8, eos_token_id=None,
                         use_cache=False)
    assert cached.new_token_ids == full.new_token_ids and cached.texts == full.texts
    assert len({tuple(ids) for ids in full.new_token_ids}) > 1
    assert all(cached_work < 0.5 * full_work for cached_work, full_work in zip(cached.work, full.work))


def test_generate_text_stops_a_row_at_eos():
    names = SETUPS["two own tokenizers"]
    model = composed(names)
    tokenizers = [TOKENIZERS[name] for name in names]
    free = generate_text(model, ANCHOR_TOKENIZER, tokenizers, ["ab ba b", "b"], 5, eos_token_id=None).new_token_ids
    eos = free[0][1]
    stopped = generate_text(model, ANCHOR_TOKENIZER, tokenizers, ["ab ba b", "b"], 5, eos_token_id=eos).new_token_ids
    for row_free, row_stopped in zip(free, stopped):
        assert row_stopped == (row_free[: row_free.index(eos) + 1] if eos in row_free else row_free)
    assert len(stopped[0]) < 5


def test_misused_alignment_inputs_raise_clear_errors():
    names = SETUPS["two own tokenizers"]
    model = composed(names)
    anchor = token_end_offsets(ANCHOR_TOKENIZER, ["ab b"])
    own = [token_end_offsets(TOKENIZERS[name], ["ab b"]) for name in names]
    with pytest.raises(ValueError, match="need anchor_end_offsets"):
        model(anchor.input_ids, anchor.attention_mask, augment_inputs=own)
    with pytest.raises(ValueError, match="expected 2 entries"):
        model(anchor.input_ids, anchor.attention_mask, augment_inputs=own[:1], anchor_end_offsets=anchor.end_offsets)
    caches = model.new_caches()  # fresh caches: a cached step over everything is the full forward
    with torch.no_grad():
        stepped = model.step(anchor.input_ids, anchor.attention_mask, caches=caches, augment_inputs=own,
                             anchor_end_offsets=anchor.end_offsets).logits
        full = model(anchor.input_ids, anchor.attention_mask, augment_inputs=own,
                     anchor_end_offsets=anchor.end_offsets).logits
    torch.testing.assert_close(stepped, full)
    caches.bridges[0].crop(-1)  # model 0's cache and its bridges' memories no longer agree
    with pytest.raises(ValueError, match=r"augment_inputs\[0\] with caches: .*crop them to one prefix"):
        model.step(anchor.input_ids[:, -1:], anchor.attention_mask, caches=caches, augment_inputs=own,
                   anchor_end_offsets=anchor.end_offsets)
    with pytest.raises(ValueError, match="one \\[batch, length\\] shape"):
        AugmentInput(own[0].input_ids, own[0].attention_mask[:, :1], own[0].end_offsets)
    with pytest.raises(ValueError, match=r"augmenting models \[0, 1\] have their own tokenizer"):
        model(anchor.input_ids, anchor.attention_mask)
    with pytest.raises(ValueError, match="expected 2 entries"):
        generate_text(model, ANCHOR_TOKENIZER, [None], ["ab"], 2)
