"""Errors a user can cause are caught before training, with a message that names the problem."""
import pytest
import torch
from torch import nn

import calm_dist
from tests.tiny_models import tiny_model


def test_an_embedding_padded_beyond_the_tokenizer_composes():
    anchor = tiny_model("llama")
    augment = tiny_model("gpt2")
    augment.resize_token_embeddings(60)  # e.g. 32016 rows for a 32000-token tokenizer
    model = calm_dist.compose(anchor, augment, every_n=2)
    ids = torch.randint(3, 48, (2, 5))
    assert model(ids).logits.shape == (2, 5, 48)


@pytest.mark.parametrize("every_n", [0, 5, -1])
def test_every_n_out_of_range(every_n):
    with pytest.raises(ValueError, match="every_n"):
        calm_dist.compose(tiny_model("llama"), tiny_model("llama"), every_n=every_n)


@pytest.mark.parametrize("connections,needle", [
    ([(4, 0)], "augment layer 4"),
    ([(0, 4)], "anchor layer 4"),
    ([(0, -2)], "anchor layer -2"),
    ([], "empty"),
    ([(0, 1), (0, 1)], "twice"),
    ([(0,)], "expected"),
])
def test_connection_out_of_range(connections, needle):
    with pytest.raises(ValueError, match=needle):
        calm_dist.compose(tiny_model("llama"), tiny_model("llama"), connections=connections)


def test_every_n_and_connections_together():
    with pytest.raises(ValueError, match="either every_n or connections"):
        calm_dist.compose(tiny_model("llama"), tiny_model("llama"), every_n=2, connections=[(0, 0)])


def test_unsupported_model_names_its_class():
    class NotAnLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(2, 2)

    with pytest.raises(ValueError, match="NotAnLM"):
        calm_dist.compose(tiny_model("llama"), NotAnLM())


def test_composing_an_anchor_twice_is_refused():
    anchor = tiny_model("llama")
    calm_dist.compose(anchor, tiny_model("llama", seed=5), every_n=2)
    with pytest.raises(ValueError, match="already part of a composed model"):
        calm_dist.compose(anchor, tiny_model("llama", seed=6), every_n=2)


def test_generate_rejects_negative_length():
    model = calm_dist.compose(tiny_model("llama"), tiny_model("llama", seed=5), every_n=2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(torch.ones(1, 3, dtype=torch.long), max_new_tokens=-1)


# ---- the job: refused before any worker starts, naming the key, touching nothing of an earlier run


def _tokenizer_bigger_than_its_model(root):
    """A model with a tokenizer of its own (chunks of 2 characters, 1125 tokens) but an embedding of 64 rows."""
    from tests.user_project import chunk_tokenizer, tiny_causal_lm

    tiny_causal_lm("llama", 64, hidden=32, layers=4, heads=4, seed=3, eos_id=2).save_pretrained(root / "other")
    chunk_tokenizer(2, False).save_pretrained(root / "other")
    return root / "other"


def _bad_columns(project, root):
    from tests.user_project import write_jsonl

    return write_jsonl(root / "bad.jsonl", [{"input": "red =>", "output": " red"}] * 8)


@pytest.mark.parametrize("case,needle", [
    ("anchor_path", r"config key 'anchor.model.path'.*holds no saved Hugging Face model"),
    ("data_path", r"config key 'data.train'.*does not exist"),
    ("tokenizer", r"config key 'augment\[0\].model.path': the tokenizer has 1125 tokens but the model's embedding "
                  r"has only 64 rows"),
    ("columns", r"config key 'data.train'.*found \['input', 'output'\], accepted"),
    ("max_length", r"config key 'data.max_length': 1000 tokens is more than the model .* covers \(128 positions\)"),
    ("connections", r"config key 'composition.connections'.*augment layer 9 is out of range"),
    ("batch", r"config key 'train.batch_size': 512 rows per step, but data.train has 96 usable rows"),
])
def test_user_errors_are_refused_before_any_worker_naming_the_key(project, tmp_path, capsys, case, needle):
    import ray

    from launcher.train import main

    earlier = tmp_path / "runs" / "user"
    earlier.mkdir(parents=True)
    (earlier / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    changes = {
        "anchor_path": [f"anchor.model.path={tmp_path / 'nowhere'}"],
        "data_path": [f"data.train={tmp_path / 'missing.jsonl'}"],
        "tokenizer": [f"augment.model.path={_tokenizer_bigger_than_its_model(tmp_path)}"],
        "columns": [f"data.train={_bad_columns(project, tmp_path)}"],
        "max_length": ["data.max_length=1000"],
        "connections": ["composition.connections=[[9, 0]]"],
        "batch": ["train.batch_size=512"],
    }[case]
    settings = [f"run.output_dir={tmp_path / 'runs'}", f"run.cache_dir={tmp_path / 'cache'}", "run.name=user",
                "checkpoint.every_steps=2", f"anchor.model.path={project.anchor}",
                f"augment.model.path={project.augment}", f"data.train={project.data('train.jsonl')}",
                f"data.eval={project.data('eval.jsonl')}", "data.max_length=64", "train.batch_size=8", *changes]
    code = main(["--config", "configs/example_composition.yaml", "--set", *settings])
    assert code == 2
    assert __import__("re").search(needle, capsys.readouterr().err), case
    assert not ray.is_initialized()  # the default launcher (ray) never started
    assert sorted(p.name for p in earlier.iterdir()) == ["metrics.jsonl"]  # the earlier run is untouched
    assert (earlier / "metrics.jsonl").read_text() == '{"step": 1, "loss": 1.0}\n'


def test_a_model_with_its_own_tokenizer_never_reads_the_anchor_ids():
    model = calm_dist.compose(tiny_model("llama"), tiny_model("llama", seed=5), every_n=2, shared_tokenizer=False)
    with pytest.raises(ValueError, match=r"augmenting models \[0\] have their own tokenizer: pass .*augment_inputs"):
        model(torch.randint(3, 48, (1, 4)))
