"""The user's saved models and tokenizers: loading them, checking them against each other and against
the config, and the composition they make — all before any worker starts."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from calm_dist.config import Config, ModelSource, composition_seed
from calm_dist.model.alignment import tokenizer_difference
from calm_dist.model.composed import CompositionSpec, check_position_buckets
from calm_dist.model.connections import resolve_connections
from calm_dist.model.layers import SavedModelFacts, saved_model_facts


def model_key(role: str) -> str:
    """The config key of a model path: ``anchor.model.path`` or ``augment[i].model.path``."""
    return f"{role}.model.path"


def check_model_dir(path: str, key: str) -> Path:
    if not path:
        raise ValueError(f"config key '{key}' is empty: give the directory of a saved Hugging Face causal LM "
                         "(written by save_pretrained)")
    directory = Path(path)
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"config key '{key}': {path!r} holds no saved Hugging Face model (no config.json); "
                                "give a directory written by save_pretrained, on a path this machine sees")
    if not any(directory.glob("*.safetensors")) and not any(directory.glob("*.bin")):
        raise FileNotFoundError(f"config key '{key}': {path!r} has a config.json but no weights "
                                "(*.safetensors or *.bin)")
    return directory


def load_causal_lm(path: str | Path, key: str, dtype=None):
    """A saved causal LM in eval mode; FileNotFoundError naming ``key`` when there is none."""
    from transformers import AutoModelForCausalLM

    check_model_dir(str(path), key)
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()  # None: transformers' default


def tokenizer_dir(source: ModelSource) -> str:
    return source.tokenizer or source.path


def load_tokenizer(source: ModelSource, role: str):
    """The model's tokenizer (``<role>.model.tokenizer``, else its own directory); it must be fast (offsets)."""
    from transformers import AutoTokenizer

    location = tokenizer_dir(source)
    key = f"{role}.model.tokenizer" if source.tokenizer else f"{role}.model.path"
    try:
        tokenizer = AutoTokenizer.from_pretrained(location)
    except (OSError, ValueError) as error:
        raise FileNotFoundError(f"config key '{key}': no tokenizer could be loaded from {location!r} ({error}); save "
                                f"it there with tokenizer.save_pretrained or set {role}.model.tokenizer") from None
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"config key '{key}': the tokenizer at {location!r} is not a fast tokenizer; the data "
                         "pipeline needs token offsets (save it with tokenizer.json, from the `tokenizers` library)")
    return tokenizer


@dataclass(frozen=True)
class ModelPlan:
    """The job's models, checked: directories, the anchor's tokenizer directory, facts, the composition, and each
    augmenting model's own tokenizer where it differs from the anchor's (None: it reads the anchor's tokens)."""

    anchor_dir: Path
    augment_dirs: tuple[Path, ...]
    tokenizer_dir: Path
    anchor_facts: SavedModelFacts
    augment_facts: tuple[SavedModelFacts, ...]
    composition: CompositionSpec
    augment_tokenizer_dirs: tuple[Path | None, ...] = ()
    augment_tokenizers: tuple = field(default=(), compare=False, repr=False)  # loaded, as augment_tokenizer_dirs

    @property
    def own_tokenizers(self) -> bool:
        return any(path is not None for path in self.augment_tokenizer_dirs)


def connection_choice(config: Config, index: int) -> tuple[int | None, list | None, str]:
    """(every_n, connections, the config key they came from) of augmenting model ``index``."""
    own = config.augment[index]
    if own.every_n is not None or own.connections is not None:
        return own.every_n, own.connections, f"augment[{index}]"
    return config.composition.every_n, config.composition.connections, "composition"


def resolve_composition(config: Config, anchor: SavedModelFacts, augments: list[SavedModelFacts],
                        own_tokenizer: tuple[bool, ...] = ()) -> CompositionSpec:
    per_model = []
    for index, facts in enumerate(augments):
        every_n, pairs, key = connection_choice(config, index)
        try:
            per_model.append(tuple(resolve_connections(
                facts.shape.num_layers, anchor.shape.num_layers, every_n,
                None if pairs is None else [tuple(p) for p in pairs])))
        except ValueError as error:
            raise ValueError(f"config key '{key}.{'connections' if pairs is not None else 'every_n'}': {error}") from None
    spec = CompositionSpec(tuple(per_model), config.composition.relative_scale, composition_seed(config),
                           own_tokenizer if any(own_tokenizer) else (), config.composition.position_buckets,
                           config.composition.aligned_logit if config.composition.position_buckets else 0.0)
    try:
        check_position_buckets(spec.position_buckets, spec.own_tokenizer)
    except ValueError as error:
        raise ValueError(f"config key 'composition.position_buckets': {error}") from None
    return spec


def _facts(directory: Path, key: str) -> SavedModelFacts:
    try:
        return saved_model_facts(directory)
    except ValueError as error:
        raise ValueError(f"config key '{key}': {error}") from None


def _check_vocabulary(facts: SavedModelFacts, tokenizer, key: str, hint: str = "") -> None:
    if len(tokenizer) > facts.shape.vocab_size:
        raise ValueError(f"config key '{key}': the tokenizer has {len(tokenizer)} tokens but the model's embedding has "
                         f"only {facts.shape.vocab_size} rows: it was not trained with this tokenizer{hint}")


def _check_positions(facts: SavedModelFacts, max_length: int, key: str) -> None:
    if facts.max_positions is not None and max_length > facts.max_positions:
        raise ValueError(f"config key 'data.max_length': {max_length} tokens is more than the model at {key} "
                         f"covers ({facts.max_positions} positions); lower data.max_length")


def plan_models(config: Config):
    """Checks every model, tokenizer and connection of the config; returns (ModelPlan, anchor tokenizer).

    An augmenting model whose tokenizer differs from the anchor's (``tokenizer_difference``) reads its own
    tokenisation of the same texts, aligned by character offsets: its tokenizer must fit its embedding, and
    its position limit applies to its own tokens (``data_pipeline.Retokenisation``), not to data.max_length."""
    anchor_dir = check_model_dir(config.anchor.model.path, model_key("anchor"))
    anchor_tokenizer = load_tokenizer(config.anchor.model, "anchor")
    anchor_facts = _facts(anchor_dir, model_key("anchor"))
    _check_vocabulary(anchor_facts, anchor_tokenizer, model_key("anchor"))
    _check_positions(anchor_facts, config.data.max_length, model_key("anchor"))
    augment_dirs, augment_facts, own_dirs, own_tokenizers = [], [], [], []
    for index, augment in enumerate(config.augment):
        role = f"augment[{index}]"
        directory = check_model_dir(augment.model.path, model_key(role))
        facts = _facts(directory, model_key(role))
        tokenizer = load_tokenizer(augment.model, role)
        if tokenizer_difference(anchor_tokenizer, tokenizer) is None:
            _check_vocabulary(facts, anchor_tokenizer, model_key(role),
                              f" (a model with a tokenizer of its own: save it in {augment.model.path!r} or name its "
                              f"directory with {role}.model.tokenizer)")
            _check_positions(facts, config.data.max_length, model_key(role))
            own_dirs.append(None)
            own_tokenizers.append(None)
        else:
            _check_vocabulary(facts, tokenizer, f"{role}.model.tokenizer" if augment.model.tokenizer
                              else model_key(role))
            own_dirs.append(Path(tokenizer_dir(augment.model)))
            own_tokenizers.append(tokenizer)
        augment_dirs.append(directory)
        augment_facts.append(facts)
    composition = resolve_composition(config, anchor_facts, augment_facts,
                                      tuple(path is not None for path in own_dirs))
    plan = ModelPlan(anchor_dir, tuple(augment_dirs), Path(tokenizer_dir(config.anchor.model)), anchor_facts,
                     tuple(augment_facts), composition, tuple(own_dirs), tuple(own_tokenizers))
    return plan, anchor_tokenizer
