"""The catalogue of refusals (docs/refusals.md): user mistakes the job refuses before any worker starts, each
with the message the user gets, and nothing of an earlier run in the same directory touched.

Every case runs `python -m launcher.train` (in process) on the default launcher, Ray: a refusal that comes
before the workers leaves Ray not even started (or, for the cluster's capacity, no worker placed).
`python -m tests.test_refusals` prints the catalogue's table from the same cases.
"""
from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.user_project import (UserProject, chunk_tokenizer, save_own_tokenizer_augment, tiny_causal_lm,
                                write_jsonl)

DOC = Path(__file__).resolve().parents[1] / "docs" / "refusals.md"
EARLIER_METRICS = '{"step": 1, "loss": 1.0}\n'


@dataclass(frozen=True)
class Case:
    name: str
    area: str
    mistake: str
    message: str  # a regular expression the error must match
    overrides: tuple[str, ...] = ()
    earlier_checkpoint: bool = False  # the earlier run left a checkpoint of the settings without ``overrides``


def _fixtures(project: UserProject, root: Path) -> dict[str, Path]:
    """Files some cases point at, made once per test."""
    made = {}
    made["empty_dir"] = root / "empty"
    made["empty_dir"].mkdir()
    weightless = root / "weightless"
    weightless.mkdir()
    shutil.copy(project.anchor / "config.json", weightless / "config.json")
    made["weightless"] = weightless
    no_tokenizer = root / "no_tokenizer"
    no_tokenizer.mkdir()
    for file in project.augment.iterdir():
        if file.name.startswith(("config", "model", "generation")):
            shutil.copy(file, no_tokenizer / file.name)
    made["no_tokenizer"] = no_tokenizer
    from transformers import ByT5Tokenizer

    made["slow_tokenizer"] = root / "slow_tokenizer"  # a Python tokenizer: no offsets
    ByT5Tokenizer().save_pretrained(made["slow_tokenizer"])
    own_small = root / "own_small_embedding"  # its own tokenizer (chunks of 2 characters), an embedding of 64 rows
    tiny_causal_lm("llama", 64, 32, 4, 4, seed=3, eos_id=2).save_pretrained(own_small)
    chunk_tokenizer(2, False).save_pretrained(own_small)
    made["own_small_embedding"] = own_small
    made["own_two_positions"] = save_own_tokenizer_augment(project, 2, False, max_positions=2)
    small = root / "small_embedding"
    tiny_causal_lm("llama", 64, 32, 4, 4, seed=3, eos_id=0).save_pretrained(small)
    project.tokenizer.save_pretrained(small)
    made["small_embedding"] = small
    plain = root / "no_template"
    project.tokenizer.save_pretrained(plain)
    (plain / "chat_template.jinja").unlink()
    made["no_template"] = plain
    made["bad_columns"] = write_jsonl(root / "bad_columns.jsonl", [{"input": "red =>", "output": " red"}] * 16)
    made["not_string"] = write_jsonl(root / "not_string.jsonl", [{"prompt": "red =>", "completion": " red"}] * 3
                                     + [{"prompt": ["red"], "completion": " red"}] + [{"prompt": "a", "completion": "b"}] * 12)
    made["long_rows"] = write_jsonl(root / "long.jsonl", [{"text": " ".join(["blue"] * 200)}] * 16)
    made["few_rows"] = write_jsonl(root / "few.jsonl", [{"prompt": "red =>", "completion": " red"}] * 3)
    made["text_file"] = root / "notes.txt"
    made["text_file"].write_text("red cat\n")
    retrained = root / "retrained_augment"  # the augmenting model's shape, other weights
    tiny_causal_lm("llama", len(project.tokenizer) + 8, 32, 4, 4, seed=7, eos_id=project.tokenizer.eos_token_id,
                   kv_heads=2).save_pretrained(retrained)
    project.tokenizer.save_pretrained(retrained)
    made["retrained_augment"] = retrained
    return made


def cases(project: UserProject, made: dict[str, Path], root: Path) -> list[Case]:
    p = made
    return [
        # the config itself
        Case("unknown-key", "config", "a misspelt key", r"unknown config key 'train.max_stepz'", ("train.max_stepz=3",)),
        Case("wrong-type", "config", "a word where a number goes", r"config key 'train.max_steps': expected int",
             ("train.max_steps=ten",)),
        Case("not-positive", "config", "zero steps", r"config key 'train.max_steps': must be > 0", ("train.max_steps=0",)),
        Case("negative-lr", "config", "a negative learning rate", r"config key 'train.lr': must be > 0", ("train.lr=-1",)),
        Case("both-connection-choices", "config", "every_n and connections together",
             r"config key 'composition.connections': set either", ("composition.every_n=2", "composition.connections=[[0, 0]]")),
        Case("malformed-pair", "config", "a connection that is not a pair",
             r"config key 'composition.connections\[0\]': expected \[augment_layer, anchor_layer\]",
             ("composition.connections=[[0]]",)),
        Case("min-ranks", "config", "a minimum above the plan", r"config key 'parallel.min_anchor_ranks': must be <=",
             ("parallel.anchor_ranks=2", "parallel.min_anchor_ranks=3", "train.batch_size=8")),
        Case("indivisible-batch", "config", "a batch the anchor ranks cannot split",
             r"config key 'train.batch_size': 9 must be divisible by parallel.anchor_ranks=2",
             ("parallel.anchor_ranks=2", "train.batch_size=9")),
        Case("launcher", "config", "an unknown launcher", r"config key 'run.launcher': must be ray or local",
             ("run.launcher=slurm",)),
        Case("wire-dtype", "config", "an unknown wire dtype", r"config key 'parallel.wire_dtype'",
             ("parallel.wire_dtype=float8",)),
        Case("eval-fraction", "config", "no evaluation set and no fraction to hold out",
             r"config key 'data.eval_fraction': must be in \(0, 1\) when data.eval is not given",
             ("data.eval=null", "data.eval_fraction=0")),
        Case("overlong-rule", "config", "an unknown rule for long rows", r"config key 'data.overlong': must be drop or truncate",
             ("data.overlong=cut",)),
        Case("old-key", "config", "a key of an older config", r"'extra_augments'.*list every augmenting model under 'augment:'",
             (f"extra_augments=[{{path: {project.augment}}}]",)),
        Case("recipe-without-name", "config", "a recipe section without a name", r"config key 'recipe.name'",
             ("recipe={data: {}}",)),
        Case("unknown-recipe", "config", "a recipe that is not installed", r"config key 'recipe.name': no recipe 'nope'",
             ("recipe={name: nope}",)),
        # paths
        Case("anchor-missing", "paths", "an anchor path that does not exist",
             r"config key 'anchor.model.path': '.*nowhere' holds no saved Hugging Face model",
             (f"anchor.model.path={root / 'nowhere'}",)),
        Case("augment-not-a-model", "paths", "a directory without a saved model",
             r"config key 'augment\[0\].model.path'.*no config.json", (f"augment.model.path={p['empty_dir']}",)),
        Case("no-weights", "paths", "a model directory without weights",
             r"config key 'anchor.model.path'.*has a config.json but no weights", (f"anchor.model.path={p['weightless']}",)),
        Case("train-missing", "paths", "a training file that does not exist", r"config key 'data.train'.*does not exist",
             (f"data.train={root / 'missing.jsonl'}",)),
        Case("eval-missing", "paths", "an evaluation file that does not exist", r"config key 'data.eval'.*does not exist",
             (f"data.eval={root / 'missing_eval.jsonl'}",)),
        Case("empty-glob", "paths", "a glob that matches nothing", r"config key 'data.train': no file matches",
             (f"data.train={root / 'nothing-*.jsonl'}",)),
        Case("unsupported-file", "paths", "a file kind datasets cannot read here",
             r"config key 'data.train'.*files of kinds \['.txt'\]", (f"data.train={p['text_file']}",)),
        # models and the composition
        Case("connection-range", "models", "a connection past the augmenting model's depth",
             r"config key 'composition.connections'.*augment layer 9 is out of range", ("composition.connections=[[9, 0]]",)),
        Case("every-n-range", "models", "every_n beyond the augmenting model's depth",
             r"config key 'composition.every_n'.*every_n=9 is out of range", ("composition.every_n=9",)),
        Case("max-length", "models", "rows longer than the models' positions",
             r"config key 'data.max_length': 1000 tokens is more than the model .* covers \(128 positions\)",
             ("data.max_length=1000",)),
        Case("too-many-stages", "models", "more pipeline stages than the layers the bridges need",
             r"parallel.augment_stages=5 must be between 1 and the \d augment layers", ("parallel.augment_stages=5",)),
        # tokenizers
        Case("slow-tokenizer", "tokenizers", "a tokenizer without offsets (not a fast one)",
             r"config key 'augment\[0\].model.tokenizer': the tokenizer at .* is not a fast tokenizer; the data "
             r"pipeline needs token offsets", (f"augment.model.tokenizer={p['slow_tokenizer']}",)),
        Case("own-tokenizer-embedding", "tokenizers", "a model with a tokenizer of its own bigger than its embedding",
             r"config key 'augment\[0\].model.path': the tokenizer has 1125 tokens but the model's embedding has only "
             r"64 rows: it was not trained with this tokenizer", (f"augment.model.path={p['own_small_embedding']}",)),
        Case("own-tokenizer-positions", "tokenizers",
             "every row longer, in an augmenting model's own tokens, than that model's positions",
             r"config key 'data.train'.*no row.*longer than an augmenting model's positions",
             (f"augment={{model: {{path: {p['own_two_positions']}}}, connections: [[1, 0], [2, 2]]}}",)),
        Case("small-embedding", "tokenizers", "a model whose embedding is smaller than the tokenizer",
             r"config key 'augment\[0\].model.path': the tokenizer has \d+ tokens but the model's embedding has only 64",
             (f"augment.model.path={p['small_embedding']}",)),
        Case("no-tokenizer", "tokenizers", "a model directory without a tokenizer",
             r"config key 'augment\[0\].model.path': no tokenizer could be loaded", (f"augment.model.path={p['no_tokenizer']}",)),
        Case("no-chat-template", "tokenizers", "conversations for a tokenizer without a chat template",
             r"config key 'data.train': the rows are conversations \('messages'\) but the anchor tokenizer has no chat template",
             (f"anchor.model.tokenizer={p['no_template']}", f"data.train={project.data('chat.jsonl')}", "data.eval=null")),
        # data
        Case("columns", "data", "columns of no known format",
             r"config key 'data.train'.*found \['input', 'output'\], accepted", (f"data.train={p['bad_columns']}",)),
        Case("rename-missing", "data", "a rename of a column the data lacks",
             r"config key 'data.columns'.*no columns \['instruction'\]", ("data.columns={instruction: prompt}",)),
        Case("not-a-string", "data", "a prompt that is not a string", r"config key 'data.train'.*row 3: prompt must be a string",
             (f"data.train={p['not_string']}",)),
        Case("all-overlong", "data", "every row longer than data.max_length",
             r"config key 'data.train': no row of .* is left after tokenisation \(16 longer than data.max_length=64",
             (f"data.train={p['long_rows']}",)),
        Case("too-few-rows", "data", "fewer rows than one batch",
             r"config key 'train.batch_size': 8 rows per step, but data.train has 3 usable rows", (f"data.train={p['few_rows']}",)),
        # the cluster's capacity (the embedded Ray is started to learn it, and stopped; no worker is placed)
        Case("too-few-cpus", "cluster", "workers that need more CPUs than the cluster has",
             r"the cluster cannot hold parallel.anchor_ranks=1 \+ parallel.augment_stages=1 workers .*missing in total: "
             r"\{'CPU': 4095.0\}",
             ("ray.anchor_resources={CPU: 4096}",)),
        Case("missing-resource", "cluster", "a resource no node has",
             r"the cluster cannot hold .*missing in total: \{'nvme_scratch': 1",
             ("ray.augment_resources={nvme_scratch: 1}",)),
        # resuming: the same command again must find the earlier run's checkpoint fits
        Case("resume-batch", "resume", "resuming with another batch size",
             r"checkpoint step_0+2 was trained with train.batch_size=8, this run has 16: resume with the same value, "
             r"or start a new run", ("train.batch_size=16",), earlier_checkpoint=True),
        Case("resume-composition", "resume", "resuming with other connections",
             r"checkpoint step_0+2 was trained with the composition "
             r"\(connections, relative_scale, composition.seed or run.seed\)=",
             ("composition.connections=[[0, 0], [3, 2]]",), earlier_checkpoint=True),
        Case("resume-data", "resume", "resuming on other data settings",
             r"checkpoint step_0+2 was trained with the data \(data.\* and the files they name\)=",
             ("data.max_length=48",), earlier_checkpoint=True),
        Case("resume-model", "resume", "resuming with other augmenting weights",
             r"checkpoint step_0+2 was trained with the augment model .* \(sha256 [0-9a-f]{12}…\), but the augment model "
             r"is now .* \(sha256 [0-9a-f]{12}…\)", (f"augment.model.path={p['retrained_augment']}",), earlier_checkpoint=True),
        Case("resume-added-model", "resume", "resuming with an augmenting model added",
             r"checkpoint step_0+2 was trained with the base models \['anchor', 'augment'\], this run has "
             r"\['anchor', 'augment', 'augment_1'\]",
             (f"augment=[{{model: {{path: {project.augment}}}}}, {{model: {{path: {p['retrained_augment']}}}}}]",),
             earlier_checkpoint=True),
    ]


CONFIG = "configs/example_composition.yaml"


def base_settings(project: UserProject, root: Path) -> list[str]:
    """A run the job accepts; each case changes it by its overrides."""
    return [f"run.output_dir={root / 'runs'}", f"run.cache_dir={root / 'cache'}", "run.name=user",
            "checkpoint.every_steps=2", f"anchor.model.path={project.anchor}", f"augment.model.path={project.augment}",
            f"data.train={project.data('train.jsonl')}", f"data.eval={project.data('eval.jsonl')}",
            "data.max_length=64", "train.batch_size=8"]


def leave_earlier_run(project: UserProject, root: Path, with_checkpoint: bool) -> Path:
    """``runs/user`` as an earlier run left it: its metrics and, if asked, a published checkpoint of step 2
    recording the identity of the base settings (stand-in weight files: a refusal must come before they are read)."""
    from calm_dist.checkpoint import CheckpointStore
    from calm_dist.config import load_config
    from calm_dist.train.job import prepare_job
    from launcher.runtime import job_identity
    from tests.checkpoint_helpers import write_fake_files

    earlier = root / "runs" / "user"
    earlier.mkdir(parents=True)
    (earlier / "metrics.jsonl").write_text(EARLIER_METRICS)
    if with_checkpoint:
        identity = job_identity(prepare_job(load_config(CONFIG, base_settings(project, root)), log=lambda *_: None))
        store = CheckpointStore(str(earlier / "checkpoints"))
        store.begin(2)
        files = write_fake_files(store, 2, b"stand-in weights " * 64)
        store.publish(2, {**identity, "step": 2, "anchor_ranks": 1, "reader": {"position": 2}}, [files], keep=2)
    return earlier


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(path.relative_to(directory)): path.read_bytes() for path in sorted(directory.rglob("*")) if path.is_file()}


def run_case(case: Case, project: UserProject, root: Path) -> str:
    """The case through the CLI; its error message (stderr)."""
    import contextlib
    import io

    from launcher.train import main

    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        code = main(["--config", CONFIG, "--set", *base_settings(project, root), *case.overrides])
    error = stderr.getvalue()
    assert code == 2, f"{case.name}: not refused (exit {code}): {error[-2000:]}"
    return error.strip().removeprefix("error: ")


@pytest.fixture(scope="module")
def made(project, tmp_path_factory):
    return _fixtures(project, tmp_path_factory.mktemp("refusal_fixtures"))


def _case_names():
    return [case.name for case in cases(UserProject(Path("/p"), Path("/p/a"), Path("/p/b"), None),
                                        _placeholder_fixtures(), Path("/r"))]


def _placeholder_fixtures() -> dict[str, Path]:
    return {key: Path(f"/placeholder/{key}") for key in ("empty_dir", "weightless", "no_tokenizer", "slow_tokenizer",
                                                         "own_small_embedding", "own_two_positions", "small_embedding",
                                                         "no_template", "bad_columns", "not_string", "long_rows",
                                                         "few_rows", "text_file", "retrained_augment")}


@pytest.mark.parametrize("name", _case_names())
def test_the_mistake_is_refused_before_any_worker_touching_nothing(name, project, made, tmp_path):
    import ray

    case = next(c for c in cases(project, made, tmp_path) if c.name == name)
    earlier = leave_earlier_run(project, tmp_path, case.earlier_checkpoint)
    before = snapshot(earlier)
    message = run_case(case, project, tmp_path)
    assert re.search(case.message, message), f"{name}: {message}"
    assert not ray.is_initialized()  # the default launcher never started (or, for capacity, was stopped unused)
    assert snapshot(earlier) == before


def test_the_catalogue_lists_every_case():
    text = DOC.read_text()
    missing = [name for name in _case_names() if f"`{name}`" not in text]
    assert not missing, f"docs/refusals.md lacks {missing}: regenerate it with python -m tests.test_refusals"
    assert len(_case_names()) >= 30


def catalogue(project: UserProject, made: dict[str, Path], root: Path, messages: dict[str, str]) -> str:
    lines = ["| case | area | the mistake | what the user reads |", "|---|---|---|---|"]
    for case in cases(project, made, root):
        shown = messages[case.name].replace(str(root), "…").replace(str(project.root), "…").replace("|", "\\|")
        lines.append(f"| `{case.name}` | {case.area} | {case.mistake} | {shown} |")
    return "\n".join(lines)


HEADER = """# Refusals: user mistakes caught before any worker starts

Each row is a mistake a user can make, the message `python -m launcher.train` prints for it (exit code 2),
and the test case that proves it: `tests/test_refusals.py::test_the_mistake_is_refused_before_any_worker_touching_nothing[<case>]`
runs the command on the default launcher (Ray) and checks the message, that Ray was never started (for the
cluster's capacity: started to learn it, stopped before any worker was placed), and that an earlier run in the
same run directory — its metrics and, for the resume cases, its checkpoint — is untouched. Paths are shortened to `…`. Regenerate this page with
`python -m tests.test_refusals` after changing a case or a message.

"""

if __name__ == "__main__":  # regenerate docs/refusals.md
    import tempfile

    from tests.user_project import make_project

    root = Path(tempfile.mkdtemp())
    project = make_project(root / "project")
    made = _fixtures(project, root)
    messages = {}
    for case in cases(project, made, root):
        leave_earlier_run(project, root / case.name, case.earlier_checkpoint)
        messages[case.name] = run_case(case, project, root / case.name)
    DOC.write_text(HEADER + catalogue(project, made, root, messages) + "\n")
    print(DOC)
