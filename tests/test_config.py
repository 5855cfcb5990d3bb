"""The config tree: every shipped YAML loads; bad input raises a ValueError naming the key."""
from pathlib import Path

import pytest

from calm_dist.config import Config, load_config, parse_override

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


def test_configs_are_shipped():
    names = {path.name for path in CONFIGS}
    assert {"example_composition.yaml", "kv_arithmetic.yaml", "tiny.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads(path):
    config = load_config(path)
    assert isinstance(config, Config)
    assert config.train.max_steps > 0


def test_dotted_overrides_reach_the_tree():
    config = load_config(None, ["train.max_steps=7", "checkpoint.every_steps=3", "parallel.anchor_ranks=2",
                                "parallel.augment_stages=2", "parallel.min_anchor_ranks=1", "run.launcher=local",
                                "composition.connections=[[0, -1], [1, 2]]", "augment.model.path=/m/a",
                                "data.eval={a: /d/a.jsonl, b: /d/b.parquet}"])
    assert config.train.max_steps == 7
    assert config.checkpoint.every_steps == 3
    assert (config.parallel.anchor_ranks, config.parallel.augment_stages) == (2, 2)
    assert config.composition.connections == [[0, -1], [1, 2]]
    assert config.augment[0].model.path == "/m/a"
    assert config.data.eval == {"a": "/d/a.jsonl", "b": "/d/b.parquet"}


def test_repeated_set_flags_all_apply():
    from launcher.train import parse_args

    arguments = parse_args(["--config", "c.yaml", "--set", "train.max_steps=7", "eval.every_steps=2",
                            "--set", "run.launcher=local"])
    assert arguments.overrides == ["train.max_steps=7", "eval.every_steps=2", "run.launcher=local"]


def test_one_or_several_augmenting_models(tmp_path):
    path = tmp_path / "several.yaml"
    path.write_text("augment:\n  - model: {path: /m/a}\n  - model: {path: /m/b}\n    connections: [[2, 0]]\n"
                    "    stages: 2\n")
    config = load_config(path, ["augment.model.tokenizer=/t"])  # augment.* = the first model's
    assert [a.model.path for a in config.augment] == ["/m/a", "/m/b"]
    assert config.augment[0].model.tokenizer == "/t"
    assert (config.augment[1].connections, config.augment[1].stages) == ([[2, 0]], 2)


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
    ("train.min_lr_rate=-0.1", "train.min_lr_rate"),
    ("train.min_lr_rate=1.5", "train.min_lr_rate"),
    ("deepspeed.reduce_bucket_size=0", "deepspeed.reduce_bucket_size"),
    ("deepspeed.vocab_piece_rows=-1", "deepspeed.vocab_piece_rows"),
    ("data.eval_fraction=1.5", "data.eval_fraction"),
    ("data.overlong=cut", "data.overlong"),
    ("data.max_length=0", "data.max_length"),
    ("parallel.min_anchor_ranks=3", "parallel.min_anchor_ranks"),
    ("train.batch_size=7", "train.batch_size"),  # with the default 1 anchor rank: fine, so pair it below
    ("composition.connections=[[0]]", "composition.connections[0]"),
    ("composition.connections=[[0, x]]", "composition.connections[0][1]"),
    ("augment.stages=0", "augment[0].stages"),
    ("augment.every_n=0", "augment[0].every_n"),
    ("recipe={data: {}}", "recipe.name"),
    ("train=3", "train"),
    ("deepspeed.zero_hpz_partition_size=2", "deepspeed.zero_hpz_partition_size"),  # 1 anchor rank
    ("deepspeed.zero_hpz_partition_size=0", "deepspeed.zero_hpz_partition_size"),
    ("deepspeed.max_live_parameters=-1", "deepspeed.max_live_parameters"),
])
def test_bad_values_name_the_key(override, needle):
    overrides = [override, "parallel.anchor_ranks=2"] if override.startswith("train.batch_size") else [override]
    with pytest.raises(ValueError, match=r"\b" + needle.replace("[", r"\[").replace("]", r"\]")):
        load_config(None, overrides)


@pytest.mark.parametrize("override,hint", [
    ("extra_augments=[{path: /m}]", "list every augmenting model under 'augment:'"),
    ("baselines.lora=true", "a recipe's own settings go under its 'recipe:' section"),
    ("train.eval_every=5", "use eval.every_steps"),
])
def test_keys_of_older_configs_say_what_replaces_them(override, hint):
    with pytest.raises(ValueError, match=hint):
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


def test_zero_plus_plus_and_gather_limits_reach_deepspeed():
    from calm_dist.distributed.zero_anchor import EngineSizes, deepspeed_config

    config = load_config(None, ["parallel.anchor_ranks=4", "train.batch_size=4", "deepspeed.zero_hpz_partition_size=2",
                                "deepspeed.zero_quantized_weights=true"])
    sizes = EngineSizes(layer_numel=1000, weight_numel=400, trainable_numel=900, trainable_weight_numel=300)
    zero = deepspeed_config(config.deepspeed, config.train, 1, sizes=sizes)["zero_optimization"]
    assert zero["zero_hpz_partition_size"] == 2 and zero["zero_quantized_weights"] is True
    assert zero["stage3_prefetch_bucket_size"] == 1000 and zero["stage3_max_live_parameters"] == 3000
    on_cpu = deepspeed_config(config.deepspeed, config.train, 1, sizes=sizes, on_cpu=True)["zero_optimization"]
    assert on_cpu["stage3_prefetch_bucket_size"] == 400 and on_cpu["stage3_max_live_parameters"] == 400
    assert zero["stage3_max_reuse_distance"] == 0
    assert zero["reduce_bucket_size"] == 900 and on_cpu["reduce_bucket_size"] == 300  # auto: what the bridges need
    fixed = load_config(None, ["deepspeed.prefetch_bucket_size=7", "deepspeed.max_live_parameters=9"]).deepspeed
    zero = deepspeed_config(fixed, config.train, 1, sizes=sizes)["zero_optimization"]
    assert zero["stage3_prefetch_bucket_size"] == 7 and zero["stage3_max_live_parameters"] == 9


def test_composition_seed_defaults_to_run_seed_and_leaves_data_seeded_by_it():
    from calm_dist.config import composition_seed
    from calm_dist.model.layers import ModelShape, SavedModelFacts
    from calm_dist.train.models import resolve_composition

    def facts(layers):
        return SavedModelFacts(ModelShape(layers, 32, 4, 100), (1,) * layers, layers, None, "llama")

    default, second = load_config(None, ["run.seed=3"]), load_config(None, ["run.seed=3", "composition.seed=11"])
    assert (composition_seed(default), composition_seed(second)) == (3, 11)
    assert resolve_composition(default, facts(4), [facts(4)]).seed == 3
    assert resolve_composition(second, facts(4), [facts(4)]).seed == 11
    assert second.run.seed == 3  # data preparation, eval splits and recipes' base models keep theirs
    with pytest.raises(ValueError, match="composition.seed"):
        load_config(None, ["composition.seed=-1"])


def test_position_buckets_reach_the_composition_and_are_refused_before_any_work_where_they_cannot_apply():
    from calm_dist.model.layers import ModelShape, SavedModelFacts
    from calm_dist.train.models import resolve_composition

    def facts(layers):
        return SavedModelFacts(ModelShape(layers, 32, 4, 100), (1,) * layers, layers, None, "llama")

    config = load_config(None, ["composition.position_buckets=6", "composition.aligned_logit=5.0"])
    spec = resolve_composition(config, facts(4), [facts(4)])
    assert (spec.position_buckets, spec.aligned_logit) == (6, 5.0)
    assert spec.to_dict()["position_buckets"] == 6 and type(spec).from_dict(spec.to_dict()) == spec
    assert "position_buckets" not in resolve_composition(load_config(None, []), facts(4), [facts(4)]).to_dict()
    with pytest.raises(ValueError, match="composition.position_buckets"):
        load_config(None, ["composition.position_buckets=-1"])
    with pytest.raises(ValueError, match="'composition.position_buckets'.*tokenizer of their own"):
        resolve_composition(config, facts(4), [facts(4)], own_tokenizer=(True,))
