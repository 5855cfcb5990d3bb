"""The augmenting-model variants of the extended table: half-key m_As and a character-level m_A."""
from __future__ import annotations

import torch

import data_pipeline as dp
from calm_dist.config import load_config
from calm_dist.model.alignment import aligned_allowed
from calm_dist.train.augment_variants import character_tokenizer, key_halves
from calm_dist.train.cross_tokenizer import aligned_inputs, with_bos


def _word_tokenizer(keys):
    return dp.build_tokenizer(keys, value_max=5, max_operands=3)


def test_key_halves_split_every_key_once():
    config = load_config("configs/tiny.yaml")
    first, second = key_halves(config)
    assert not set(first) & set(second)
    assert len(first) + len(second) == config.data.num_keys
    assert abs(len(first) - len(second)) <= 1


def test_character_tokenizer_reads_every_task_text_without_unknowns():
    tokenizer = character_tokenizer()
    ids = dp.encode_words(tokenizer, "qz + abc - kkd = -12")
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.convert_ids_to_tokens(ids) == list("qz+abc-kkd=-12")


def test_with_bos_prepends_bos_once():
    tokenizer = with_bos(character_tokenizer())
    assert tokenizer("ab =")["input_ids"][0] == tokenizer.bos_token_id
    assert tokenizer("ab =")["input_ids"].count(tokenizer.bos_token_id) == 1
    assert character_tokenizer()("ab =")["input_ids"][0] != tokenizer.bos_token_id  # the original is untouched


def test_anchor_words_read_only_characters_that_end_with_them():
    words = _word_tokenizer({"qz": 1, "abc": 2})
    chars = with_bos(character_tokenizer())
    row = [words.bos_token_id, *dp.encode_words(words, "qz + abc = 3"), words.eos_token_id]
    ids = torch.tensor([row + [words.pad_token_id]])
    mask = torch.tensor([[1] * len(row) + [0]])
    kwargs = aligned_inputs(words, chars, ids, mask)
    augment = kwargs["augment_inputs"][0]
    assert kwargs["anchor_end_offsets"].tolist() == [[0, 2, 4, 8, 10, 12, 12, 0]]
    allowed = aligned_allowed(kwargs["anchor_end_offsets"], augment.end_offsets, augment.attention_mask, 0, len(row))
    readable = allowed[0, 0].sum(-1).tolist()
    # BOS reads the character model's BOS; "qz" also its two characters; "+" one more; "abc" three more; ...
    assert readable == [1, 3, 4, 7, 8, 9, 9]


def test_zero_unseen_embeddings_zeroes_exactly_the_tokens_absent_from_the_training_split(tmp_path):
    from calm_dist.train.base_models import build_model
    from calm_dist.train.pretrain import zero_unseen_embeddings
    from calm_dist.train.task_data import ANCHOR_TRAIN, prepare_task_data

    config = load_config("configs/tiny.yaml", [f"run.cache_dir={tmp_path}"])
    task_data = prepare_task_data(config)
    model = build_model(config.anchor.model, task_data.vocab_size, task_data.special_ids, seed=0)
    table, _ = dp.load_split(task_data.directory, ANCHOR_TRAIN)
    seen = {token for row in table.column("input_ids").to_pylist() for token in row}
    zeroed = zero_unseen_embeddings(model, task_data, ANCHOR_TRAIN)
    rows_zero = model.get_input_embeddings().weight.abs().sum(-1) == 0
    assert zeroed == task_data.vocab_size - len(seen) >= config.data.num_keys  # every key is unseen by m_B
    assert rows_zero.nonzero().flatten().tolist() == sorted(set(range(task_data.vocab_size)) - seen)
