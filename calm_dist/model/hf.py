"""A trained composition the Hugging Face way: ``CALMForCausalLM.from_pretrained(export_dir)``, ``generate``
with every option of ``GenerationMixin``, ``pipeline("text-generation")``.

An export directory is small, like a PEFT adapter's: the bridges (``composition.safetensors``), a
``config.json`` (``model_type: calm``) naming the base models by path or hub id with the sha256 of their
weights and each augmenting model's connections, a ``generation_config.json`` and the anchor's tokenizer
files. The base models are loaded from where the config says, or from the paths given at load time.

``CALMForCausalLM`` wraps the ``CALMModel`` (``model.calm``): its forward is ``CALMModel.step`` and
its cache a ``CALMCache`` holding both models' KV caches and every bridge's augment states, so
each generation step runs the new token only.

An augmenting model with a tokenizer of its own (composed with ``shared_tokenizer=False``) reads its own
tokenisation of the text, not the anchor's ids: the export keeps that tokenizer in ``augment<i>/`` (its
``config.json`` entry says ``"tokenizer": "augment<i>"``), and such a composition generates text with
``generate_text(prompts)`` (re-tokenising the growing text for that model each step); token-id ``generate``
and ``forward`` refuse it.
"""
from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, GenerationMixin, PreTrainedModel
from transformers import PretrainedConfig
from transformers.modeling_outputs import CausalLMOutputWithPast

from calm_dist.model.cache import CALMCache
from calm_dist.model.composed import CALMModel, compose
from calm_dist.model.export_files import WEIGHTS_NAME, write_export_files
from calm_dist.model.loss import causal_lm_loss
from calm_dist.model.wrapped_layer import ComposedDecoderLayer

MODEL_TYPE = "calm"


@dataclass(frozen=True)
class BaseModelRef:
    """A base model as an export names it: a saved model directory or a hub id, and the sha256 of its
    weights (``calm_dist.identity.weights_checksum``; None = not recorded, not checked)."""

    path: str
    sha256: str | None = None


@dataclass(frozen=True)
class ExportSpec:
    """What an export names: the anchor, the augmenting models in bridge order, each model's
    ``(augment_layer, anchor_layer)`` connections, and whether bridges scale by the anchor's RMS."""

    anchor: BaseModelRef
    augments: tuple[BaseModelRef, ...]
    connections: tuple[tuple[tuple[int, int], ...], ...]
    relative_scale: bool = False
    own_tokenizer: tuple[bool, ...] = ()  # per augmenting model: reads its own tokenizer's tokens (empty: none)
    position_buckets: int = 0  # the bridges' position logits (0: none)

    def __post_init__(self):
        if not self.augments or len(self.augments) != len(self.connections):
            raise ValueError(f"a composition needs at least one augmenting model and one list of connections per "
                             f"model: got {len(self.augments)} models and {len(self.connections)} connection lists")
        empty = [index for index, pairs in enumerate(self.connections) if not pairs]
        if empty:
            raise ValueError(f"augmenting models {empty} have no connections")
        if self.own_tokenizer and len(self.own_tokenizer) != len(self.augments):
            raise ValueError(f"own_tokenizer: one flag per augmenting model ({len(self.augments)}), "
                             f"got {len(self.own_tokenizer)}")


def augment_tokenizer_dir(index: int) -> str:
    """Where an export keeps augmenting model ``index``'s own tokenizer, relative to the export directory."""
    return f"augment{index}"


class CALMConfig(PretrainedConfig):
    """``config.json`` of an export. ``anchor``: ``{"path", "sha256"}``; ``augments``: one
    ``{"path", "sha256", "connections"}`` per augmenting model, in bridge order; the token ids and the
    vocabulary are the anchor's; ``calm_metadata`` is free-form (the run, the step, ...)."""

    model_type = MODEL_TYPE

    anchor: dict | None = None
    augments: list | None = None
    relative_scale: bool = False
    position_buckets: int = 0
    calm_metadata: dict | None = None
    vocab_size: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    tie_word_embeddings: bool = False
    use_cache: bool = True

    @classmethod
    def from_spec(cls, spec: ExportSpec, anchor_config=None, metadata: Mapping[str, Any] | None = None
                  ) -> "CALMConfig":
        """The config of ``spec``; token ids and vocabulary from ``anchor_config`` (the anchor's HF config)."""
        text = anchor_config.get_text_config() if anchor_config is not None else None
        tokens = {name: getattr(text, name, None) for name in ("vocab_size", "bos_token_id", "eos_token_id",
                                                               "pad_token_id")}
        return cls(
            anchor={"path": spec.anchor.path, "sha256": spec.anchor.sha256},
            augments=[{"path": ref.path, "sha256": ref.sha256, "connections": [list(pair) for pair in pairs],
                       **({"tokenizer": augment_tokenizer_dir(index)} if own else {})}
                      for index, (ref, pairs, own) in enumerate(zip(spec.augments, spec.connections,
                                                                    spec.own_tokenizer or [False] * len(spec.augments)))],
            relative_scale=bool(spec.relative_scale),
            position_buckets=int(spec.position_buckets),
            calm_metadata=dict(metadata or {}),
            architectures=["CALMForCausalLM"],
            **tokens,
        )

    def spec(self) -> ExportSpec:
        if not self.anchor or not self.augments:
            raise ValueError("this CALMConfig names no base models (anchor, augments): it is not a calm_dist export")
        return ExportSpec(
            anchor=BaseModelRef(self.anchor["path"], self.anchor.get("sha256")),
            augments=tuple(BaseModelRef(entry["path"], entry.get("sha256")) for entry in self.augments),
            connections=tuple(tuple((int(a), int(b)) for a, b in entry["connections"]) for entry in self.augments),
            relative_scale=bool(self.relative_scale),
            own_tokenizer=tuple(bool(entry.get("tokenizer")) for entry in self.augments)
            if any(entry.get("tokenizer") for entry in self.augments) else (),
            position_buckets=int(self.position_buckets or 0),
        )


def resolve_model_dir(name_or_path: str | os.PathLike, what: str) -> Path:
    """A local directory for a saved model given as a directory or a Hugging Face hub id (downloaded into
    the hub cache, or found there offline); FileNotFoundError naming ``what`` otherwise."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    name = str(name_or_path)
    if name.count("/") == 1 and not name.startswith((".", "/", "~")):
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(name))
        except Exception as error:  # noqa: BLE001 - the hub raises many kinds; all mean "not available"
            raise FileNotFoundError(f"{what} {name!r} is neither a directory nor a reachable hub model: {error}") \
                from error
    raise FileNotFoundError(f"{what} {name!r} does not exist")


def checked_base_dir(role: str, ref: BaseModelRef, override: str | os.PathLike | None, override_name: str,
                     verify: bool) -> Path:
    """The directory of one base model: ``override`` if given, else the recorded path; with ``verify`` its
    weights must have the recorded sha256 (ValueError naming the way out otherwise)."""
    from calm_dist.identity import weights_checksum

    given = override if override is not None else ref.path
    try:
        directory = resolve_model_dir(given, f"the {role} model")
    except FileNotFoundError as error:
        raise FileNotFoundError(f"{error}. The export records it at {ref.path!r}; if it moved, pass "
                                f"{override_name}=<its directory>") from None
    if verify and ref.sha256:
        found = weights_checksum(directory)
        if found != ref.sha256:
            raise ValueError(
                f"the {role} model at {str(directory)!r} is not the one this composition was trained with: its "
                f"weights have sha256 {found[:12]}…, the export records {ref.sha256[:12]}… ({ref.path!r}). Pass the "
                f"original weights ({override_name}=...), or verify_base_models=False to load over these anyway")
    return directory


class CALMForCausalLM(PreTrainedModel, GenerationMixin):
    """A composed model (``CALMModel``, as ``self.calm``) behind the ``transformers`` causal-LM interface.

    ``forward(input_ids, attention_mask, cache, use_cache, labels, logits_to_keep)`` returns a
    ``CausalLMOutputWithPast`` whose ``cache`` is a ``CALMCache``; ``generate`` is ``GenerationMixin``'s.
    Token ids feed both models (the augmenting models share the anchor's tokenizer), so ``inputs_embeds``
    is refused; positions come from the attention mask (left padding as Hugging Face models do it).
    A composition whose augmenting models have tokenizers of their own generates with ``generate_text``.
    """

    config_class = CALMConfig
    base_model_prefix = "calm"
    main_input_name = "input_ids"
    _no_split_modules = ["ComposedDecoderLayer"]

    def __init__(self, config: CALMConfig, calm: CALMModel):
        super().__init__(config)
        _check_wrappable(calm)
        self.calm = calm
        self.export_dir: Path | None = None  # set by from_pretrained: where its tokenizers are
        self.post_init()

    # The weights come from the base models and the export: there is nothing to initialise or tie, and the
    # generic initialisation would re-initialise the base models (they are PreTrainedModels too).
    def init_weights(self):
        pass

    def _init_weights(self, module):
        pass

    @classmethod
    def from_composed(cls, calm: CALMModel, anchor: BaseModelRef | str | None = None,
                      augments: Sequence[BaseModelRef | str] | None = None,
                      metadata: Mapping[str, Any] | None = None) -> "CALMForCausalLM":
        """Wraps an in-memory composition (e.g. right after training) for ``generate`` and ``pipeline``.
        ``anchor`` / ``augments`` (paths or refs) are only needed to ``save_pretrained`` it."""
        _check_wrappable(calm)
        anchor_ref = _as_ref(anchor)
        augment_refs = tuple(_as_ref(ref) for ref in augments) if augments is not None \
            else tuple(BaseModelRef("") for _ in calm.augments)
        spec = ExportSpec(anchor_ref, augment_refs,
                          tuple(tuple(pairs) for pairs in calm.augment_connections),
                          bool(calm.bridges[0].relative_scale),
                          tuple(calm.own_tokenizer) if any(calm.own_tokenizer) else (),
                          calm.position_buckets)
        model = cls(CALMConfig.from_spec(spec, calm.anchor.config, metadata), calm)
        model.generation_config = _generation_config_of(calm.anchor, model.config)
        return model.train(calm.training)

    def _prepare_cache_for_generation(self, generation_config, model_kwargs: dict, *args, **kwargs) -> None:
        """``generate``'s hook for its cache: a ``CALMCache`` instead of a ``DynamicCache``."""
        given = model_kwargs.get("cache")
        if given is not None:
            if not isinstance(given, CALMCache):
                raise ValueError(f"cache: a composed model generates with a CALMCache (model.calm.new_caches() or "
                                 f"one a previous call returned), got {type(given).__name__}")
            given._is_user_defined = True
            return
        if generation_config.use_cache is False:
            return
        if generation_config.cache_implementation not in (None, "dynamic"):
            raise ValueError(f"cache_implementation={generation_config.cache_implementation!r} is not supported: a "
                             "composed model keeps its own cache (both models' KV caches and the bridges' augment "
                             "states, grown in place); leave cache_implementation unset")
        model_kwargs["cache"] = self.calm.new_caches()
        if generation_config.is_assistant:
            model_kwargs["cache"].activate_past_recording()

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *model_args,
        anchor_path: str | os.PathLike | None = None,
        augment_paths: Sequence[str | os.PathLike | None] | None = None,
        verify_base_models: bool = True,
        dtype: torch.dtype | str | None = None,
        device_map: str | int | torch.device | dict | None = None,
        config: CALMConfig | None = None,
        **base_model_kwargs,
    ) -> "CALMForCausalLM":
        """Loads an export: the base models (from the recorded paths, or ``anchor_path`` /
        ``augment_paths`` — one entry per augmenting model, None keeps the recorded one), checked against
        the recorded sha256 unless ``verify_base_models=False``, composed with the exported bridges.

        ``dtype`` and ``device_map`` apply to every model (the bridges follow the anchor layer they feed);
        other keyword arguments (e.g. ``attn_implementation``) go to each base model's ``from_pretrained``.
        """
        if model_args:
            raise TypeError(f"CALMForCausalLM.from_pretrained takes no extra positional arguments, got {model_args}")
        for key in _AUTO_CLASS_KWARGS:  # what AutoModelForCausalLM adds; they concern the export, not the bases
            base_model_kwargs.pop(key, None)
        directory = resolve_model_dir(pretrained_model_name_or_path, "the export")
        if not isinstance(config, CALMConfig):
            config = _read_config(directory)
        spec = config.spec()
        overrides = _augment_overrides(augment_paths, len(spec.augments))
        anchor_dir = checked_base_dir("anchor", spec.anchor, anchor_path, "anchor_path", verify_base_models)
        augment_dirs = [checked_base_dir(f"augmenting model {index}", ref, override, f"augment_paths[{index}]",
                                         verify_base_models)
                        for index, (ref, override) in enumerate(zip(spec.augments, overrides))]
        load = dict(base_model_kwargs, dtype=dtype, device_map=_base_device_map(device_map))
        anchor = AutoModelForCausalLM.from_pretrained(anchor_dir, **load)
        augments = [AutoModelForCausalLM.from_pretrained(path, **load) for path in augment_dirs]
        calm = compose_spec(anchor, augments, spec)
        calm.load_composition_state_dict(_read_bridges(directory))
        bridge_dtype = dtype if isinstance(dtype, torch.dtype) else next(anchor.parameters()).dtype
        place_bridges(calm, bridge_dtype)
        model = cls(config, calm)
        model.name_or_path = str(pretrained_model_name_or_path)
        model.export_dir = directory
        model.generation_config = _read_generation_config(directory, anchor, config)
        return model.eval()

    def save_pretrained(self, save_directory: str | os.PathLike, *args, tokenizer=None, **kwargs) -> None:
        """Writes this composition as an export (bridges, config, generation config; the tokenizer if given).
        The base models are named by the paths this model was loaded or composed with."""
        spec = self.config.spec()
        missing = [name for name, ref in [("anchor", spec.anchor)] + [(f"augments[{i}]", ref) for i, ref in
                                                                       enumerate(spec.augments)] if not ref.path]
        if missing:
            raise ValueError(f"this model does not know where its base models {missing} are saved: build it with "
                             "CALMForCausalLM.from_composed(calm, anchor=<dir>, augments=[<dir>, ...])")
        write_export_files(Path(save_directory), self.config, self.calm.composition_state_dict(),
                           copy.deepcopy(self.generation_config), tokenizer, self._own_tokenizers_to_save())

    @property
    def own_tokenizer_models(self) -> list[int]:
        """The augmenting models that read their own tokenizer's tokens (not the anchor's ids)."""
        return [index for index, own in enumerate(self.calm.own_tokenizer) if own]

    def _refuse_token_ids(self, what: str) -> None:
        if self.own_tokenizer_models:
            raise ValueError(
                f"{what}: augmenting models {self.own_tokenizer_models} read their own tokenizer's tokens, which the "
                "anchor's token ids do not give; generate from text with model.generate_text(prompts, "
                "max_new_tokens=...) (or calm_dist.generate_text(model.calm, anchor_tokenizer, augment_tokenizers, "
                "prompts)), which re-tokenises the growing text for each of them")

    def generate(self, *args, **kwargs):
        self._refuse_token_ids("generate")
        return super().generate(*args, **kwargs)

    def augment_tokenizers(self, export_dir: str | os.PathLike | None = None) -> list:
        """Per augmenting model, its own tokenizer as the export keeps it (``augment<i>/``); None for a model
        that reads the anchor's ids. ``export_dir``: default the directory this model was loaded from."""
        from transformers import AutoTokenizer

        entries = self.config.augments or []
        if not any(entry.get("tokenizer") for entry in entries):
            return [None] * len(entries)
        directory = Path(export_dir) if export_dir is not None else getattr(self, "export_dir", None)
        if directory is None:
            raise ValueError("augment_tokenizers: this model was not loaded from an export; give export_dir, or "
                             "call calm_dist.generate_text with the augmenting models' tokenizers")
        return [None if not entry.get("tokenizer") else AutoTokenizer.from_pretrained(directory / entry["tokenizer"])
                for entry in entries]

    def generate_text(self, prompts: Sequence[str], max_new_tokens: int = 8, *, anchor_tokenizer=None,
                      augment_tokenizers: Sequence | None = None, **kwargs):
        """Greedy continuation of text ``prompts`` (``calm_dist.generate_text``): the anchor reads its own
        tokens, every augmenting model with a tokenizer of its own the growing text re-tokenised by that
        tokenizer, with caches kept for what a re-tokenisation left unchanged. Tokenizers default to the
        export's (the anchor's at its top level, each own one in ``augment<i>/``). Returns ``GeneratedText``."""
        from transformers import AutoTokenizer

        from calm_dist.model.generation import generate_text

        directory = getattr(self, "export_dir", None)
        if anchor_tokenizer is None:
            if directory is None:
                raise ValueError("generate_text: this model was not loaded from an export; give anchor_tokenizer "
                                 "(and augment_tokenizers)")
            if not any((directory / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
                raise ValueError(f"generate_text: the export at {directory} holds no anchor tokenizer (it was saved "
                                 "without one); give anchor_tokenizer")
            anchor_tokenizer = AutoTokenizer.from_pretrained(directory)
        if augment_tokenizers is None:
            augment_tokenizers = self.augment_tokenizers()
        return generate_text(self.calm, anchor_tokenizer, augment_tokenizers, prompts, max_new_tokens, **kwargs)

    def _own_tokenizers_to_save(self) -> list:
        if not self.own_tokenizer_models:
            return []
        directory = self.export_dir
        if directory is None:
            raise ValueError(f"augmenting models {self.own_tokenizer_models} read their own tokenizers, which this "
                             "model does not have: save it with calm_dist.export.save_composition(..., "
                             "augment_tokenizers=[...])")
        return [None if not entry.get("tokenizer") else directory / entry["tokenizer"] for entry in self.config.augments]

    def train(self, mode: bool = True):
        self.training = mode
        self.calm.train(mode)  # the base models stay in eval mode
        return self

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: CALMCache | None = None,
        use_cache: bool | None = None,
        labels: torch.LongTensor | None = None,
        logits_to_keep: int = 0,
        return_dict: bool | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        cache = kwargs.pop("past_key_values", cache)
        _refuse_unsupported_inputs(kwargs)
        self._refuse_token_ids("forward")
        if input_ids is None:
            raise ValueError("CALMForCausalLM needs input_ids: the anchor and the augmenting models both read them "
                             "(inputs_embeds cannot feed the augmenting models)")
        if use_cache is None:  # a training forward keeps no cache unless given one
            use_cache = cache is not None or (self.config.use_cache and not self.training)
        if cache is not None and not isinstance(cache, CALMCache):
            raise ValueError(f"cache must be the CALMCache a previous forward returned (or None), got "
                             f"{type(cache).__name__}; a composed model keeps both models' caches and the bridges'")
        if use_cache and cache is None:
            cache = self.calm.new_caches()
        if not use_cache:
            cache = None
        past = cache.get_seq_length() if cache is not None else 0
        if attention_mask is not None and (attention_mask.dim() != 2
                                           or attention_mask.shape[1] != past + input_ids.shape[1]):
            raise ValueError(f"attention_mask must be 2D [batch, cached + new tokens] = [{input_ids.shape[0]}, "
                             f"{past + input_ids.shape[1]}], got {tuple(attention_mask.shape)}")
        # None (generate drops an all-ones mask): no padding, so no model builds a padding mask
        output = self.calm.step(input_ids, attention_mask, caches=cache, logits_to_keep=logits_to_keep)
        loss = causal_lm_loss(output.logits, labels, attention_mask) if labels is not None else None
        result = CausalLMOutputWithPast(loss=loss, logits=output.logits, cache=cache)
        return result if return_dict is not False else result.to_tuple()


_AUTO_CLASS_KWARGS = ("_from_auto", "trust_remote_code", "adapter_kwargs", "cache_dir", "force_download",
                      "local_files_only", "proxies", "revision", "subfolder", "token", "_commit_hash")
_UNSUPPORTED_INPUTS = {
    "inputs_embeds": "the augmenting models read token ids, so CALMForCausalLM takes input_ids only",
    "position_ids": "positions come from the attention mask (left padding counts no positions)",
    "output_attentions": "attention weights of the composed model are not returned",
    "output_hidden_states": "hidden states of the composed model are not returned",
}


def _refuse_unsupported_inputs(kwargs: dict) -> None:
    """Inputs a causal LM may be given that a composed model cannot honour; others (``generate`` passes
    e.g. its tokenizer along) are ignored, as Hugging Face models ignore them."""
    for name, reason in _UNSUPPORTED_INPUTS.items():
        value = kwargs.get(name)
        if value is not None and value is not False:
            raise ValueError(f"{name}: {reason}")


def _check_wrappable(calm) -> None:
    if not isinstance(calm, CALMModel):
        raise TypeError(f"CALMForCausalLM wraps a CALMModel (calm_dist.compose(...)), got {type(calm).__name__}; "
                        "to load an export use CALMForCausalLM.from_pretrained(export_dir)")
    if calm.augments[0] is None:
        raise ValueError("CALMForCausalLM needs the augmenting models themselves (this CALMModel has none)")


def _as_ref(ref: BaseModelRef | str | os.PathLike | None) -> BaseModelRef:
    if ref is None:
        return BaseModelRef("")
    if isinstance(ref, BaseModelRef):
        return ref
    from calm_dist.identity import weights_checksum

    path = Path(ref)
    return BaseModelRef(str(path.resolve()), weights_checksum(path)) if path.is_dir() else BaseModelRef(str(ref))


def _augment_overrides(augment_paths, count: int) -> list:
    if augment_paths is None:
        return [None] * count
    if isinstance(augment_paths, (str, os.PathLike)):
        raise ValueError("augment_paths is a list with one entry per augmenting model (None = the recorded path), "
                         f"got the single path {str(augment_paths)!r}")
    overrides = list(augment_paths)
    if len(overrides) != count:
        raise ValueError(f"augment_paths: the export has {count} augmenting models, got {len(overrides)} paths "
                         "(use None for the ones that did not move)")
    return overrides


def _base_device_map(device_map):
    if isinstance(device_map, dict) and set(device_map) != {""}:
        raise ValueError("device_map: give a device, an automatic strategy (e.g. 'auto') or {'': device}; per-module "
                         "maps would name modules of the base models, which CALMForCausalLM loads separately")
    return device_map


def compose_spec(anchor, augments: Sequence, spec: ExportSpec) -> CALMModel:
    """The composition of ``spec`` over loaded base models."""
    shared = [not own for own in spec.own_tokenizer] if spec.own_tokenizer else True
    if len(augments) == 1:
        return compose(anchor, augments[0], connections=list(spec.connections[0]),
                       relative_scale=spec.relative_scale, shared_tokenizer=shared,
                       position_buckets=spec.position_buckets)
    return compose(anchor, list(augments), connections=[list(pairs) for pairs in spec.connections],
                   relative_scale=spec.relative_scale, shared_tokenizer=shared, position_buckets=spec.position_buckets)


def place_bridges(calm: CALMModel, dtype: torch.dtype) -> None:
    """Each bridge on the device of the anchor layer it feeds (models may be spread over devices), in ``dtype``."""
    from calm_dist.model.layers import find_decoder_layers

    layers = find_decoder_layers(calm.anchor)
    for bridge, (_, anchor_layer) in zip(calm.bridges, calm.connections):
        layer = layers[max(anchor_layer, 0)]
        inner = layer.layer if isinstance(layer, ComposedDecoderLayer) else layer
        device = next(inner.parameters()).device
        # an offloaded layer's weights sit on "meta" until its hook brings them in: keep the bridge where it is
        bridge.to(device=device if device.type != "meta" else None, dtype=dtype)


def _read_config(directory: Path) -> CALMConfig:
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{directory} is not a calm_dist export (no config.json); write one with "
                                "python -m launcher.export or calm_dist.export.save_composition")
    model_type = json.loads(config_file.read_text()).get("model_type")
    if model_type != MODEL_TYPE:
        raise ValueError(f"{directory} holds a {model_type!r} model, not a calm_dist export (model_type "
                         f"{MODEL_TYPE!r}); load it with transformers.AutoModelForCausalLM")
    return CALMConfig.from_pretrained(directory)


def _read_bridges(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"{directory} has no {WEIGHTS_NAME}: not a complete calm_dist export")
    return load_file(str(weights))


def _generation_config_of(anchor, config: CALMConfig) -> GenerationConfig:
    generation_config = getattr(anchor, "generation_config", None)
    return copy.deepcopy(generation_config) if generation_config is not None \
        else GenerationConfig.from_model_config(config)


def _read_generation_config(directory: Path, anchor, config: CALMConfig) -> GenerationConfig:
    if (directory / "generation_config.json").is_file():
        return GenerationConfig.from_pretrained(directory)
    return _generation_config_of(anchor, config)


def register_auto_classes() -> None:
    """``AutoConfig`` / ``AutoModelForCausalLM`` know ``model_type: calm`` (and pipelines list the class)."""
    AutoConfig.register(MODEL_TYPE, CALMConfig, exist_ok=True)
    AutoModelForCausalLM.register(CALMConfig, CALMForCausalLM, exist_ok=True)


register_auto_classes()
