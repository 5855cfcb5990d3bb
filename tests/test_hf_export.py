"""Exports: written by save_composition, loaded by CALMForCausalLM.from_pretrained / AutoTokenizer, used with
generate and pipeline as a transformers user would, over saved base models with a real BPE tokenizer."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import calm_dist
from calm_dist import CALMForCausalLM
from calm_dist.identity import weights_checksum
from tests.hf_fixtures import bpe_tokenizer, save_base_models
from tests.tiny_models import randomise_bridges

pytestmark = pytest.mark.timeout(180)
CONNECTIONS = [(0, -1), (1, 0), (3, 2)]
PROMPTS = ["the cat sat", "a quick brown fox jumps over", "two models"]
REPO_ROOT = Path(__file__).resolve().parents[1]


def load_base(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(export dir, the trained composition in memory, anchor dir, augment dir, the original tokenizer)."""
    root = tmp_path_factory.mktemp("hf_export")
    tokenizer = bpe_tokenizer()
    anchor_dir, (augment_dir,) = save_base_models(root, "llama", ["gpt2"], tokenizer)
    calm = calm_dist.compose(load_base(anchor_dir), load_base(augment_dir), connections=CONNECTIONS)
    randomise_bridges(calm)
    target = calm_dist.save_composition(root / "export", calm.composition_state_dict(), anchor_dir, [augment_dir],
                                        calm.augment_connections, metadata={"step": 7})
    return target, calm.eval(), anchor_dir, augment_dir, tokenizer


@pytest.fixture(scope="module")
def loaded(exported):
    model = CALMForCausalLM.from_pretrained(exported[0])
    return model, transformers.AutoTokenizer.from_pretrained(exported[0])


def test_an_export_holds_the_bridges_a_config_naming_the_bases_and_the_tokenizer(exported):
    target, calm, anchor_dir, augment_dir, _ = exported
    names = set(os.listdir(target))
    assert {"composition.safetensors", "config.json", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json"} <= names
    assert not any(name.startswith("model") for name in names)  # no base-model weights
    config = json.loads((target / "config.json").read_text())
    assert config["model_type"] == "calm" and config["architectures"] == ["CALMForCausalLM"]
    assert config["anchor"] == {"path": str(anchor_dir.resolve()), "sha256": weights_checksum(anchor_dir)}
    assert config["augments"] == [{"path": str(augment_dir.resolve()), "sha256": weights_checksum(augment_dir),
                                   "connections": [list(pair) for pair in CONNECTIONS]}]
    assert config["relative_scale"] is False and config["calm_metadata"] == {"step": 7}
    bridges = load_file(str(target / "composition.safetensors"))
    assert bridges.keys() == calm.composition_state_dict().keys()
    assert all(tensor.dtype == torch.float32 for tensor in bridges.values())
    assert not [name for name in os.listdir(target.parent) if name.startswith(".export.tmp")]


def test_from_pretrained_rebuilds_the_trained_composition(exported, loaded):
    _, calm, *_ = exported
    model, tokenizer = loaded
    ids = tokenizer(PROMPTS[1], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, use_cache=False).logits, calm(ids).logits)
        # with a cache the bridges attend through their folded weights: the same up to rounding
        torch.testing.assert_close(model(input_ids=ids).logits, calm(ids).logits, atol=1e-5, rtol=1e-5)
    assert not model.training and not model.calm.anchor.training


def test_the_exported_tokenizer_is_the_anchors_set_up_for_batched_generation(exported, loaded):
    *_, original = exported
    _, tokenizer = loaded
    assert tokenizer.padding_side == "left"
    assert tokenizer.pad_token == tokenizer.eos_token == "</s>" and original.pad_token is None  # pads with EOS
    assert tokenizer.bos_token is None
    assert tokenizer(PROMPTS)["input_ids"] == original(PROMPTS)["input_ids"]
    assert tokenizer.chat_template == original.chat_template


def test_generate_from_text_with_left_padding_sampling_and_greedy(loaded):
    model, tokenizer = loaded
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    assert (batch["attention_mask"][:, 0] == 0).any()  # prompts of different lengths: left padding
    sampled = model.generate(**batch, max_new_tokens=8, do_sample=True, temperature=0.7, top_p=0.9)
    assert sampled.shape[0] == 3 and isinstance(tokenizer.batch_decode(sampled[:, batch["input_ids"].shape[1]:])[0],
                                                  str)
    width = batch["input_ids"].shape[1]
    greedy = model.generate(**batch, max_new_tokens=6, do_sample=False, min_new_tokens=6)
    for row, prompt in enumerate(PROMPTS):  # each row continues as its prompt alone would
        alone = tokenizer(prompt, return_tensors="pt")
        expected = model.generate(**alone, max_new_tokens=6, do_sample=False, min_new_tokens=6)
        assert greedy[row, width:].tolist() == expected[0, alone["input_ids"].shape[1]:].tolist()


def test_stop_strings_and_text_streamer(loaded, capsys):
    model, tokenizer = loaded
    prompt = tokenizer(PROMPTS[0], return_tensors="pt")
    length = prompt["input_ids"].shape[1]
    free = model.generate(**prompt, max_new_tokens=12, do_sample=False, min_new_tokens=12)[0, length:]
    stop = tokenizer.decode(free[:4]).strip()[-2:]  # text the free run completes within its first four tokens
    stopped = model.generate(**prompt, max_new_tokens=12, do_sample=False, stop_strings=[stop], tokenizer=tokenizer)
    text = tokenizer.decode(stopped[0, length:])
    assert stopped.shape[1] - length <= 4 and text.endswith(stop)
    model.generate(**prompt, max_new_tokens=5, do_sample=False, min_new_tokens=5,
                   streamer=transformers.TextStreamer(tokenizer, skip_prompt=True))
    assert capsys.readouterr().out.strip() == tokenizer.decode(free[:5]).strip()


def test_text_generation_pipeline_returns_text(loaded):
    model, tokenizer = loaded
    generator = transformers.pipeline("text-generation", model=model, tokenizer=tokenizer)
    result = generator(PROMPTS[0], max_new_tokens=5, do_sample=False, min_new_tokens=5)
    prompt = tokenizer(PROMPTS[0], return_tensors="pt")
    ids = model.generate(**prompt, max_new_tokens=5, do_sample=False, min_new_tokens=5)
    assert result == [{"generated_text": tokenizer.decode(ids[0], skip_special_tokens=True)}]
    assert all(isinstance(rows[0]["generated_text"], str) for rows in generator(PROMPTS[:2], max_new_tokens=3))


def test_bfloat16_with_a_device_map(exported, loaded):
    model = CALMForCausalLM.from_pretrained(exported[0], dtype=torch.bfloat16, device_map="cpu")
    assert {parameter.dtype for parameter in model.parameters()} == {torch.bfloat16}
    assert model.device == torch.device("cpu")
    reference, tokenizer = loaded
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        low, high = model(**batch).logits.float(), reference(**batch).logits
    real = batch["attention_mask"].bool()
    assert (low[real] - high[real]).abs().max() < 0.1 * high[real].abs().max()
    assert model.generate(**batch, max_new_tokens=4, do_sample=False).shape[0] == 3


def test_a_changed_base_is_refused_unless_the_caller_says_otherwise(exported, tmp_path):
    target, calm, anchor_dir, augment_dir, _ = exported
    changed = tmp_path / "changed_augment"
    shutil.copytree(augment_dir, changed)
    weights = load_file(str(changed / "model.safetensors"))
    first = sorted(weights)[0]
    weights[first] = weights[first] + 0.01
    save_file(weights, str(changed / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"augmenting model 0 .* is not the one this composition was trained with.*"
                                         r"verify_base_models=False"):
        CALMForCausalLM.from_pretrained(target, augment_paths=[changed])
    loaded = CALMForCausalLM.from_pretrained(target, augment_paths=[changed], verify_base_models=False)
    assert torch.equal(loaded.calm.augment.get_input_embeddings().weight,
                       load_base(changed).get_input_embeddings().weight)


def test_base_models_that_moved_are_found_through_overrides(exported, tmp_path):
    target, calm, anchor_dir, augment_dir, _ = exported
    moved = tmp_path / "export"
    shutil.copytree(target, moved)
    config = json.loads((moved / "config.json").read_text())
    config["anchor"]["path"] = str(tmp_path / "gone")
    (moved / "config.json").write_text(json.dumps(config))
    with pytest.raises(FileNotFoundError, match="anchor model .*gone.* pass anchor_path="):
        CALMForCausalLM.from_pretrained(moved)
    relocated = tmp_path / "relocated_anchor"
    shutil.copytree(anchor_dir, relocated)
    model = CALMForCausalLM.from_pretrained(moved, anchor_path=relocated)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, use_cache=False).logits, calm(ids).logits)
        # with a cache the bridges attend through their folded weights: the same up to rounding
        torch.testing.assert_close(model(input_ids=ids).logits, calm(ids).logits, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="one entry per augmenting model"):
        CALMForCausalLM.from_pretrained(moved, anchor_path=relocated, augment_paths=str(augment_dir))


def test_auto_classes_and_load_exported(exported, loaded):
    target, calm, *_ = exported
    model, _ = loaded
    assert isinstance(transformers.AutoModelForCausalLM.from_pretrained(target), CALMForCausalLM)
    composed = calm_dist.load_exported(target)
    assert isinstance(composed, calm_dist.CALMModel)
    ids = torch.tensor([[5, 6, 7], [8, 9, 10]])
    assert torch.equal(composed.generate(ids, max_new_tokens=4, eos_token_id=None),
                       model.generate(input_ids=ids, max_new_tokens=4, do_sample=False, min_new_tokens=4))


def test_load_exported_still_reads_the_previous_export_format(exported, tmp_path):
    _, calm, anchor_dir, augment_dir, _ = exported
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    save_file({key: value.contiguous() for key, value in calm.composition_state_dict().items()},
              str(legacy / "composition.safetensors"))
    (legacy / "calm_export.json").write_text(json.dumps({
        "step": 3, "connections": [list(pair) for pair in CONNECTIONS], "bridge_sources": None,
        "relative_scale": False,
        "base_models": {"anchor": {"path": str(anchor_dir), "sha256": weights_checksum(anchor_dir)},
                        "augment": {"path": str(augment_dir), "sha256": weights_checksum(augment_dir)}}}))
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        assert torch.equal(calm_dist.load_exported(legacy)(ids).logits, calm(ids).logits)


def test_auto_tokenizer_loads_an_export_without_importing_calm_dist(exported):
    code = ("import sys, transformers; tok = transformers.AutoTokenizer.from_pretrained(sys.argv[1]); "
            "assert 'calm_dist' not in sys.modules; print(tok.padding_side, tok.pad_token)")
    result = subprocess.run([sys.executable, "-c", code, str(exported[0])], capture_output=True, text=True,
                            timeout=120, cwd="/")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["left", "</s>"]


def test_an_export_replaces_the_previous_one_and_a_failed_one_leaves_it(exported, tmp_path):
    _, calm, anchor_dir, augment_dir, tokenizer = exported
    target = tmp_path / "export"
    state = calm.composition_state_dict()
    calm_dist.save_composition(target, state, anchor_dir, [augment_dir], calm.augment_connections,
                               metadata={"step": 1})
    calm_dist.save_composition(target, state, anchor_dir, [augment_dir], calm.augment_connections,
                               metadata={"step": 2}, tokenizer=tokenizer)
    assert json.loads((target / "config.json").read_text())["calm_metadata"] == {"step": 2}
    partial = {key: value for key, value in state.items() if not key.startswith("bridges.2.")}
    with pytest.raises(ValueError, match="must hold the weights of 3 bridges"):
        calm_dist.save_composition(target, partial, anchor_dir, [augment_dir], calm.augment_connections)
    with pytest.raises(FileNotFoundError, match="holds no Hugging Face tokenizer"):
        calm_dist.save_composition(target, state, anchor_dir, [augment_dir], calm.augment_connections,
                                   tokenizer=augment_dir)
    assert json.loads((target / "config.json").read_text())["calm_metadata"] == {"step": 2}
    assert sorted(os.listdir(tmp_path)) == ["export"]  # no temporary directory left behind


def test_save_pretrained_writes_an_export_that_loads_again(exported, loaded, tmp_path):
    model, tokenizer = loaded
    model.save_pretrained(tmp_path / "again", tokenizer=tokenizer)
    again = CALMForCausalLM.from_pretrained(tmp_path / "again")
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, model(input_ids=ids).logits)
    assert again.config.anchor == model.config.anchor
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "again").padding_side == "left"


def test_an_export_of_two_augmenting_models(tmp_path):
    tokenizer = bpe_tokenizer()
    anchor_dir, augment_dirs = save_base_models(tmp_path, "qwen2", ["gpt2", "gpt_neox"], tokenizer)
    pairs = [[(0, -1), (3, 2)], [(1, 0), (2, 1)]]
    calm = calm_dist.compose(load_base(anchor_dir), [load_base(path) for path in augment_dirs], connections=pairs,
                             relative_scale=True)
    randomise_bridges(calm)
    target = calm_dist.save_composition(tmp_path / "export", calm.composition_state_dict(), anchor_dir,
                                        augment_dirs, calm.augment_connections, relative_scale=True)
    model = CALMForCausalLM.from_pretrained(target)
    assert model.calm.augment_connections == pairs and model.calm.bridges[0].relative_scale
    tokenizer = transformers.AutoTokenizer.from_pretrained(target)
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        expected = calm(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        assert torch.equal(model(**batch, use_cache=False).logits[real], expected[real])
    cached = model.generate(**batch, max_new_tokens=5, do_sample=False, min_new_tokens=5)
    assert torch.equal(cached, model.generate(**batch, max_new_tokens=5, do_sample=False, min_new_tokens=5,
                                              use_cache=False))
