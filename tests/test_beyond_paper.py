"""The augmenting-model variants of the KV recipe's extra rows: half-key m_As and a character-level m_A."""
from __future__ import annotations

import torch

from calm_dist.config import load_config
import data_pipeline as dp
from calm_dist.model.alignment import aligned_allowed
from data_pipeline.formats import RowFormat
from data_pipeline.tokenize import Retokenisation, TokenizeSettings, encode_rows
from recipes.kv_arithmetic.augment_variants import key_halves
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
    """The different-tokenizer row's data, as the generic job tokenises it: each row once with the anchor's
    word tokenizer and once with the character tokenizer, each token with its end offset in the row's text."""
    words = build_tokenizer({"qz": 1, "abc": 2}, value_max=5, max_operands=3)
    chars = character_tokenizer()
    out = encode_rows({"prompt": ["qz + abc ="], "completion": [" 3"]}, RowFormat.PROMPT_COMPLETION, words,
                      TokenizeSettings(16), others=[Retokenisation("aug0", chars, 16)])
    assert out["status"] == ["kept"]
    anchor_ends, char_ids = out["end_offsets"][0], out["aug0_input_ids"][0]
    assert anchor_ends == [0, 2, 4, 8, 10, 12, 12]  # BOS, qz, +, abc, =, 3, EOS
    assert chars.convert_ids_to_tokens(char_ids) == [chars.bos_token, *"qz+abc=3"]  # no EOS: nothing reads past
    anchor = torch.tensor([anchor_ends])
    allowed = aligned_allowed(anchor, torch.tensor([out["aug0_end_offsets"][0]]), torch.ones(1, len(char_ids)), 0,
                              len(anchor_ends))
    readable = allowed[0, 0].sum(-1).tolist()
    # BOS reads the character model's BOS; "qz" also its two characters; "+" one more; "abc" three more; ...
    assert readable == [1, 3, 4, 7, 8, 9, 9]
    layout = dp.anchor_layout(("aug0",), {"aug0": chars.pad_token_id})
    assert {"end_offsets", "aug0_input_ids", "aug0_end_offsets"} <= set(layout.columns)
