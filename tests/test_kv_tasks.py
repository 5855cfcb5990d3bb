"""The KV-arithmetic recipe's task generators, key splits and word-level tokenizer."""

from __future__ import annotations

import dataclasses
import json

import pytest
from transformers import AutoTokenizer

import data_pipeline as dp
from recipes.kv_arithmetic import tasks
from recipes.kv_arithmetic.settings import TaskSettings
from recipes.kv_arithmetic.task_data import KeyCounts, TaskFiles, max_length, prepare_task_files
from recipes.kv_arithmetic.tokenizer import SPECIAL_TOKENS, build_tokenizer, load_tokenizer, save_tokenizer

VALUE_MAX = 20
MAX_OPERANDS = 3


@pytest.fixture(scope="module")
def keys():
    return tasks.make_keys(60, seed=7, value_max=VALUE_MAX)


@pytest.fixture(scope="module")
def tokenizer(keys):
    return build_tokenizer(keys, value_max=VALUE_MAX, max_operands=MAX_OPERANDS)


def test_keys_are_deterministic_distinct_and_well_formed():
    first = tasks.make_keys(200, seed=3, value_max=VALUE_MAX)
    assert first == tasks.make_keys(200, seed=3, value_max=VALUE_MAX)
    assert list(first) == list(tasks.make_keys(200, seed=3, value_max=VALUE_MAX))
    assert first != tasks.make_keys(200, seed=4, value_max=VALUE_MAX)
    assert len(first) == 200
    for key, value in first.items():
        assert 2 <= len(key) <= 4 and key.isalpha() and key.islower()
        assert 0 <= value <= VALUE_MAX
    lengths = tasks.make_keys(50, seed=0, value_max=5, key_min_len=5, key_max_len=6)
    assert {len(key) for key in lengths} <= {5, 6}


def test_make_keys_rejects_impossible_requests():
    with pytest.raises(ValueError, match="num_keys"):
        tasks.make_keys(400, seed=0, value_max=9, key_min_len=2, key_max_len=2)
    with pytest.raises(ValueError, match="key_min_len"):
        tasks.make_keys(10, seed=0, value_max=9, key_min_len=3, key_max_len=2)
    with pytest.raises(ValueError, match="value_max"):
        tasks.make_keys(10, seed=0, value_max=0)


def test_split_fractions_are_exact_disjoint_and_seeded():
    keys = tasks.make_keys(100, seed=0, value_max=VALUE_MAX)
    split = tasks.split_keys(keys, seed=1, heldin_fraction=0.2, val_fraction=0.1)
    assert (len(split.heldin), len(split.val), len(split.heldout)) == (20, 10, 70)
    assert not set(split.heldin) & set(split.val)
    assert not set(split.heldin) & set(split.heldout)
    assert not set(split.val) & set(split.heldout)
    assert {**split.heldin, **split.val, **split.heldout} == keys
    assert split == tasks.split_keys(keys, seed=1, heldin_fraction=0.2, val_fraction=0.1)
    assert split.heldin != tasks.split_keys(keys, seed=2, heldin_fraction=0.2).heldin
    default = tasks.split_keys(keys, seed=1)
    assert (len(default.heldin), len(default.val), len(default.heldout)) == (20, 0, 80)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"heldin_fraction": 0.0}, "heldin_fraction"),
        ({"heldin_fraction": 0.8, "val_fraction": 0.3}, "val_fraction"),
        ({"val_fraction": -0.1}, "val_fraction"),
        ({"heldin_fraction": 0.01}, "too few"),
    ],
)
def test_split_rejects_bad_fractions(kwargs, field):
    keys = tasks.make_keys(20, seed=0, value_max=VALUE_MAX)
    with pytest.raises(ValueError, match=field):
        tasks.split_keys(keys, seed=0, **kwargs)


def parse_expression(text):
    words = text.split()
    return words[0::2], words[1::2]


@pytest.mark.parametrize("task", tasks.TASKS)
def test_answers_are_correct(task, keys):
    examples = tasks.make_examples(task, 300, seed=0, value_max=VALUE_MAX, keys=keys)
    counts, operators = set(), set()
    for example in examples:
        assert example.keys() == {"prompt", "answer"}
        assert example["prompt"].endswith(" =")
        operands, ops = parse_expression(example["prompt"][: -len(" =")])
        counts.add(len(operands))
        operators.update(ops)
        if task == "numeric_arithmetic":
            values = [int(word) for word in operands]
            assert all(0 <= value <= VALUE_MAX for value in values)
        else:
            values = [keys[word] for word in operands]
        expected = values[0]
        for op, value in zip(ops, values[1:]):
            expected = expected + value if op == "+" else expected - value
        if task == "kv_substitution":
            assert parse_expression(example["answer"]) == ([str(v) for v in values], ops)
        else:
            assert example["answer"] == str(expected)
    assert counts == {2, 3}
    assert operators == {"+", "-"}


def test_examples_are_deterministic_per_seed(keys):
    make = lambda seed: tasks.make_examples("kv_substitution", 50, seed=seed,  # noqa: E731
                                         value_max=VALUE_MAX, keys=keys)
    assert make(0) == make(0)
    assert make(0) != make(1)


def test_negative_results_fit_the_number_tokens(tokenizer):
    low, high = tasks.number_token_range(VALUE_MAX, MAX_OPERANDS)
    assert (low, high) == (-40, 60)
    examples = tasks.make_examples("numeric_arithmetic", 2000, seed=0, value_max=VALUE_MAX)
    answers = [int(example["answer"]) for example in examples]
    assert min(answers) < 0
    assert all(low <= answer <= high for answer in answers)
    for number in (low, -7, 0, high):
        assert len(tokenizer.encode(str(number), add_special_tokens=False)) == 1


def test_eval_set_is_distinct_and_disjoint_from_train(keys):
    excluded = {example["prompt"] for example in tasks.make_examples(
        "kv_arithmetic", 100, seed=9, value_max=VALUE_MAX, keys=keys)}
    train, evaluation = tasks.make_train_eval(
        "kv_arithmetic", 3000, 500, seed=0, value_max=VALUE_MAX, train_keys=keys,
        exclude=excluded,
    )
    train_prompts = {example["prompt"] for example in train}
    eval_prompts = [example["prompt"] for example in evaluation]
    assert len(train) == 3000 and len(evaluation) == 500
    assert len(set(eval_prompts)) == 500
    assert not set(eval_prompts) & train_prompts
    assert not set(eval_prompts) & excluded


def test_disjoint_key_subsets_give_disjoint_prompts(keys):
    split = tasks.split_keys(keys, seed=0)
    train, evaluation = tasks.make_train_eval(
        "kv_arithmetic", 200, 100, seed=0, value_max=VALUE_MAX,
        train_keys=split.heldin, eval_keys=split.heldout,
    )
    assert all(set(parse_expression(e["prompt"][:-2])[0]) <= set(split.heldin) for e in train)
    assert all(set(parse_expression(e["prompt"][:-2])[0]) <= set(split.heldout)
               for e in evaluation)


def test_distinct_sampling_raises_when_space_is_too_small():
    keys = {"ab": 1, "cd": 2}
    small = dict(seed=0, value_max=VALUE_MAX, keys=keys, min_operands=2, max_operands=2)
    assert tasks.expression_space_size(2, 2, 2) == 8
    everything = tasks.make_examples("kv_arithmetic", 8, distinct=True, **small)
    assert len({example["prompt"] for example in everything}) == 8
    with pytest.raises(ValueError, match="distinct"):
        tasks.make_examples("kv_arithmetic", 9, distinct=True, **small)
    with pytest.raises(ValueError, match="excluded"):
        tasks.make_examples("kv_arithmetic", 8, distinct=True, exclude={"ab + cd ="}, **small)
    assert len(tasks.make_examples("kv_arithmetic", 20, **small)) == 20  # with replacement


def test_task_argument_errors(keys):
    with pytest.raises(ValueError, match="unknown task"):
        tasks.make_examples("kv_multiplication", 1, seed=0, value_max=VALUE_MAX, keys=keys)
    with pytest.raises(ValueError, match="keys"):
        tasks.make_examples("kv_arithmetic", 1, seed=0, value_max=VALUE_MAX)
    with pytest.raises(ValueError, match="min_operands"):
        tasks.make_examples("numeric_arithmetic", 1, seed=0, value_max=VALUE_MAX,
                         min_operands=3, max_operands=2)
    with pytest.raises(ValueError, match="value_max"):
        tasks.make_examples("kv_arithmetic", 1, seed=0, value_max=5, keys={"ab": 9})


# ---------------------------------------------------------------- tokenizer


def test_tokenizer_vocabulary_layout(keys, tokenizer):
    low, high = tasks.number_token_range(VALUE_MAX, MAX_OPERANDS)
    ids = tokenizer.convert_tokens_to_ids
    assert [ids(t) for t in ("<pad>", "<bos>", "<eos>", "<unk>", "+", "-", "=")] == list(range(7))
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id,
            tokenizer.unk_token_id) == (0, 1, 2, 3)
    assert ids(str(low)) == 7 and ids(str(high)) == 7 + high - low
    assert [ids(key) for key in keys] == list(range(8 + high - low, len(tokenizer)))
    assert len(tokenizer) == 7 + (high - low + 1) + len(keys)


def test_every_key_and_number_is_one_token_and_round_trips(keys, tokenizer):
    low, high = tasks.number_token_range(VALUE_MAX, MAX_OPERANDS)
    for word in [*keys, *map(str, range(low, high + 1)), "+", "-", "="]:
        ids = tokenizer.encode(word, add_special_tokens=False)
        assert len(ids) == 1 and ids[0] != tokenizer.unk_token_id, word
    for task in tasks.TASKS:
        for example in tasks.make_examples(task, 20, seed=0, value_max=VALUE_MAX, keys=keys):
            text = f"{example['prompt']} {example['answer']}"
            ids = tokenizer.encode(text, add_special_tokens=False)
            assert len(ids) == len(text.split()) and tokenizer.unk_token_id not in ids
            assert tokenizer.decode(ids) == text


def test_tokenizer_puts_bos_first_and_nothing_else(tokenizer):
    encoded = tokenizer("+ 3 =", return_offsets_mapping=True)
    assert encoded["input_ids"] == [tokenizer.bos_token_id] + tokenizer.encode("+ 3 =", add_special_tokens=False)
    assert encoded["offset_mapping"][0] == (0, 0)  # BOS has no width: it never carries loss
    assert tokenizer.eos_token_id not in encoded["input_ids"]
    assert tokenizer.bos_token_id not in tokenizer.encode("+ 3 =", add_special_tokens=False)


@pytest.mark.parametrize("bad", ["Ab", "a1", "a b"])
def test_build_tokenizer_rejects_bad_keys(bad):
    with pytest.raises(ValueError, match="lowercase"):
        build_tokenizer([bad], value_max=3, max_operands=2)


def test_saved_tokenizer_loads_as_itself_with_auto_tokenizer(tmp_path, keys, tokenizer):
    directory = save_tokenizer(tokenizer, tmp_path / "tok")
    text = " ".join(list(keys)[:3]) + " + -7 ="
    for loaded in (AutoTokenizer.from_pretrained(directory), load_tokenizer(directory)):
        assert loaded.backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()
        assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
        assert tuple(loaded.convert_ids_to_tokens(list(range(4)))) == SPECIAL_TOKENS
        assert (loaded.pad_token, loaded.bos_token, loaded.eos_token) == ("<pad>", "<bos>", "<eos>")
    other = build_tokenizer(tasks.make_keys(60, seed=8, value_max=VALUE_MAX), value_max=VALUE_MAX,
                            max_operands=MAX_OPERANDS)
    save_tokenizer(other, directory)  # replaces the old one
    assert json.loads((directory / "tokenizer.json").read_text()) == json.loads(other.backend_tokenizer.to_str())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tok"]


def test_load_tokenizer_missing_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_tokenizer(tmp_path / "nowhere")


def test_mixed_substitution_reads_numbers_as_their_own_values(keys):
    examples = tasks.make_mixed_substitution(400, seed=3, value_max=VALUE_MAX, keys=keys, number_prob=0.5)
    numbers = keys_seen = 0
    for example in examples:
        words, answer = example["prompt"].split()[:-1], example["answer"].split()
        assert len(words) == len(answer)
        for word, value in zip(words, answer):
            if word in "+-":
                assert value == word
            elif word.isdigit():
                numbers += 1
                assert value == word
            else:
                keys_seen += 1
                assert int(value) == keys[word]
    assert numbers > 200 and keys_seen > 200
    assert tasks.make_mixed_substitution(5, seed=3, value_max=VALUE_MAX, keys=keys, number_prob=0.0)[0]["prompt"][0].isalpha()
    with pytest.raises(ValueError, match="number_prob"):
        tasks.make_mixed_substitution(5, seed=3, value_max=VALUE_MAX, keys=keys, number_prob=1.5)


# ---------------------------------------------------------------- the recipe's dataset files

SMALL = TaskSettings(num_keys=40, value_max=5, base_train_examples=300, composition_train_examples=300,
                     composition_numeric_fraction=0.2, val_fraction=0.1, eval_examples=16)


def operands(prompt: str) -> list[str]:
    return prompt[: -len(" =")].split()[0::2]


def used_keys(row: dict) -> list[str]:
    return [word for word in operands(row["prompt"]) if word.isalpha()]


def read(files: TaskFiles, split: str) -> list[dict]:
    return [json.loads(line) for line in files.path(split).read_text().splitlines()]


@pytest.fixture(scope="module")
def task_files(tmp_path_factory):
    return prepare_task_files(tmp_path_factory.mktemp("cache"), SMALL, seed=0)


def test_task_files_keep_the_papers_structure(task_files):
    keys = tasks.make_keys(SMALL.num_keys, seed=0, value_max=SMALL.value_max)
    split = tasks.split_keys(keys, seed=0, heldin_fraction=SMALL.heldin_fraction, val_fraction=SMALL.val_fraction)
    assert task_files.key_counts == KeyCounts(8, 4, 28)
    assert task_files.eval_sets == ["kv_substitution", "numeric_arithmetic", "kv_arithmetic", "kv_arithmetic_heldin",
                                    "kv_arithmetic_val"]
    rows = {name: read(task_files, name) for name in ("augment_train", "anchor_train", "composition_train",
                                                      *task_files.eval_sets)}
    for name, split_rows in rows.items():
        assert all(set(r) == {"prompt", "completion"} and r["prompt"].endswith(" =")
                   and r["completion"].startswith(" ") and not r["completion"].startswith("  ")
                   for r in split_rows), name
    used = {name: {word for r in split_rows for word in operands(r["prompt"]) if word.isalpha()}
            for name, split_rows in rows.items()}
    assert used["augment_train"] == set(keys)  # m_A learns every key
    assert used["anchor_train"] == set() == used["numeric_arithmetic"]  # m_B never sees a key
    assert used["composition_train"] <= set(split.heldin)  # D_C: held-in keys only
    assert used["kv_arithmetic"] <= set(split.heldout) and used["kv_substitution"] <= set(split.heldout)
    assert used["kv_arithmetic_heldin"] <= set(split.heldin) and used["kv_arithmetic_val"] <= set(split.val)
    numeric_in_dc = [r for r in rows["composition_train"] if not used_keys(r)]
    assert len(numeric_in_dc) == round(0.2 * SMALL.composition_train_examples)
    assert {r["prompt"] for r in numeric_in_dc} <= {r["prompt"] for r in rows["anchor_train"]}
    seen_in_training = {r["prompt"] for r in rows["anchor_train"] + rows["composition_train"]}
    for name in task_files.eval_sets:
        assert len(rows[name]) == SMALL.eval_examples
        assert not {r["prompt"] for r in rows[name]} & seen_in_training, name


def test_fresh_numeric_examples_in_dc_reach_beyond_m_bs_data_but_never_the_evaluation(tmp_path):
    settings = dataclasses.replace(SMALL, composition_train_examples=2000, composition_numeric_fraction=0.5,
                                   composition_numeric_fresh=True)
    files = prepare_task_files(tmp_path, settings, seed=0)
    numeric_rows = [r["prompt"] for r in read(files, "composition_train") if not used_keys(r)]
    numeric_in_dc, anchor_train = set(numeric_rows), {r["prompt"] for r in read(files, "anchor_train")}
    assert len(numeric_rows) == 1000
    assert numeric_in_dc - anchor_train and numeric_in_dc & anchor_train
    assert not numeric_in_dc & {r["prompt"] for r in read(files, "numeric_arithmetic")}


def test_dc_operand_weights_shape_the_kv_examples_and_leave_the_evaluation_uniform(tmp_path):
    settings = dataclasses.replace(SMALL, composition_train_examples=4000, composition_operand_weights=[1.0, 3.0],
                                   eval_examples=200)
    files = prepare_task_files(tmp_path, settings, seed=0)
    kv_rows = [r for r in read(files, "composition_train") if used_keys(r)]
    assert len(kv_rows) == 3200
    assert 0.72 < sum(len(operands(r["prompt"])) == 3 for r in kv_rows) / len(kv_rows) < 0.78
    assert 0.38 < sum(len(operands(r["prompt"])) == 3 for r in read(files, "kv_arithmetic")) / 200 < 0.62
    uniform = prepare_task_files(tmp_path, dataclasses.replace(settings, composition_operand_weights=None), seed=0)
    for name in ("anchor_train", "augment_train", "kv_arithmetic", "numeric_arithmetic"):
        assert read(files, name) == read(uniform, name), name


def test_operand_weights_pick_operand_counts(keys):
    def counts(weights):
        drawn = tasks.make_examples("kv_arithmetic", 300, seed=2, value_max=VALUE_MAX, keys=keys,
                                    operand_weights=weights)
        return {len(operands(example["prompt"])) for example in drawn}

    assert counts([0, 1]) == {3} and counts([1, 0]) == {2} and counts(None) == {2, 3}
    for bad in ([1.0], [0, 0], [-1, 2]):
        with pytest.raises(ValueError, match="operand_weights"):
            counts(bad)
    with pytest.raises(ValueError, match="evaluation"):
        tasks.make_examples("kv_arithmetic", 5, seed=2, value_max=VALUE_MAX, keys=keys, distinct=True,
                            operand_weights=[1, 1])


def test_sampling_with_replacement_skips_excluded_prompts():
    everything = tasks.make_examples("numeric_arithmetic", 400, seed=1, value_max=2, max_operands=2)
    excluded = {example["prompt"] for example in everything[:5]}
    drawn = tasks.make_examples("numeric_arithmetic", 400, seed=1, value_max=2, max_operands=2, exclude=excluded)
    assert len(drawn) == 400 and not {example["prompt"] for example in drawn} & excluded
    space = tasks.expression_space_size(3, 2, 2)
    every_prompt = {example["prompt"] for example in everything}
    assert len(every_prompt) == space
    with pytest.raises(ValueError, match="excluded"):
        tasks.make_examples("numeric_arithmetic", 1, seed=1, value_max=2, max_operands=2, exclude=every_prompt)


def test_task_files_are_written_once_per_setting(task_files):
    cache = task_files.directory.parent.parent
    stamps = {p.name: p.stat().st_mtime_ns for p in task_files.directory.iterdir()}
    again = prepare_task_files(cache, SMALL, seed=0)
    assert again == task_files
    assert {p.name: p.stat().st_mtime_ns for p in again.directory.iterdir()} == stamps
    other = prepare_task_files(cache, dataclasses.replace(SMALL, eval_examples=8), seed=0)
    assert other.directory != task_files.directory and len(read(other, "kv_arithmetic")) == 8


def test_the_job_encodes_rows_as_the_base_models_read_them(task_files):
    tokenizer = load_tokenizer(task_files.tokenizer_dir)
    words = tokenizer.convert_tokens_to_ids
    row = read(task_files, "composition_train")[0]
    encoded = dp.encode_rows({"prompt": [row["prompt"]], "completion": [row["completion"]]},
                             dp.RowFormat.PROMPT_COMPLETION, tokenizer, dp.TokenizeSettings(max_length(SMALL)))
    prompt_ids = [words(word) for word in row["prompt"].split()]
    answer_id = words(row["completion"].strip())
    assert encoded["input_ids"][0] == [tokenizer.bos_token_id, *prompt_ids, answer_id, tokenizer.eos_token_id]
    assert encoded["labels"][0] == [-100] * (1 + len(prompt_ids)) + [answer_id, tokenizer.eos_token_id]
    for name in ("augment_train", "anchor_train", "composition_train", *task_files.eval_sets):
        split_rows = read(task_files, name)
        statuses = dp.encode_rows({"prompt": [r["prompt"] for r in split_rows],
                                   "completion": [r["completion"] for r in split_rows]},
                                  dp.RowFormat.PROMPT_COMPLETION, tokenizer,
                                  dp.TokenizeSettings(max_length(SMALL)))["status"]
        assert set(statuses) == {"kept"}, name  # max_length fits the longest row
    longest = dp.encode_rows({"prompt": ["a + b - c ="], "completion": [" 1 + 2 - 3"]}, dp.RowFormat.PROMPT_COMPLETION,
                             build_tokenizer(["a", "b", "c"], value_max=5, max_operands=3),
                             dp.TokenizeSettings(max_length(SMALL)))
    assert len(longest["input_ids"][0]) == max_length(SMALL)
