"""The recipe's own settings: the ``recipe:`` section of a config, checked strictly.

    recipe:
      name: kv_arithmetic
      data: {num_keys: 800, value_max: 5, ...}        # the synthetic tasks (TaskSettings)
      augment: {model: {...}, pretrain: {...}}         # m_A, trained from scratch (BaseModelSettings)
      anchor: {model: {...}, pretrain: {...}, zero_unseen_embeddings: true}   # m_B
      baselines: {lora: true, ...}                     # extra rows of the table (BaselineSettings)

Every error is a ValueError naming the dotted key (``recipe.data.num_keys``). The framework's sections
(run, composition, train, eval, ...) stay the framework's: the composition's budget is ``train.*``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from calm_dist.config import Config, build_section

from . import tasks

NAME = "kv_arithmetic"
SUPPORTED_ARCHS = ("llama", "qwen2", "gpt2", "gpt_neox")


@dataclass
class TaskSettings:
    num_keys: int = 200
    key_min_len: int = 2
    key_max_len: int = 4
    value_max: int = 20
    min_operands: int = 2
    max_operands: int = 3
    heldin_fraction: float = 0.2  # keys of D_C; the rest are held out for evaluation
    val_fraction: float = 0.0  # keys of a validation set (never held-in, never held-out)
    base_train_examples: int = 60000  # per base-model task
    composition_train_examples: int = 60000
    # m_A's KV-Substitution data: probability that an operand is a number literal (which substitutes to
    # itself), so m_A reads numbers and keys alike as values. Never arithmetic.
    augment_number_operand_prob: float = 0.0
    # Fraction of D_C that is plain Numeric-Arithmetic (0 = the paper's D_C, KV-Arithmetic only).
    composition_numeric_fraction: float = 0.0
    # Where those come from: False = m_B's own training set (expressions it fits); True = drawn afresh from
    # every Numeric expression but the evaluation set's, so D_C also holds expressions m_B never saw.
    composition_numeric_fresh: bool = False
    # Relative weight of each operand count (min_operands..max_operands) in D_C's KV-Arithmetic examples;
    # None = uniform. Evaluation sets stay uniform.
    composition_operand_weights: list[float] | None = None
    eval_examples: int = 400  # per evaluation set


@dataclass
class ArchitectureSettings:
    arch: str = "llama"
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 256


@dataclass
class PretrainSettings:
    steps: int = 1000
    batch_size: int = 128
    lr: float = 1e-3
    warmup_steps: int = 50
    weight_decay: float = 0.0
    grad_clip: float = 1.0


@dataclass
class BaseModelSettings:
    model: ArchitectureSettings = field(default_factory=ArchitectureSettings)
    pretrain: PretrainSettings = field(default_factory=PretrainSettings)
    # After pretraining, set the input embedding of every token absent from the model's training data
    # to zero: tokens the model never read are indistinguishable to it (random untrained embeddings
    # are not, and a composition can memorise them). See docs/investigation.md, rows 13-16.
    zero_unseen_embeddings: bool = False
    # With zero_unseen_embeddings: reset them to the mean input embedding of the numbers 0..value_max instead
    # of zero, so that every unseen token (to m_B: every key) reads as one and the same unspecified number.
    # See docs/investigation.md, rows 52 and 57.
    unseen_as_mean_value: bool = False


@dataclass
class BaselineSettings:
    # The paper's baselines, each an extra row of the table, trained on D_C with the composition's
    # budget (train.*) in the driver process after the composition.
    lora: bool = False  # LoRA on the anchor with as many trainable parameters as the composition
    random_augment: bool = False  # CALM whose m_A is untrained (m_A's architecture and initial weights)
    vanilla_augment: bool = False  # CALM whose m_A is trained on Numeric-Arithmetic instead of the keys
    two_augments: bool = False  # CALM over two m_As (m_A's architecture), each knowing half of the keys
    different_tokenizer: bool = False  # CALM whose m_A reads characters while the anchor reads words
    lora_target_modules: list[str] | None = None  # None = every linear layer of the anchor but the LM head
    lora_alpha_per_rank: float = 2.0  # lora_alpha = this x the rank that matches the parameter count


@dataclass
class RecipeSettings:
    name: str = NAME
    data: TaskSettings = field(default_factory=TaskSettings)
    augment: BaseModelSettings = field(default_factory=BaseModelSettings)
    anchor: BaseModelSettings = field(default_factory=BaseModelSettings)
    baselines: BaselineSettings = field(default_factory=BaselineSettings)


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ValueError(f"config key 'recipe.{key}': {message}")


def _validate_task(data: TaskSettings) -> None:
    for name in ("num_keys", "key_min_len", "value_max", "min_operands", "base_train_examples",
                 "composition_train_examples", "eval_examples"):
        _require(getattr(data, name) > 0, f"data.{name}", f"must be > 0, got {getattr(data, name)}")
    _require(data.key_max_len >= data.key_min_len, "data.key_max_len", "must be >= recipe.data.key_min_len")
    _require(data.max_operands >= data.min_operands, "data.max_operands", "must be >= recipe.data.min_operands")
    _require(data.max_operands >= 2, "data.max_operands", "must be >= 2 (an expression has an operator)")
    _require(0 < data.heldin_fraction < 1, "data.heldin_fraction", f"must be in (0, 1), got {data.heldin_fraction}")
    _require(0 <= data.val_fraction < 1 - data.heldin_fraction, "data.val_fraction",
             "must be in [0, 1 - recipe.data.heldin_fraction)")
    _require(0 <= data.augment_number_operand_prob <= 1, "data.augment_number_operand_prob", "must be in [0, 1]")
    _require(0 <= data.composition_numeric_fraction < 1, "data.composition_numeric_fraction", "must be in [0, 1)")
    weights, counts = data.composition_operand_weights, data.max_operands - data.min_operands + 1
    _require(weights is None or tasks.operand_weights_are_valid(weights, data.min_operands, data.max_operands),
             "data.composition_operand_weights",
             f"must be null or {counts} weights >= 0 (operand counts {data.min_operands}..{data.max_operands}), "
             f"not all zero; got {weights}")


def _validate_base(base: BaseModelSettings, side: str) -> None:
    model, pretrain = base.model, base.pretrain
    _require(model.arch in SUPPORTED_ARCHS, f"{side}.model.arch", f"{model.arch!r} is not one of {SUPPORTED_ARCHS}")
    for name in ("hidden_size", "num_layers", "num_heads", "intermediate_size"):
        _require(getattr(model, name) > 0, f"{side}.model.{name}", "must be > 0")
    _require(model.hidden_size % model.num_heads == 0, f"{side}.model.hidden_size",
             f"{model.hidden_size} must be divisible by num_heads={model.num_heads}")
    for name in ("steps", "batch_size"):
        _require(getattr(pretrain, name) > 0, f"{side}.pretrain.{name}", "must be > 0")
    _require(pretrain.lr > 0, f"{side}.pretrain.lr", "must be > 0")
    _require(pretrain.warmup_steps >= 0, f"{side}.pretrain.warmup_steps", "must be >= 0")
    _require(base.zero_unseen_embeddings or not base.unseen_as_mean_value, f"{side}.unseen_as_mean_value",
             "chooses what zero_unseen_embeddings resets the unseen embeddings to: set that to true as well")


def _validate_baselines(baselines: BaselineSettings) -> None:
    _require(baselines.lora_alpha_per_rank > 0, "baselines.lora_alpha_per_rank", "must be > 0")
    _require(baselines.lora_target_modules is None or len(baselines.lora_target_modules) > 0,
             "baselines.lora_target_modules", "must name at least one module, or be null (every linear layer)")


def check_framework_sections(config: Config) -> None:
    """The recipe makes the models and data the job reads: before it runs, the config must leave them to it."""
    if len(config.augment) != 1:
        raise ValueError(f"config key 'augment': the {NAME} recipe composes its own m_A, one augmenting model; "
                         f"got {len(config.augment)} (two m_As are its recipe.baselines.two_augments row)")
    paths = {"anchor.model.path": config.anchor.model.path, "augment[0].model.path": config.augment[0].model.path,
             "anchor.model.tokenizer": config.anchor.model.tokenizer,
             "augment[0].model.tokenizer": config.augment[0].model.tokenizer,
             "data.train": config.data.train, "data.eval": config.data.eval}
    for key, value in paths.items():
        if value:
            raise ValueError(f"config key '{key}': the {NAME} recipe makes its own base models and data "
                             f"(recipe.anchor, recipe.augment, recipe.data) and fills this in; remove it")


def recipe_settings(config: Config) -> RecipeSettings:
    """The config's ``recipe:`` section as RecipeSettings; ValueError naming the key when it is wrong."""
    if config.recipe is None:
        raise ValueError(f"config has no 'recipe:' section; the {NAME} recipe needs recipe: {{name: {NAME}, ...}}")
    settings = build_section(RecipeSettings, config.recipe, "recipe.")
    _require(settings.name == NAME, "name", f"this is the {NAME} recipe, got {settings.name!r}")
    _validate_task(settings.data)
    for side in ("augment", "anchor"):
        _validate_base(getattr(settings, side), side)
    _validate_baselines(settings.baselines)
    return settings
