"""An export of a composition whose augmenting models have tokenizers of their own: the export keeps their
tokenizers, ``from_pretrained`` composes them reading their own tokens, and ``generate_text`` from the export
equals the in-memory composition's and the full aligned recomputation at every step; token-id ``generate``
is refused with a message that points to ``generate_text``; an export whose augmenting models' files say they
hold a tokenizer of its own is refused unless ``augment_tokenizers`` says which tokens each one read."""
import json
import re
import shutil

import pytest
import torch

import calm_dist
from calm_dist import CALMForCausalLM
from calm_dist.model import generate_text
from tests.test_alignment import ANCHOR_TOKENIZER, CONNECTIONS, TOKENIZERS, re_cut_bases
from tests.tiny_models import randomise_bridges

pytestmark = pytest.mark.timeout(300)
PROMPTS = ["ab ba b", "bab", "a ab  b"]


def saved_bases(root):
    """re_cut_model's base models and tokenizers, saved before composing (composing wraps the anchor's layers)."""
    anchor, augments, words = re_cut_bases()
    anchor.save_pretrained(root / "anchor")
    for index, augment in enumerate(augments):
        augment.save_pretrained(root / f"augment{index}")
    model = calm_dist.compose(anchor, augments, connections=[[(0, -1), (3, 2)], CONNECTIONS["chunks of 3"]],
                              shared_tokenizer=False)
    randomise_bridges(model)
    return model, [words, TOKENIZERS["chunks of 3"]]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("own_export")
    model, tokenizers = saved_bases(root)  # words that re-cut their last token as text grows, and chunks of 3
    target = calm_dist.save_composition(root / "export", model.composition_state_dict(), root / "anchor",
                                        [root / "augment0", root / "augment1"], model.augment_connections,
                                        tokenizer=ANCHOR_TOKENIZER, augment_tokenizers=tokenizers)
    return target, model, tokenizers


def test_the_export_keeps_each_own_tokenizer_and_names_it(exported):
    target, _, tokenizers = exported
    config = json.loads((target / "config.json").read_text())
    assert [entry["tokenizer"] for entry in config["augments"]] == ["augment0", "augment1"]
    loaded = CALMForCausalLM.from_pretrained(target)
    assert loaded.calm.own_tokenizer == [True, True]
    for saved, original in zip(loaded.augment_tokenizers(), tokenizers):
        text = "ab  bab a"
        assert saved(text, return_offsets_mapping=True)["offset_mapping"] == \
            original(text, return_offsets_mapping=True)["offset_mapping"]
        assert saved(text)["input_ids"] == original(text)["input_ids"]


def test_generate_text_from_the_export_equals_full_recomputation_at_every_step(exported):
    target, model, tokenizers = exported
    loaded = CALMForCausalLM.from_pretrained(target)
    cached = loaded.generate_text(PROMPTS, max_new_tokens=8, eos_token_id=None)
    recomputed = generate_text(loaded.calm, ANCHOR_TOKENIZER, tokenizers, PROMPTS, 8, eos_token_id=None,
                               use_cache=False)  # every step one full aligned forward over the text so far
    in_memory = generate_text(model, ANCHOR_TOKENIZER, tokenizers, PROMPTS, 8, eos_token_id=None)
    assert cached.new_token_ids == recomputed.new_token_ids == in_memory.new_token_ids
    assert cached.texts == recomputed.texts
    assert len({tuple(ids) for ids in cached.new_token_ids}) > 1  # the prompts lead to different continuations
    assert all(kept < 0.5 * full for kept, full in zip(cached.work, recomputed.work))  # caches kept across re-cuts


def test_token_id_generation_is_refused_pointing_to_generate_text(exported, tmp_path):
    target, _, _ = exported
    loaded = CALMForCausalLM.from_pretrained(target)
    ids = torch.tensor([ANCHOR_TOKENIZER("ab ba")["input_ids"]])
    with pytest.raises(ValueError, match=r"generate: augmenting models \[0, 1\] read their own tokenizer's tokens.*"
                                         r"model.generate_text\(prompts"):
        loaded.generate(ids, max_new_tokens=2)
    with pytest.raises(ValueError, match=r"forward: augmenting models \[0, 1\].*generate_text"):
        loaded(ids)
    loaded.save_pretrained(tmp_path / "bare")  # without the anchor's tokenizer: generate_text needs one given
    with pytest.raises(ValueError, match="holds no anchor tokenizer.*give anchor_tokenizer"):
        CALMForCausalLM.from_pretrained(tmp_path / "bare").generate_text(PROMPTS[:1], 2)
    loaded.save_pretrained(tmp_path / "again", tokenizer=ANCHOR_TOKENIZER)  # the own tokenizers travel with it
    again = CALMForCausalLM.from_pretrained(tmp_path / "again")
    assert (tmp_path / "again" / "augment1" / "tokenizer.json").is_file()
    assert again.generate_text(PROMPTS[:1], 4, eos_token_id=None).new_token_ids == \
        loaded.generate_text(PROMPTS[:1], 4, eos_token_id=None).new_token_ids


def test_save_composition_refuses_to_guess_which_tokens_an_augmenting_model_read(exported, tmp_path):
    """The weights do not record whether the bridges were trained on an augmenting model's own tokens or the
    anchor's ids; without ``augment_tokenizers`` an export that loads as a shared-tokenizer one would generate
    wrongly, so it is refused when the model's directory holds a tokenizer of its own, naming what to pass."""
    target, model, tokenizers = exported
    root = target.parent
    augments = []
    for index, tokenizer in enumerate(tokenizers):  # each model directory as a user keeps it: its tokenizer in it
        shutil.copytree(root / f"augment{index}", tmp_path / f"augment{index}")
        tokenizer.save_pretrained(tmp_path / f"augment{index}")
        augments.append(tmp_path / f"augment{index}")

    def save(**options):
        return calm_dist.save_composition(tmp_path / "export", model.composition_state_dict(), root / "anchor",
                                          augments, model.augment_connections, tokenizer=ANCHOR_TOKENIZER, **options)

    first = re.escape(repr(str(augments[0])))
    with pytest.raises(ValueError, match=rf"augmenting model 0's directory {first} holds a tokenizer of its own "
                                         rf"\(their vocabularies differ.*weights do not record.*"
                                         rf"augment_tokenizers=\[{first}, None\] when it read its own tokenisation"):
        save()
    assert not (tmp_path / "export").exists()
    # Passing what the message names writes the export equal to the one written with the tokenizer objects.
    written = CALMForCausalLM.from_pretrained(save(augment_tokenizers=augments))
    assert written.calm.own_tokenizer == [True, True]
    assert written.generate_text(PROMPTS, 4, eos_token_id=None).new_token_ids == \
        CALMForCausalLM.from_pretrained(target).generate_text(PROMPTS, 4, eos_token_id=None).new_token_ids
    # An explicit None says that model read the anchor's ids: it is written as such, not refused.
    save(augment_tokenizers=[None, augments[1]])
    assert "tokenizer" not in json.loads((tmp_path / "export" / "config.json").read_text())["augments"][0]
