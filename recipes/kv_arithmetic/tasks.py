"""Synthetic KV-arithmetic tasks (CALM paper, section 4.1), word-level format.

Every key and every number is one whitespace-separated token:
``kv_substitution``  "qz + abc - kkd =" -> "10 + 22 - 4"
``numeric_arithmetic`` "10 + 22 - 4 =" -> "28"
``kv_arithmetic``    "qz + abc - kkd =" -> "28"
"""

from __future__ import annotations

import itertools
import random
import string
from collections.abc import Collection, Mapping, Sequence
from typing import NamedTuple

TASKS = ("kv_substitution", "numeric_arithmetic", "kv_arithmetic")
OPERATORS = ("+", "-")

# Beyond this many candidate expressions, distinct sampling uses rejection
# instead of enumerating the whole expression space.
_ENUMERATION_LIMIT = 2_000_000


class KeySplit(NamedTuple):
    """Disjoint key subsets; each maps key -> value."""

    heldin: dict[str, int]
    val: dict[str, int]
    heldout: dict[str, int]


def number_token_range(value_max: int, max_operands: int) -> tuple[int, int]:
    """Smallest and largest integer any task can produce (both inclusive)."""
    return -(max_operands - 1) * value_max, max_operands * value_max


def make_keys(
    num_keys: int,
    *,
    seed: int,
    value_max: int,
    key_min_len: int = 2,
    key_max_len: int = 4,
) -> dict[str, int]:
    """``num_keys`` distinct random lowercase keys, each with a value in [0, value_max]."""
    if num_keys < 1:
        raise ValueError(f"num_keys must be >= 1, got {num_keys}")
    if value_max < 1:
        raise ValueError(f"value_max must be >= 1, got {value_max}")
    if not 1 <= key_min_len <= key_max_len:
        raise ValueError(
            f"need 1 <= key_min_len <= key_max_len, got key_min_len={key_min_len}, "
            f"key_max_len={key_max_len}"
        )
    capacity = sum(26**length for length in range(key_min_len, key_max_len + 1))
    if num_keys > capacity // 2:
        raise ValueError(
            f"num_keys={num_keys} is too many for key lengths {key_min_len}..{key_max_len} "
            f"({capacity} possible strings); raise key_max_len or lower num_keys"
        )
    rng = random.Random(seed)
    keys: dict[str, int] = {}
    while len(keys) < num_keys:
        length = rng.randint(key_min_len, key_max_len)
        key = "".join(rng.choices(string.ascii_lowercase, k=length))
        if key not in keys:
            keys[key] = rng.randint(0, value_max)
    return keys


def split_keys(
    keys: Mapping[str, int],
    *,
    seed: int,
    heldin_fraction: float = 0.2,
    val_fraction: float = 0.0,
) -> KeySplit:
    """Shuffle ``keys`` with ``seed`` and cut them into held-in / validation / held-out."""
    if not 0.0 < heldin_fraction <= 1.0:
        raise ValueError(f"heldin_fraction must be in (0, 1], got {heldin_fraction}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if heldin_fraction + val_fraction > 1.0:
        raise ValueError(
            f"heldin_fraction + val_fraction must be <= 1, got "
            f"{heldin_fraction} + {val_fraction}"
        )
    names = list(keys)
    random.Random(seed).shuffle(names)
    n_heldin = round(heldin_fraction * len(names))
    n_val = round(val_fraction * len(names))
    if n_heldin == 0 or (val_fraction > 0 and n_val == 0):
        raise ValueError(
            f"{len(names)} keys are too few for heldin_fraction={heldin_fraction}, "
            f"val_fraction={val_fraction}: a subset would be empty; raise num_keys"
        )
    parts = (names[:n_heldin], names[n_heldin : n_heldin + n_val], names[n_heldin + n_val :])
    heldin, val, heldout = ({name: keys[name] for name in part} for part in parts)
    return KeySplit(heldin, val, heldout)


def evaluate(operands: Sequence[int], ops: Sequence[str]) -> int:
    """Left-to-right value of ``operands[0] ops[0] operands[1] ...``."""
    assert len(ops) == len(operands) - 1
    total = operands[0]
    for op, value in zip(ops, operands[1:]):
        total = total + value if op == "+" else total - value
    return total


def _layout(tokens: Sequence[object], ops: Sequence[str]) -> str:
    words = [str(tokens[0])]
    for op, token in zip(ops, tokens[1:]):
        words += [op, str(token)]
    return " ".join(words)


def format_example(
    task: str, operands: Sequence[str | int], ops: Sequence[str], keys: Mapping[str, int]
) -> dict[str, str]:
    """Build one ``{"prompt", "answer"}`` example; operands are keys or ints by task."""
    if task == "numeric_arithmetic":
        values = [int(v) for v in operands]
        return {"prompt": _layout(values, ops) + " =", "answer": str(evaluate(values, ops))}
    values = [keys[str(k)] for k in operands]
    answer = _layout(values, ops) if task == "kv_substitution" else str(evaluate(values, ops))
    return {"prompt": _layout(operands, ops) + " =", "answer": answer}


def _check_task_args(task: str, keys, value_max: int, min_operands: int, max_operands: int):
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    if not 1 <= min_operands <= max_operands:
        raise ValueError(
            f"need 1 <= min_operands <= max_operands, got {min_operands}, {max_operands}"
        )
    if value_max < 1:
        raise ValueError(f"value_max must be >= 1, got {value_max}")
    if task == "numeric_arithmetic":
        return
    if not keys:
        raise ValueError(f"task {task!r} needs a non-empty `keys` mapping (key -> value)")
    bad = next((k for k, v in keys.items() if not 0 <= v <= value_max), None)
    if bad is not None:
        raise ValueError(
            f"key {bad!r} has value {keys[bad]} outside [0, value_max={value_max}]; "
            f"pass the value_max the keys were made with"
        )


def _operand_pool(task: str, keys: Mapping[str, int] | None, value_max: int) -> list:
    if task == "numeric_arithmetic":
        return list(range(value_max + 1))
    return list(keys)


def expression_space_size(pool_size: int, min_operands: int, max_operands: int) -> int:
    """Number of distinct expressions over ``pool_size`` operands."""
    return sum(
        pool_size**k * len(OPERATORS) ** (k - 1) for k in range(min_operands, max_operands + 1)
    )


def _random_expression(rng: random.Random, pool: list, min_ops: int, max_ops: int,
                       operand_weights: Sequence[float] | None = None):
    if operand_weights is None:
        count = rng.randint(min_ops, max_ops)
    else:
        count = rng.choices(range(min_ops, max_ops + 1), weights=operand_weights)[0]
    operands = [rng.choice(pool) for _ in range(count)]
    ops = [rng.choice(OPERATORS) for _ in range(count - 1)]
    return operands, ops


def _all_expressions(pool: list, min_ops: int, max_ops: int):
    for count in range(min_ops, max_ops + 1):
        for ops in itertools.product(OPERATORS, repeat=count - 1):
            for operands in itertools.product(pool, repeat=count):
                yield operands, ops


def make_examples(
    task: str,
    n: int,
    *,
    seed: int,
    value_max: int,
    keys: Mapping[str, int] | None = None,
    min_operands: int = 2,
    max_operands: int = 3,
    distinct: bool = False,
    exclude: Collection[str] = (),
    operand_weights: Sequence[float] | None = None,
) -> list[dict[str, str]]:
    """``n`` examples of ``task`` whose key operands come from ``keys``.

    ``distinct=False`` samples with replacement (training sets), none of them in ``exclude``; the
    number of operands is uniform over min..max, or drawn with ``operand_weights`` (one per count).
    ``distinct=True`` returns ``n`` different prompts, none of them in ``exclude`` (evaluation
    sets), and raises ValueError when the expression space cannot supply that many.
    """
    _check_task_args(task, keys, value_max, min_operands, max_operands)
    _check_operand_weights(operand_weights, min_operands, max_operands, distinct)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(f"{task}:{seed}")  # str seeds are hashed with sha512: stable
    pool = _operand_pool(task, keys, value_max)
    space = expression_space_size(len(pool), min_operands, max_operands)
    excluded = set(exclude)
    if not distinct:
        if len(excluded) >= space:
            raise ValueError(f"cannot draw {task} prompts: all {space} distinct expressions are excluded")
        return _drawn_with_replacement(task, n, rng, pool, keys or {}, (min_operands, max_operands), excluded,
                                       operand_weights)
    if n > space:
        raise ValueError(
            f"cannot draw {n} distinct {task} prompts: only {space} distinct expressions "
            f"exist over {len(pool)} operands; lower n, or add keys / raise value_max / "
            f"max_operands"
        )
    sampler = _distinct_by_enumeration
    if 2 * (n + len(excluded)) <= space or space > _ENUMERATION_LIMIT:
        sampler = _distinct_by_rejection
    return sampler(task, n, rng, pool, keys or {}, (min_operands, max_operands), excluded, space)


def operand_weights_are_valid(weights: Sequence[float], min_ops: int, max_ops: int) -> bool:
    """One weight >= 0 per operand count min_ops..max_ops, not all zero."""
    return len(weights) == max_ops - min_ops + 1 and min(weights) >= 0 and sum(weights) > 0


def _check_operand_weights(weights: Sequence[float] | None, min_ops: int, max_ops: int, distinct: bool) -> None:
    if weights is None:
        return
    if distinct:
        raise ValueError("operand_weights shape training draws only; distinct (evaluation) sets stay uniform")
    if not operand_weights_are_valid(weights, min_ops, max_ops):
        raise ValueError(f"operand_weights needs one weight >= 0 per operand count {min_ops}..{max_ops}, "
                         f"not all zero; got {list(weights)}")


def _drawn_with_replacement(task, n, rng, pool, keys, operand_range, excluded, operand_weights=None):
    examples: list[dict[str, str]] = []
    while len(examples) < n:
        example = format_example(task, *_random_expression(rng, pool, *operand_range, operand_weights), keys)
        if example["prompt"] not in excluded:
            examples.append(example)
    return examples


def _distinct_by_rejection(task, n, rng, pool, keys, operand_range, excluded, space):
    examples: list[dict[str, str]] = []
    seen = set(excluded)
    attempts, max_attempts = 0, 50 * n + 1000
    while len(examples) < n:
        attempts += 1
        if attempts > max_attempts:
            raise ValueError(
                f"could not find {n} distinct {task} prompts outside the {len(excluded)} "
                f"excluded ones (expression space {space}); lower n or add keys"
            )
        example = format_example(task, *_random_expression(rng, pool, *operand_range), keys)
        if example["prompt"] not in seen:
            seen.add(example["prompt"])
            examples.append(example)
    return examples


def _distinct_by_enumeration(task, n, rng, pool, keys, operand_range, excluded, space):
    every_example = (
        format_example(task, operands, ops, keys)
        for operands, ops in _all_expressions(pool, *operand_range)
    )
    candidates = [example for example in every_example if example["prompt"] not in excluded]
    if len(candidates) < n:
        raise ValueError(
            f"cannot draw {n} distinct {task} prompts: only {len(candidates)} of the "
            f"{space} possible expressions are not excluded; lower n or add keys"
        )
    return rng.sample(candidates, n)


def make_train_eval(
    task: str,
    n_train: int,
    n_eval: int,
    *,
    seed: int,
    value_max: int,
    train_keys: Mapping[str, int] | None = None,
    eval_keys: Mapping[str, int] | None = None,
    min_operands: int = 2,
    max_operands: int = 3,
    exclude: Collection[str] = (),
    train_operand_weights: Sequence[float] | None = None,
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """A training set (with replacement) and a distinct evaluation set disjoint from it.

    ``eval_keys`` defaults to ``train_keys``; evaluation prompts also avoid ``exclude``. The training
    set's operand counts follow ``train_operand_weights``; the evaluation set's are uniform.
    """
    common = dict(value_max=value_max, min_operands=min_operands, max_operands=max_operands)
    train = make_examples(task, n_train, seed=seed, keys=train_keys, operand_weights=train_operand_weights,
                          **common)
    train_prompts = {example["prompt"] for example in train}
    evaluation = make_examples(
        task,
        n_eval,
        seed=seed + 1,
        keys=train_keys if eval_keys is None else eval_keys,
        distinct=True,
        exclude=train_prompts.union(exclude),
        **common,
    )
    return train, evaluation


def make_mixed_substitution(
    n: int,
    *,
    seed: int,
    value_max: int,
    keys: Mapping[str, int],
    number_prob: float,
    min_operands: int = 2,
    max_operands: int = 3,
) -> list[dict[str, str]]:
    """KV-Substitution where each operand is a number literal with probability ``number_prob``.

    A number substitutes to itself (``"qz + 7 =" -> "10 + 7"``), so a model trained on this reads
    numbers and keys alike as values, without ever seeing arithmetic.
    """
    _check_task_args("kv_substitution", keys, value_max, min_operands, max_operands)
    if not 0.0 <= number_prob <= 1.0:
        raise ValueError(f"number_prob must be in [0, 1], got {number_prob}")
    rng = random.Random(f"mixed_substitution:{seed}")
    key_pool = list(keys)
    examples = []
    for _ in range(n):
        count = rng.randint(min_operands, max_operands)
        operands = [str(rng.randint(0, value_max)) if rng.random() < number_prob else rng.choice(key_pool)
                    for _ in range(count)]
        ops = [rng.choice(OPERATORS) for _ in range(count - 1)]
        values = [int(o) if o.lstrip("-").isdigit() else keys[o] for o in operands]
        examples.append({"prompt": _layout(operands, ops) + " =", "answer": _layout(values, ops)})
    return examples
