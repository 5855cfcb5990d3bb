"""Exports: a trained composition as a directory that ``calm_dist.CALMForCausalLM.from_pretrained`` loads.

An export holds ``composition.safetensors`` (the fp32 bridge weights), ``config.json`` (``model_type:
calm``: each base model's path or hub id and sha256, each augmenting model's connections, relative_scale,
the anchor's token ids, free-form ``calm_metadata``), ``generation_config.json`` and the anchor's tokenizer
files (padding on the left, EOS as pad when it has none). ``save_composition`` writes one;
``load_exported`` returns its ``CALMModel`` (and still reads the older ``calm_export.json`` exports).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from calm_dist.model.composed import CALMModel, compose
from calm_dist.model.hf import (BaseModelRef, CALMConfig, CALMForCausalLM, ExportSpec, resolve_model_dir,
                                write_export_files)

LEGACY_WEIGHTS, LEGACY_INFO = "composition.safetensors", "calm_export.json"
BaseModel = str | os.PathLike | BaseModelRef


def save_composition(
    target_dir: str | os.PathLike,
    composition_state: Mapping[str, torch.Tensor],
    anchor: BaseModel,
    augments: Sequence[BaseModel],
    connections: Sequence[Sequence[tuple[int, int]]],
    *,
    relative_scale: bool = False,
    position_buckets: int = 0,
    tokenizer: str | os.PathLike | Any | None = None,
    metadata: Mapping[str, Any] | None = None,
    augment_tokenizers: Sequence[str | os.PathLike | Any | None] | None = None,
) -> Path:
    """Writes an export of a trained composition to ``target_dir``, atomically (a temporary sibling
    directory renamed into place, replacing any previous export there), and returns its path.

    - ``composition_state``: ``CALMModel.composition_state_dict()`` (or a checkpoint's consolidated
      ``bridges.*`` weights); written as fp32.
    - ``anchor``, ``augments`` (one per augmenting model, in bridge order): each a saved model directory
      or hub id, or a ``BaseModelRef`` whose sha256 (e.g. the one a checkpoint recorded) the weights must
      still have (ValueError otherwise). Local paths are recorded absolute.
    - ``connections``: one list of ``(augment_layer, anchor_layer)`` pairs per augmenting model
      (``CALMModel.augment_connections``).
    - ``relative_scale``, ``position_buckets``: the composition's (config ``composition.*``).
    - ``tokenizer``: the anchor's tokenizer, as a directory or a tokenizer object; default the anchor's
      directory (FileNotFoundError if it holds none).
    - ``metadata``: JSON-serialisable facts kept as ``config.json``'s ``calm_metadata`` (run, step, ...).
    - ``augment_tokenizers``: per augmenting model, its own tokenizer (directory or object) when it reads
      its own tokenisation (composed with ``shared_tokenizer=False``), None when it reads the anchor's ids;
      written to ``augment<i>/`` and named in ``config.json``, so the export generates with ``generate_text``.
      Required (ValueError otherwise) when an augmenting model's directory holds a tokenizer that differs
      from the anchor's (``tokenizer_difference``, as the generic job decides which models read their own
      tokens): the weights do not record which tokens the bridges were trained on, and guessing either way
      would write an export that generates wrongly. A directory without a tokenizer is taken to read the
      anchor's ids (its embedding size tells nothing: tokenizers often have tokens beyond a model's rows).
    """
    from transformers import AutoConfig

    if len(augments) != len(connections):
        raise ValueError(f"give one list of connections per augmenting model: {len(augments)} models, "
                         f"{len(connections)} lists")
    own_tokenizers = list(augment_tokenizers) if augment_tokenizers is not None else [None] * len(augments)
    if len(own_tokenizers) != len(augments):
        raise ValueError(f"augment_tokenizers: one entry per augmenting model ({len(augments)}; None = it reads the "
                         f"anchor's ids), got {len(own_tokenizers)}")
    _check_json(metadata)
    anchor_ref, anchor_dir = _identified(anchor, "anchor")
    identified = [_identified(model, f"augmenting model {index}") for index, model in enumerate(augments)]
    if augment_tokenizers is None:
        _refuse_unstated_own_tokenizers(tokenizer if tokenizer is not None else anchor_dir,
                                        [directory for _, directory in identified])
    spec = ExportSpec(
        anchor=anchor_ref,
        augments=tuple(ref for ref, _ in identified),
        connections=tuple(tuple((int(a), int(b)) for a, b in pairs) for pairs in connections),
        relative_scale=bool(relative_scale),
        position_buckets=int(position_buckets),
        own_tokenizer=tuple(own is not None for own in own_tokenizers) if any(own_tokenizers) else (),
    )
    anchor_config = AutoConfig.from_pretrained(anchor_dir)
    config = CALMConfig.from_spec(spec, anchor_config, metadata)
    target = Path(target_dir)
    temporary = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(temporary, ignore_errors=True)
    try:
        write_export_files(temporary, config, composition_state, _anchor_generation_config(anchor_dir, anchor_config),
                           tokenizer if tokenizer is not None else anchor_dir, own_tokenizers)
        if target.exists():
            shutil.rmtree(target)
        os.replace(temporary, target)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return target


def _identified(model: BaseModel, role: str) -> tuple[BaseModelRef, Path]:
    """The reference an export records for a base model, and its local directory."""
    from calm_dist.identity import weights_checksum

    given = model.path if isinstance(model, BaseModelRef) else str(model)
    directory = resolve_model_dir(given, f"the {role}")
    sha256 = weights_checksum(directory)
    if isinstance(model, BaseModelRef) and model.sha256 and model.sha256 != sha256:
        raise ValueError(f"the {role} at {given!r} has changed since the composition was trained: its weights have "
                         f"sha256 {sha256[:12]}…, the composition was trained over {model.sha256[:12]}…; restore "
                         "the original weights")
    recorded = str(Path(given).expanduser().resolve()) if Path(given).expanduser().is_dir() else given
    return BaseModelRef(recorded, sha256), directory


def _holds_tokenizer(directory: Path) -> bool:
    return any((directory / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json"))


def _refuse_unstated_own_tokenizers(anchor_tokenizer, augment_dirs: Sequence[Path]) -> None:
    """ValueError, naming the argument to pass, when ``augment_tokenizers`` was not given but an augmenting
    model's directory holds a tokenizer that differs from the anchor's. Nothing is refused when the anchor's
    tokenizer cannot be loaded (writing it fails later with its own message)."""
    from transformers import AutoTokenizer

    from calm_dist.model.alignment import tokenizer_difference

    if isinstance(anchor_tokenizer, (str, os.PathLike)):
        if not _holds_tokenizer(Path(anchor_tokenizer)):
            return
        anchor_tokenizer = AutoTokenizer.from_pretrained(anchor_tokenizer)
    for index, directory in enumerate(augment_dirs):
        if not _holds_tokenizer(directory):
            continue
        why = tokenizer_difference(anchor_tokenizer, AutoTokenizer.from_pretrained(directory))
        if why is None:
            continue
        entries = ["None"] * len(augment_dirs)
        entries[index] = repr(str(directory))
        raise ValueError(
            f"save_composition: augmenting model {index}'s directory {str(directory)!r} holds a tokenizer of its "
            f"own ({why}), so it may have read its own tokens or the anchor's ids, which the weights do not "
            f"record. Say which: augment_tokenizers=[{', '.join(entries)}] when it read its own tokenisation "
            "(composed with shared_tokenizer=False, as the generic job composes every model whose tokenizer "
            f"differs), or augment_tokenizers[{index}]=None when it read the anchor's ids (one entry per "
            "augmenting model; None = the anchor's ids)")


def _anchor_generation_config(anchor_dir: Path, anchor_config):
    from transformers import GenerationConfig

    if (anchor_dir / "generation_config.json").is_file():
        return GenerationConfig.from_pretrained(anchor_dir)
    return GenerationConfig.from_model_config(anchor_config.get_text_config())


def _check_json(metadata) -> None:
    try:
        json.dumps(dict(metadata or {}))
    except TypeError as error:
        raise ValueError(f"metadata must be JSON-serialisable (it goes into config.json): {error}") from None


def load_exported(path: str | os.PathLike, anchor_path: str | os.PathLike | None = None,
                  augment_path: str | os.PathLike | None = None, verify: bool = True,
                  augment_paths: Sequence[str | os.PathLike | None] | None = None) -> CALMModel:
    """The composed model (``CALMModel``) of an export, for evaluation and the greedy ``generate``; for
    sampling, streaming and pipelines load ``CALMForCausalLM.from_pretrained(path)`` instead (this returns
    its ``.calm``). Base models come from the recorded paths unless given (``augment_path``: the first
    augmenting model's; ``augment_paths``: one entry per model, None = recorded); with ``verify`` their
    weights must match the recorded sha256 (ValueError otherwise)."""
    path = Path(path)
    if not (path / "config.json").is_file() and (path / LEGACY_INFO).is_file():
        return _load_legacy(path, anchor_path, augment_path, verify)
    if augment_path is not None:
        if augment_paths is not None:
            raise ValueError("give augment_path (the first augmenting model) or augment_paths, not both")
        count = len(CALMForCausalLM.config_class.from_pretrained(path).augments or [None])
        augment_paths = [augment_path] + [None] * (count - 1)
    model = CALMForCausalLM.from_pretrained(path, anchor_path=anchor_path, augment_paths=augment_paths,
                                           verify_base_models=verify)
    return model.calm


def _load_legacy(path: Path, anchor_path, augment_path, verify: bool) -> CALMModel:
    """An export written before ``config.json`` exports: ``calm_export.json`` + ``composition.safetensors``."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from calm_dist.identity import weights_checksum

    def dir_key(model: int) -> str:
        return "augment" if model == 0 else f"augment_{model}"

    info = json.loads((path / LEGACY_INFO).read_text())
    chosen = {"anchor": anchor_path, "augment": augment_path}
    models = {}
    for side, recorded in info["base_models"].items():
        model_dir = Path(chosen.get(side) or recorded["path"])
        if verify and weights_checksum(model_dir) != recorded["sha256"]:
            raise ValueError(f"the {side} model at {model_dir} is not the one this composition was trained with "
                             f"(sha256 {recorded['sha256'][:12]}…); pass the original weights")
        models[side] = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    pairs = [tuple(pair) for pair in info["connections"]]
    sources = info.get("bridge_sources") or [0] * len(pairs)
    count = max(sources) + 1
    per_model = [[pair for pair, source in zip(pairs, sources) if source == model] for model in range(count)]
    augments = [models[dir_key(model)] for model in range(count)]
    model = compose(models["anchor"], augments if count > 1 else augments[0],
                    connections=per_model if count > 1 else per_model[0], relative_scale=info["relative_scale"])
    model.load_composition_state_dict(load_file(str(path / LEGACY_WEIGHTS)))
    return model.eval()
