"""Your data to token ids and labels: row formats, loss masks token by token, caching, length rules."""
import json

import pytest
from tokenizers import processors

import data_pipeline as dp
from data_pipeline import prepare as prepare_module
from tests.user_project import bpe_tokenizer, write_jsonl


@pytest.fixture(scope="module")
def tokenizer():
    return bpe_tokenizer()


def labelled_tokens(tokenizer, row_format, row):
    out = dp.encode_rows({key: [value] for key, value in row.items()}, row_format, tokenizer, dp.TokenizeSettings(64))
    return [(tokenizer.convert_ids_to_tokens(token), label != dp.IGNORE_INDEX)
            for token, label in zip(out["input_ids"][0], out["labels"][0])]


def test_prompt_completion_loss_is_on_the_completion_and_the_token_that_straddles_into_it(tokenizer):
    got = labelled_tokens(tokenizer, dp.RowFormat.PROMPT_COMPLETION, {"prompt": "big dog runs =>",
                                                                       "completion": " runs dog big"})
    # "=>Ġ" holds the completion's leading space: producing it is part of producing the completion. No BOS
    # (this tokenizer adds none); EOS after the completion, labelled.
    assert got == [("bigĠ", False), ("dogĠ", False), ("runsĠ", False), ("=>Ġ", True), ("runsĠ", True),
                   ("dogĠbig", True), ("<|endoftext|>", True)]


def test_text_rows_carry_loss_everywhere(tokenizer):
    got = labelled_tokens(tokenizer, dp.RowFormat.TEXT, {"text": "the small bird sings"})
    assert got == [("the", True), ("Ġsmall", True), ("Ġbird", True), ("Ġsings", True), ("<|endoftext|>", True)]


def test_conversations_carry_loss_on_assistant_turns_only(tokenizer):
    messages = [{"role": "user", "content": "red cat"}, {"role": "assistant", "content": "cat red"},
                {"role": "user", "content": "dog"}, {"role": "assistant", "content": "dog"}]
    got = labelled_tokens(tokenizer, dp.RowFormat.MESSAGES, {"messages": messages})
    user = [("<|im_start|>", False), ("us", False), ("er", False), ("Ċ", False)]
    assistant_header = [("<|im_start|>", False), *[(c, False) for c in "assistant"], ("Ċ", False)]
    assert got == [*user, ("redĠ", False), ("cat", False), ("<|im_end|>", False), ("Ċ", False),
                   *assistant_header, ("catĠ", True), ("red", True), ("<|im_end|>", True), ("Ċ", True),
                   *user, ("dog", False), ("<|im_end|>", False), ("Ċ", False),
                   *assistant_header, ("dog", True), ("<|im_end|>", True), ("Ċ", True)]


def test_bos_only_when_the_tokenizer_adds_one_and_never_a_second_eos(tokenizer):
    import copy

    with_bos = copy.deepcopy(tokenizer)
    with_bos.add_special_tokens({"bos_token": "<s>"})
    with_bos.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A <|endoftext|>", special_tokens=[("<s>", with_bos.bos_token_id),
                                                       ("<|endoftext|>", with_bos.eos_token_id)])
    got = labelled_tokens(with_bos, dp.RowFormat.PROMPT_COMPLETION, {"prompt": "red =>", "completion": " red"})
    assert got[0] == ("<s>", False)  # its BOS, never a loss target
    assert got[-1] == ("<|endoftext|>", True) and got[-2][0] != "<|endoftext|>"  # its EOS, labelled, not doubled


@pytest.mark.parametrize("columns,needle", [
    (["input", "output"], r"found \['input', 'output'\], accepted 'messages'; 'prompt' \+ 'completion'; 'text'"),
    (["prompt", "answer"], "'prompt' and 'completion' go together"),
])
def test_unknown_columns_are_named_with_what_is_accepted(columns, needle):
    with pytest.raises(ValueError, match=needle):
        dp.detect_format(columns, "data.train")


def _spec(train, evaluation=None, **settings):
    evals = {"eval": dp.DataSource("data.eval", str(evaluation))} if evaluation else {}
    tokenize = dp.TokenizeSettings(settings.pop("max_length", 64), settings.pop("overlong", "drop"))
    return dp.DataSpec(dp.DataSource("data.train", str(train)), evals, settings.pop("eval_fraction", 0.25),
                       settings.pop("columns", {}), tokenize, 0, 0)


def test_prepared_data_is_cached_by_fingerprint_and_remade_when_a_file_changes(tokenizer, tmp_path, monkeypatch):
    train = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "red =>", "completion": " red"}] * 8)
    first = dp.prepare_data(_spec(train), tokenizer, tmp_path / "cache", log=lambda _: None)
    assert set(first.splits) == {"train", "eval"} and first.splits["eval"].rows == 2  # eval_fraction of 8 rows

    def no_tokenising(*args, **kwargs):
        raise AssertionError("tokenised again")

    monkeypatch.setattr(prepare_module, "_tokenise", no_tokenising)
    assert dp.prepare_data(_spec(train), tokenizer, tmp_path / "cache", log=lambda _: None).directory == first.directory
    write_jsonl(train, [{"prompt": "blue =>", "completion": " blue"}] * 8)
    with pytest.raises(AssertionError, match="tokenised again"):
        dp.prepare_data(_spec(train), tokenizer, tmp_path / "cache", log=lambda _: None)


@pytest.mark.parametrize("rule,rows,dropped,truncated", [("drop", 1, 1, 0), ("truncate", 2, 0, 1)])
def test_overlong_rows_are_dropped_or_truncated_and_counted(tokenizer, tmp_path, rule, rows, dropped, truncated):
    long_row = {"prompt": "red =>", "completion": " " + " ".join(["blue"] * 30)}
    train = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "red =>", "completion": " red"}, long_row])
    evaluation = write_jsonl(tmp_path / "eval.jsonl", [{"prompt": "red =>", "completion": " red"}])
    data = dp.prepare_data(_spec(train, evaluation, max_length=12, overlong=rule), tokenizer, tmp_path / "cache",
                           log=lambda _: None)
    summary = data.splits["train"]
    assert (summary.rows, summary.dropped_overlong, summary.truncated, summary.rows_in) == (rows, dropped, truncated, 2)
    assert summary.longest <= 12


def test_a_corrupted_prepared_file_is_refused_with_its_path(tokenizer, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": "red cat"}] * 8)
    data = dp.prepare_data(_spec(train), tokenizer, tmp_path / "cache", log=lambda _: None)
    shard = next(data.train.glob("*.arrow"))
    content = bytearray(shard.read_bytes())
    content[len(content) // 2] ^= 0xFF
    shard.write_bytes(bytes(content))
    with pytest.raises(ValueError, match=f"prepared data file {shard} is corrupted"):
        dp.prepare_data(_spec(train), tokenizer, tmp_path / "cache", log=lambda _: None)


def test_jsonl_and_parquet_give_the_same_tokens(project, tmp_path):
    jsonl = dp.prepare_data(_spec(project.data("train.jsonl"), project.data("eval.jsonl")), project.tokenizer,
                            tmp_path / "a", log=lambda _: None)
    parquet = dp.prepare_data(_spec(project.data("train.parquet"), project.data("eval.parquet")), project.tokenizer,
                              tmp_path / "b", log=lambda _: None)
    rows, other = dp.TokenisedRows(jsonl.train), dp.TokenisedRows(parquet.train)
    assert len(rows) == len(other) == 96
    assert [ids.tolist() for ids in rows.take(range(len(rows)))[0]] == \
        [ids.tolist() for ids in other.take(range(len(other)))[0]]


def test_columns_can_be_renamed(tokenizer, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"instruction": "red =>", "output": " red"}] * 4)
    data = dp.prepare_data(_spec(train, train, columns={"instruction": "prompt", "output": "completion"}), tokenizer,
                           tmp_path / "cache", log=lambda _: None)
    assert data.splits["train"].row_format == "prompt_completion"
    with pytest.raises(ValueError, match=r"data.columns.*no columns \['input'\]"):
        dp.prepare_data(_spec(train, train, columns={"input": "prompt"}), tokenizer, tmp_path / "cache",
                        log=lambda _: None)


def test_manifest_records_each_split(tokenizer, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": "red cat"}] * 4)
    data = dp.prepare_data(_spec(train, train), tokenizer, tmp_path / "cache", log=lambda _: None)
    manifest = json.loads((data.directory / "prepared.json").read_text())
    assert manifest["pad_id"] == tokenizer.eos_token_id  # no pad token: padding uses EOS (masked anyway)
    assert manifest["splits"]["train"]["labelled_tokens"] == manifest["splits"]["train"]["tokens"] - 4
