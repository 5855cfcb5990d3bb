"""The generic job on a user's own models and data, as `python -m launcher.train` runs it: every row format
from JSONL and Parquet, what a run leaves behind, and step 0 (the anchor alone) scored exactly."""
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import data_pipeline as dp
from calm_dist.model.loss import causal_lm_loss
from launcher.train import main
from tests.user_project import UserProject


def cli(project: UserProject, root: Path, capsys, *overrides: str, train="train.jsonl", evaluation="eval.jsonl"):
    settings = [f"run.output_dir={root / 'runs'}", f"run.cache_dir={root / 'cache'}", "run.launcher=local",
                f"anchor.model.path={project.anchor}", f"augment.model.path={project.augment}",
                f"data.train={project.data(train)}", "data.max_length=64", "train.max_steps=4", "train.batch_size=8",
                "train.lr=3.0e-3", "train.warmup_steps=1", "eval.batch_size=8"]
    settings.append(f"data.eval={project.data(evaluation)}" if evaluation else "data.eval=null")
    code = main(["--config", "configs/example_composition.yaml", "--set", *settings, *overrides])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("train,evaluation", [("train.jsonl", "eval.jsonl"), ("train.parquet", "eval.parquet"),
                                              ("text.jsonl", None), ("chat.jsonl", None)],
                         ids=["prompt-completion-jsonl", "prompt-completion-parquet", "text", "messages"])
def test_the_job_runs_on_every_row_format(project, tmp_path, capsys, train, evaluation):
    code, out, err = cli(project, tmp_path, capsys, train=train, evaluation=evaluation)
    assert code == 0, err[-3000:]
    run_dir = Path(out.strip().splitlines()[-1])
    assert run_dir.is_dir() and run_dir.parent == tmp_path / "runs"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == [1, 2, 3, 4]
    evaluations = [(r["step"], r["eval"]) for r in records if "eval" in r]
    assert evaluations == [(0, "eval"), (4, "eval")]  # the held-out eval_fraction is named "eval" too
    results = json.loads((run_dir / "results.json").read_text())
    assert set(results) == {"anchor", "calm"}
    for row in results.values():
        assert {"eval_loss", "eval_perplexity", "eval_exact_match", "eval_rows", "eval_tokens"} <= set(row)
    assert results["calm"]["eval_loss"] < results["anchor"]["eval_loss"]  # the bridges learnt something
    summary = json.loads((run_dir / "run_summary.json").read_text())
    assert summary["data"]["splits"]["train"]["row_format"] == dp.detect_format(
        {"train.jsonl": ["prompt", "completion"], "train.parquet": ["prompt", "completion"],
         "text.jsonl": ["text"], "chat.jsonl": ["messages"]}[train], train).value
    assert summary["base_models"]["anchor"]["sha256"] and len(summary["base_models"]["augment"]) == 1
    assert (run_dir / "loss_curves.png").is_file()
    assert {"composition.safetensors", "config.json", "tokenizer.json"} <= {p.name for p in (run_dir / "export").iterdir()}
    assert "| eval" in out  # the results table


def test_step_zero_is_exactly_the_plain_anchor_on_the_same_rows(project, tmp_path, capsys):
    code, out, err = cli(project, tmp_path, capsys, "train.max_steps=1")
    assert code == 0, err[-3000:]
    run_dir = Path(out.strip().splitlines()[-1])
    at_step_zero = json.loads((run_dir / "results.json").read_text())["anchor"]["eval_loss"]
    summary = json.loads((run_dir / "run_summary.json").read_text())
    prepared = dp.load_prepared(summary["data"]["directory"])
    anchor = AutoModelForCausalLM.from_pretrained(project.anchor).eval()
    batches = dp.EvalBatches(prepared.eval_dir("eval"), 100, pad_id=prepared.pad_id)
    losses, counts = [], []
    with torch.no_grad():
        for index in range(len(batches)):
            batch = batches.batch(index)
            logits = anchor(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            count = int((batch["labels"][:, 1:] != -100).sum())
            losses.append(float(causal_lm_loss(logits, batch["labels"], batch["attention_mask"])) * count)
            counts.append(count)
    assert abs(at_step_zero - sum(losses) / sum(counts)) <= 1e-5


def test_a_second_run_reuses_the_tokenised_data(project, tmp_path, capsys):
    code, out, _ = cli(project, tmp_path, capsys, "train.max_steps=1")
    assert code == 0 and "data: tokenised" in out
    code, out, _ = cli(project, tmp_path, capsys, "train.max_steps=1")
    assert code == 0 and "data: tokenised" not in out


def test_every_run_ends_with_an_export_that_generates(project, tmp_path, capsys):
    import torch
    from transformers import AutoTokenizer

    from calm_dist import CALMForCausalLM

    code, out, err = cli(project, tmp_path, capsys, "train.max_steps=2")
    assert code == 0, err[-3000:]
    export = Path(out.strip().splitlines()[-1]) / "export"
    model = CALMForCausalLM.from_pretrained(export, dtype=torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(export)
    inputs = tokenizer(["red cat =>", "big dog runs =>"], return_tensors="pt", padding=True)
    generated = model.generate(**inputs, max_new_tokens=4, do_sample=True, temperature=0.7, top_p=0.9)
    texts = tokenizer.batch_decode(generated[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert len(texts) == 2 and all(isinstance(text, str) for text in texts)
