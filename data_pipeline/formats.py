"""Which kind of rows a dataset holds, told from its columns (as TRL does).

- ``text``: language modelling, loss on every token;
- ``prompt`` + ``completion``: loss on the completion only;
- ``messages``: a conversation rendered with the anchor tokenizer's chat template, loss on the
  assistant turns only.
"""
from __future__ import annotations

from enum import Enum
from typing import Iterable


class RowFormat(str, Enum):
    TEXT = "text"
    PROMPT_COMPLETION = "prompt_completion"
    MESSAGES = "messages"


ACCEPTED_COLUMNS = {
    RowFormat.MESSAGES: ("messages",),
    RowFormat.PROMPT_COMPLETION: ("prompt", "completion"),
    RowFormat.TEXT: ("text",),
}


def detect_format(columns: Iterable[str], source: str) -> RowFormat:
    """The row format of a dataset with ``columns``; ValueError naming what was found and what is accepted.
    Other columns are ignored."""
    present = set(columns)
    for row_format, needed in ACCEPTED_COLUMNS.items():
        if set(needed) <= present:
            return row_format
    accepted = "; ".join(" + ".join(repr(c) for c in needed) for needed in ACCEPTED_COLUMNS.values())
    hint = ""
    if "prompt" in present or "completion" in present:
        hint = " ('prompt' and 'completion' go together)"
    raise ValueError(
        f"{source}: no usable columns: found {sorted(present)}, accepted {accepted}{hint}. Rename columns with "
        "data.columns, e.g. data.columns: {instruction: prompt, output: completion}"
    )
