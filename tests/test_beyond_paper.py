"""The augmenting-model variants of the KV recipe's extra rows: half-key m_As and a character-level m_A."""
from __future__ import annotations

import torch

from calm_dist.config import load_config
from calm_dist.model.alignment import aligned_allowed
from recipes.kv_arithmetic.augment_variants import key_halves
from recipes.kv_arithmetic.cross_tokenizer import aligned_inputs
from recipes.kv_arithmetic.settings import recipe_settings
from recipes.kv_arithmetic.task_data import character_max_length
from recipes.kv_arithmetic.tokenizer import build_tokenizer, character_tokenizer


def test_key_halves_split_every_key_once():
    settings = recipe_settings(load_config("configs/tiny.yaml"))
    first, second = key_halves(settings, seed=0)
    assert not set(first) & set(second)
    assert len(first) + len(second) == settings.data.num_keys
    assert abs(len(first) - len(second)) <= 1
    assert key_halves(settings, seed=0) == [first, second] != key_halves(settings, seed=1)


def test_character_tokenizer_reads_every_task_text_without_unknowns():
    tokenizer = character_tokenizer()
    encoded = tokenizer("qz + abc - kkd = -12", return_offsets_mapping=True)
    ids = encoded["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
    assert tokenizer.unk_token_id not in ids and tokenizer.eos_token_id not in ids
    assert tokenizer.convert_ids_to_tokens(ids[1:]) == list("qz+abc-kkd=-12")
    assert encoded["offset_mapping"][1:4] == [(0, 1), (1, 2), (3, 4)]  # offsets into the text with its spaces


def test_character_rows_fit_their_model():
    settings = recipe_settings(load_config("configs/kv_arithmetic.yaml")).data
    longest = "abcd + abcd - abcd = 5 + 5 - 5"  # three 4-letter keys and their substitution
    assert len(character_tokenizer()(longest)["input_ids"]) + 1 == character_max_length(settings)  # + EOS


def test_anchor_words_read_only_characters_that_end_with_them():
    words = build_tokenizer({"qz": 1, "abc": 2}, value_max=5, max_operands=3)
    chars = character_tokenizer()
    row = words("qz + abc = 3")["input_ids"] + [words.eos_token_id]
    ids = torch.tensor([row + [words.pad_token_id]])
    mask = torch.tensor([[1] * len(row) + [0]])
    kwargs = aligned_inputs(words, chars, ids, mask)
    augment = kwargs["augment_inputs"][0]
    assert kwargs["anchor_end_offsets"].tolist() == [[0, 2, 4, 8, 10, 12, 12, 0]]
    allowed = aligned_allowed(kwargs["anchor_end_offsets"], augment.end_offsets, augment.attention_mask, 0, len(row))
    readable = allowed[0, 0].sum(-1).tolist()
    # BOS reads the character model's BOS; "qz" also its two characters; "+" one more; "abc" three more; ...
    assert readable == [1, 3, 4, 7, 8, 9, 9]
