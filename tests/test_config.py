"""The config tree: every shipped YAML loads; bad input raises a ValueError naming the key."""
from pathlib import Path

import pytest

from calm_dist.config import Config, load_config, parse_override

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


def test_configs_are_shipped():
    names = {path.name for path in CONFIGS}
    assert {"kv_arithmetic.yaml", "tiny.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads(path):
    config = load_config(path)
    assert isinstance(config, Config)
    assert config.train.max_steps > 0


def test_dotted_overrides_reach_the_tree():
    config = load_config(None, ["train.max_steps=7", "checkpoint.every_steps=3", "parallel.anchor_ranks=2",
                                "parallel.augment_stages=2", "parallel.min_anchor_ranks=1",
                                "composition.connections=[[0, -1], [1, 2]]", "anchor.model.arch=gpt2"])
    assert config.train.max_steps == 7
    assert config.checkpoint.every_steps == 3
    assert (config.parallel.anchor_ranks, config.parallel.augment_stages) == (2, 2)
    assert config.composition.connections == [[0, -1], [1, 2]]
    assert config.anchor.model.arch == "gpt2"


def test_ints_and_exponent_strings_are_accepted_for_floats():
    assert load_config(None, ["train.lr=1"]).train.lr == 1.0
    assert load_config(None, ["train.lr=3e-3"]).train.lr == 0.003


@pytest.mark.parametrize("override,needle", [
    ("train.bogus=1", "train.bogus"),
    ("bogus.key=1", "bogus"),
    ("train.max_steps=ten", "train.max_steps"),
    ("train.max_steps=1.5", "train.max_steps"),
    ("train.max_steps=0", "train.max_steps"),
    ("train.lr=-1", "train.lr"),
    ("data.heldin_fraction=1.5", "data.heldin_fraction"),
    ("data.max_operands=1", "data.max_operands"),
    ("anchor.model.arch=bert", "anchor.model.arch"),
    ("augment.model.hidden_size=30", "augment.model.hidden_size"),
    ("parallel.min_anchor_ranks=3", "parallel.min_anchor_ranks"),
    ("composition.connections=[[0]]", "composition.connections[0]"),
    ("composition.connections=[[0, x]]", "composition.connections[0][1]"),
    ("train=3", "train"),
])
def test_bad_values_name_the_key(override, needle):
    with pytest.raises(ValueError, match=r"\b" + needle.replace("[", r"\[").replace("]", r"\]")):
        load_config(None, [override])


def test_unknown_key_in_yaml_is_named(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  max_stepz: 3\n")
    with pytest.raises(ValueError, match="train.max_stepz"):
        load_config(path)


def test_missing_config_file():
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config("nope.yaml")


def test_override_syntax():
    assert parse_override("a.b=[1, 2]") == ("a.b", [1, 2])
    with pytest.raises(ValueError, match="key=value"):
        parse_override("train.max_steps")
