"""A user's own project, as the generic job meets it: two saved Hugging Face models with a real BPE
tokenizer (no BOS, no pad token, a chat template, merges that straddle word boundaries) and composition
data of their own in JSONL and Parquet (prompt/completion, plain text, conversations)."""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers

WORDS = ["red", "blue", "green", "cat", "dog", "bird", "runs", "sleeps", "sings", "the", "a", "big", "small",
         "quickly", "slowly", "near", "far", "tree", "house", "river"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
EOS, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"


def sentence(rng: random.Random, length: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(length))


def corpus(count: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [sentence(rng, rng.randint(3, 9)) for _ in range(count)]


def bpe_tokenizer(vocab_size: int = 420) -> transformers.PreTrainedTokenizerFast:
    """Byte-level BPE over whole lines (merges cross spaces: tokens straddle word boundaries), no BOS added,
    no pad token, EOS ``<|endoftext|>``, a ChatML chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS, IM_START, IM_END],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(corpus() + [f"{a} => {b}" for a, b in zip(corpus(50, 1), corpus(50, 2))],
                                trainer=trainer)
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS,
                                                     additional_special_tokens=[IM_START, IM_END])
    tokenizer.chat_template = CHAT_TEMPLATE
    assert tokenizer.bos_token is None and tokenizer.pad_token is None
    return tokenizer


def tiny_causal_lm(arch: str, vocab: int, hidden: int, layers: int, heads: int, seed: int, eos_id: int,
                   kv_heads: int | None = None):
    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, eos_token_id=eos_id, bos_token_id=None, pad_token_id=None)
    if arch == "llama":
        config = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                                          num_attention_heads=heads, num_key_value_heads=kv_heads or heads,
                                          max_position_embeddings=128, **common)
    elif arch == "qwen2":
        config = transformers.Qwen2Config(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                                          num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                                          max_position_embeddings=128, **common)
    elif arch == "gpt2":
        config = transformers.GPT2Config(n_embd=hidden, n_layer=layers, n_head=heads, n_positions=128, **common)
    else:
        raise ValueError(arch)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


@dataclass
class UserProject:
    root: Path
    anchor: Path
    augment: Path
    tokenizer: transformers.PreTrainedTokenizerFast

    def data(self, name: str) -> Path:
        return self.root / "data" / name


def prompt_completion_rows(count: int, seed: int) -> list[dict]:
    """``prompt`` = a sentence and an arrow, ``completion`` = the sentence's words reversed: a mapping the
    composition can learn. The completion starts without a space, so BPE merges straddle the boundary."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        words = sentence(rng, rng.randint(2, 5)).split()
        rows.append({"prompt": " ".join(words) + " =>", "completion": " " + " ".join(reversed(words))})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def make_project(root: Path, anchor_arch: str = "llama", augment_arch: str = "llama",
                 augment_extra_vocab: int = 8) -> UserProject:
    """Saves the anchor and augmenting model (each with the tokenizer) and the datasets under ``root``.
    The models differ in width, depth and attention (the augmenting one uses grouped-query attention);
    its embedding is padded ``augment_extra_vocab`` rows beyond the tokenizer, as models often are (e.g.
    32016 rows for a 32000-token tokenizer). Both architectures must be ones for which ``AutoTokenizer``
    keeps a saved ``tokenizer.json`` as it is (transformers rebuilds e.g. a qwen2 model's pre-tokenizer)."""
    tokenizer = bpe_tokenizer()
    vocab, eos = len(tokenizer), tokenizer.eos_token_id
    project = UserProject(root, root / "models" / "anchor", root / "models" / "augment", tokenizer)
    anchor = tiny_causal_lm(anchor_arch, vocab, hidden=48, layers=3, heads=4, seed=1, eos_id=eos)
    augment = tiny_causal_lm(augment_arch, vocab + augment_extra_vocab, hidden=32, layers=4, heads=4, seed=2,
                             eos_id=eos, kv_heads=2)
    for model, directory in ((anchor, project.anchor), (augment, project.augment)):
        model.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
    train = prompt_completion_rows(96, seed=3)
    evaluation = prompt_completion_rows(24, seed=4)
    write_jsonl(project.data("train.jsonl"), train)
    write_jsonl(project.data("eval.jsonl"), evaluation)
    write_parquet(project.data("train.parquet"), train)
    write_parquet(project.data("eval.parquet"), evaluation)
    write_jsonl(project.data("text.jsonl"), [{"text": row["prompt"] + row["completion"]} for row in train])
    write_jsonl(project.data("chat.jsonl"), [
        {"messages": [{"role": "user", "content": row["prompt"]},
                      {"role": "assistant", "content": row["completion"].strip()}]} for row in train])
    return project


def generic_config(project: UserProject, root: Path, *overrides: str, train: str = "train.jsonl",
                   evaluation: str | None = "eval.jsonl"):
    """The generic job's config over the project (launcher local unless overridden)."""
    from calm_dist.config import load_config

    settings = [f"run.output_dir={root / 'runs'}", f"run.cache_dir={root / 'cache'}", "run.launcher=local",
                "run.name=user", f"anchor.model.path={project.anchor}", f"augment.model.path={project.augment}",
                "composition.connections=[[1, 0], [3, 2]]", f"data.train={project.data(train)}",
                "data.max_length=64", "train.max_steps=6", "train.batch_size=8", "train.lr=3.0e-3",
                "train.warmup_steps=1", "eval.batch_size=8", "parallel.timeout_s=120"]
    if evaluation:
        settings.append(f"data.eval={project.data(evaluation)}")
    return load_config(None, settings + list(overrides))


def save_second_augment(project: UserProject) -> Path:
    """Another augmenting model over the same tokenizer: other width and depth, its own seed."""
    directory = project.root / "models" / "augment_2"
    if not (directory / "config.json").is_file():
        model = tiny_causal_lm("llama", len(project.tokenizer), hidden=24, layers=3, heads=2, seed=5,
                               eos_id=project.tokenizer.eos_token_id)
        model.save_pretrained(directory)
        project.tokenizer.save_pretrained(directory)
    return directory


def prepared_job(project: UserProject, root: Path, *overrides: str, **kwargs):
    """The checked, data-prepared generic job over the project (nothing of a run written yet)."""
    from calm_dist.train.job import prepare_job

    return prepare_job(generic_config(project, root, *overrides, **kwargs), log=lambda _: None)


def single_process_run(job, model=None):
    """The single-process twin over a prepared job: (per-step losses, {(step, set): EvalReport}, bridges).
    ``model``: the composed model to train (default: ``build_local_model(job)``)."""
    from calm_dist.reports import EvalReport
    from calm_dist.train.job import build_local_model
    from calm_dist.train.local import LoopSettings, train_in_process

    torch.set_num_threads(1)
    model = build_local_model(job) if model is None else model
    reports = []
    config = job.config
    settings = LoopSettings(config.train, config.eval, config.run.seed, config.deepspeed.bf16)
    train_in_process(model, job.data, settings, reports.append, show_progress=False)
    losses = [r.loss for r in reports if not isinstance(r, EvalReport)]
    evaluations = {(r.step, r.name): r for r in reports if isinstance(r, EvalReport)}
    return losses, evaluations, model.composition_state_dict()


OWN_ALPHABET = "abcdefghijklmnopqrstuvwxyz =>\n<|_"


def chunk_tokenizer(width: int, bos: bool) -> transformers.PreTrainedTokenizerFast:
    """A tokenizer of its own for an augmenting model: it cuts a text, left to right, into chunks of ``width``
    characters (the last may be shorter; spaces and newlines included), so between it and the project's BPE
    tokens straddle each other's boundaries. Characters outside ``OWN_ALPHABET`` are ``<unk>``. With ``bos``
    it starts every text with its BOS (a zero-width token); it adds no EOS and has no pad token."""
    import itertools

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for length in range(1, width + 1):
        for chunk in itertools.product(OWN_ALPHABET, repeat=length):
            vocab["".join(chunk)] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(f"(?:.|\\n){{1,{width}}}"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    if bos:
        backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>",
                                                eos_token="</s>")


def save_own_tokenizer_augment(project: UserProject, width: int, bos: bool, *, arch: str = "llama",
                               max_positions: int = 256, seed: int = 7) -> Path:
    """An augmenting model with a tokenizer of its own (``chunk_tokenizer(width, bos)``), saved with it."""
    directory = project.root / "models" / f"own_chunks{width}{'_bos' if bos else ''}_{arch}_{max_positions}"
    if not (directory / "config.json").is_file():
        tokenizer = chunk_tokenizer(width, bos)
        model = tiny_causal_lm(arch, len(tokenizer), hidden=24, layers=3, heads=2, seed=seed,
                               eos_id=tokenizer.eos_token_id)
        if arch == "llama":
            model.config.max_position_embeddings = max_positions
        else:
            model.config.n_positions = max_positions  # gpt2: only what the position table covers
        model.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
    return directory
