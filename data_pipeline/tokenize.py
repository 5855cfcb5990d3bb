"""Rows to token ids and labels with the model's own tokenizer.

Each row becomes one text and the character spans whose tokens carry loss; the text is encoded once,
with offsets, so tokens at a boundary are what the model sees at inference (no separate encodes of
prompt and completion). A token carries loss when it overlaps a loss span: a token that straddles the
prompt/completion boundary belongs to the completion, since producing it is part of producing the
completion. Special tokens the tokenizer adds (a BOS) have no width and never carry loss.

- ``text``: one span over the whole text, then EOS;
- ``prompt`` + ``completion``: text = prompt + completion, span = the completion, then EOS;
- ``messages``: text = the chat template's rendering; one span per assistant turn, from the end of the
  rendering of the turns before it (with the generation prompt) to the end of the rendering through
  it (so the template's end-of-turn tokens carry loss); no EOS added (the template ends turns).

Another model with a tokenizer of its own (an augmenting model) reads the same text: ``Retokenisation``
encodes each row's text with that tokenizer (its own special tokens, e.g. its BOS; no EOS: no anchor token
reads past the text), with every token's end offset in the text. Its tokens that reach further into the
text than the anchor's last kept token are never readable by any anchor token and are left out (after an
anchor truncation this is most of the row). Longer than its model's position limit, the row follows
``overlong``: ``drop`` drops it, ``truncate`` keeps that model's first ``max_length`` tokens (anchor tokens
past them then read only those).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from data_pipeline.formats import RowFormat

IGNORE_INDEX = -100
Span = tuple[int, int]


@dataclass(frozen=True)
class TokenizeSettings:
    max_length: int
    overlong: str = "drop"  # drop | truncate


@dataclass(frozen=True)
class Retokenisation:
    """Another tokenizer's encoding of every row's text, in columns ``<name>_input_ids`` and
    ``<name>_end_offsets``; ``max_length``: the reading model's position limit (None: none known)."""

    name: str
    tokenizer: Any
    max_length: int | None = None


class RowError(ValueError):
    """A row that cannot be tokenised; the message names the row."""


def _text(value: Any, what: str, row: int) -> str:
    if not isinstance(value, str):
        raise RowError(f"row {row}: {what} must be a string, got {type(value).__name__} {value!r:.80}")
    return value


def chat_spans(tokenizer, messages: Sequence[dict], row: int) -> tuple[str, list[Span]]:
    """The rendering of ``messages`` and the character span of every assistant turn in it."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise RowError(f"row {row}: messages must be a non-empty list of {{role, content}} mappings")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not {"role", "content"} <= set(message):
            raise RowError(f"row {row}: messages[{index}] must be a mapping with 'role' and 'content'")
    conversation = [{"role": m["role"], "content": m["content"]} for m in messages]
    text = tokenizer.apply_chat_template(conversation, tokenize=False)
    spans = []
    for index, message in enumerate(conversation):
        if message["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(conversation[:index], tokenize=False, add_generation_prompt=True) \
            if index else ""
        through = tokenizer.apply_chat_template(conversation[:index + 1], tokenize=False)
        if not (text.startswith(through) and through.startswith(before)):
            raise RowError(
                f"row {row}: the chat template does not render a conversation as the rendering of its first turns "
                "followed by the rest, so assistant turns cannot be located; use prompt/completion rows instead")
        spans.append((len(before), len(through)))
    if not spans:
        raise RowError(f"row {row}: the conversation has no assistant turn, so nothing to learn")
    return text, spans


def row_text_and_spans(row_format: RowFormat, row: dict, tokenizer, index: int) -> tuple[str, list[Span], bool]:
    """(text, loss spans, whether EOS follows) of one row."""
    if row_format == RowFormat.TEXT:
        text = _text(row["text"], "text", index)
        return text, [(0, len(text))], True
    if row_format == RowFormat.PROMPT_COMPLETION:
        prompt, completion = _text(row["prompt"], "prompt", index), _text(row["completion"], "completion", index)
        text = prompt + completion
        return text, [(len(prompt), len(text))], True
    text, spans = chat_spans(tokenizer, row["messages"], index)
    return text, spans, False


def _labels(ids: list[int], offsets: list[tuple[int, int]], spans: list[Span]) -> list[int]:
    labels = []
    for token, (start, end) in zip(ids, offsets):
        inside = end > start and any(end > low and start < high for low, high in spans)
        labels.append(token if inside else IGNORE_INDEX)
    return labels


def encode_rows(rows: dict[str, list], row_format: RowFormat, tokenizer, settings: TokenizeSettings,
                first_index: int = 0, others: Sequence[Retokenisation] = ()) -> dict[str, list]:
    """A ``datasets.map(batched=True)`` function: ``input_ids``, ``labels``, ``end_offsets`` (each token's
    end in its row's text), ``text``, and ``status`` (``kept``, ``truncated``, ``overlong``, ``unlabelled``
    or, with ``others``, ``other_dropped``: too long for another model, or not one token of it; the caller
    keeps ``kept`` and ``truncated`` rows). With ``others``: their columns, and ``others_truncated``
    (whether any of them was cut at its limit)."""
    count = len(next(iter(rows.values())))
    texts, all_spans, eos_after = [], [], []
    for offset in range(count):
        row = {name: values[offset] for name, values in rows.items()}
        text, spans, eos = row_text_and_spans(row_format, row, tokenizer, first_index + offset)
        texts.append(text)
        all_spans.append(spans)
        eos_after.append(eos)
    add_special = row_format != RowFormat.MESSAGES  # chat templates write their own special tokens, as HF does
    encoded = tokenizer(texts, add_special_tokens=add_special, return_offsets_mapping=True)
    eos_id = tokenizer.eos_token_id
    out: dict[str, list] = {"input_ids": [], "labels": [], "end_offsets": [], "text": texts, "status": []}
    for ids, offsets, spans, eos, text in zip(encoded["input_ids"], encoded["offset_mapping"], all_spans,
                                             eos_after, texts):
        ids, offsets = list(ids), [tuple(pair) for pair in offsets]
        labels = _labels(ids, offsets, spans)
        if eos and eos_id is not None:
            if ids and ids[-1] == eos_id:  # the tokenizer adds EOS itself
                labels[-1] = eos_id
            else:
                ids.append(eos_id)
                offsets.append((len(text), len(text)))
                labels.append(eos_id)
        status = "kept"
        if len(ids) > settings.max_length:
            status = "overlong"
            if settings.overlong == "truncate":
                ids, offsets, labels = ids[:settings.max_length], offsets[:settings.max_length], \
                    labels[:settings.max_length]
                status = "truncated"
        if status != "overlong" and all(label == IGNORE_INDEX for label in labels[1:]):
            status = "unlabelled"
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["end_offsets"].append([end for _, end in offsets])
        out["status"].append(status)
    if others:
        _retokenise(out, others, settings)
    return out


def _retokenise(out: dict[str, list], others: Sequence[Retokenisation], settings: TokenizeSettings) -> None:
    """Adds each other tokenizer's columns to ``encode_rows``'s output (in place)."""
    out["others_truncated"] = [False] * len(out["text"])
    for other in others:
        encoded = other.tokenizer(out["text"], add_special_tokens=True, return_offsets_mapping=True)
        ids_column, ends_column = [], []
        for row, (ids, offsets) in enumerate(zip(encoded["input_ids"], encoded["offset_mapping"])):
            ends = [end for _, end in offsets]
            anchor_end = max(out["end_offsets"][row], default=0)
            kept, reach = 0, 0
            for end in ends:  # a prefix: reach only grows
                reach = max(reach, end)
                if reach > anchor_end:
                    break
                kept += 1
            ids, ends = list(ids[:kept]), ends[:kept]
            if out["status"][row] in ("kept", "truncated"):
                if not ids:
                    out["status"][row] = "other_dropped"  # nothing of the text reaches this model
                elif other.max_length is not None and len(ids) > other.max_length:
                    if settings.overlong == "truncate":
                        ids, ends = ids[:other.max_length], ends[:other.max_length]
                        out["others_truncated"][row] = True
                    else:
                        out["status"][row] = "other_dropped"
            ids_column.append(ids)
            ends_column.append(ends)
        out[f"{other.name}_input_ids"] = ids_column
        out[f"{other.name}_end_offsets"] = ends_column
