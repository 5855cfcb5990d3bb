"""Training the recipe's base models from scratch, on the framework's own data path: the JSONL rows are
tokenised by ``data_pipeline.prepare_data`` (as the job tokenises D_C), read by its ``ShardedReader``
and trained by ``calm_dist.train.loop.train_loop``. Each model is cached by its identity."""
from __future__ import annotations

import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import data_pipeline as dp
from calm_dist.optim import OptimSettings
from calm_dist.train.evaluate import causal_lm_statistics
from calm_dist.train.loop import train_loop

from .base_models import (
    DEFAULT_POSITIONS,
    TrainingRecord,
    Vocabulary,
    build_model,
    cache_key,
    is_saved,
    save_atomically,
)
from .settings import BaseModelSettings
from .task_data import RECIPE_DIR
from .tokenizer import load_tokenizer


@dataclass(frozen=True)
class PretrainTask:
    """One base model: its role (the cache entry's name), settings, seed, data and tokenizer."""

    role: str
    settings: BaseModelSettings
    seed: int  # of its initial weights and of its batches' order
    training_file: Path
    eval_file: Path  # tokenised beside the training rows (the data pipeline wants an evaluation set)
    tokenizer_dir: Path
    max_length: int  # tokens of the longest row
    cache_dir: Path  # run.cache_dir
    value_tokens: tuple[str, ...] = ()  # the numbers a key can stand for (settings.unseen_as_mean_value)

    @property
    def max_positions(self) -> int:
        return max(DEFAULT_POSITIONS, self.max_length)

    def model_dir(self) -> Path:
        key = cache_key(self.settings, self.training_file, self.tokenizer_dir, self.seed, self.max_positions)
        return self.cache_dir / RECIPE_DIR / "models" / f"{self.role}-{key}"


def tokenised(task: PretrainTask, log=print) -> dp.PreparedData:
    """The task's rows tokenised by the framework's data pipeline (cached by fingerprint)."""
    spec = dp.DataSpec(dp.DataSource(f"recipe {task.role} training rows", str(task.training_file)),
                       {"eval": dp.DataSource(f"recipe {task.role} evaluation rows", str(task.eval_file))},
                       settings=dp.TokenizeSettings(task.max_length), seed=task.seed)
    data = dp.prepare_data(spec, load_tokenizer(task.tokenizer_dir), task.cache_dir, log)
    summary = data.splits["train"]
    assert summary.rows == summary.rows_in, f"{task.training_file}: rows longer than {task.max_length} tokens"
    return data


def seen_token_ids(data: dp.PreparedData) -> torch.Tensor:
    """Every token id that occurs in the tokenised training rows."""
    import pyarrow.compute as pc

    ids = dp.TokenisedRows(data.train).table.column("input_ids")
    return torch.from_numpy(pc.unique(pc.list_flatten(ids)).to_numpy().astype("int64"))


def zero_unseen_embeddings(model, seen: torch.Tensor, mean_of: torch.Tensor | None = None) -> int:
    """Sets the input embeddings of the tokens not in ``seen`` to zero, or to the mean embedding of the token ids
    ``mean_of``; returns their count."""
    embeddings = model.get_input_embeddings().weight
    unseen = torch.ones(embeddings.shape[0], dtype=torch.bool)
    unseen[seen] = False
    with torch.no_grad():
        embeddings[unseen] = 0 if mean_of is None else embeddings[mean_of].mean(0)
    return int(unseen.sum())


class _ThreadHandover:
    """Side by side each model trains on one thread; the one still training when the other is done
    takes every thread for the rest of its steps."""

    def __init__(self, other_done, all_threads: int):
        self.other_done, self.all_threads, self.taken = other_done, all_threads, False

    def __call__(self) -> None:
        if not self.taken and self.other_done is not None and self.other_done.is_set():
            torch.set_num_threads(self.all_threads)
            self.taken = True


def pretrain(task: PretrainTask, data: dp.PreparedData, threads: int = 0, done=None, other_done=None,
             all_threads: int = 0) -> TrainingRecord:
    """Trains the task's model and saves it to ``task.model_dir()``."""
    if threads:
        torch.set_num_threads(threads)
    handover = _ThreadHandover(other_done, all_threads)
    tokenizer = load_tokenizer(task.tokenizer_dir)
    model = build_model(task.settings.model, Vocabulary.of(tokenizer), task.seed, task.max_positions).train()
    reader = dp.ShardedReader(data.train, task.settings.pretrain.batch_size, seed=task.seed, pad_id=data.pad_id)
    statistics = causal_lm_statistics(model)
    started = time.perf_counter()
    losses = train_loop(lambda batch: statistics(batch).mean_loss, list(model.parameters()), reader,
                        OptimSettings.of(task.settings.pretrain), description=f"pretrain {task.role}",
                        on_step=lambda step, loss, lr: handover())
    seconds = time.perf_counter() - started
    if done is not None:
        done.set()
    mean_of = torch.tensor(tokenizer.convert_tokens_to_ids(list(task.value_tokens))) \
        if task.settings.unseen_as_mean_value else None
    zeroed = zero_unseen_embeddings(model, seen_token_ids(data), mean_of) if task.settings.zero_unseen_embeddings else 0
    record = TrainingRecord(task.role, task.training_file.name, round(seconds, 2), losses, zeroed)
    save_atomically(model.eval(), task.tokenizer_dir, task.model_dir(), asdict(record))
    return record


def die_with_parent(parent: int) -> None:
    """A pool worker is killed when the process that started it dies (Linux), so that a driver killed by
    SIGKILL or the OOM killer leaves no orphan pretraining on; elsewhere the pool's own shutdown has to do."""
    import ctypes
    import signal

    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return
    set_parent_death_signal = 1  # PR_SET_PDEATHSIG
    if hasattr(libc, "prctl"):
        libc.prctl(set_parent_death_signal, signal.SIGKILL)
        if os.getppid() != parent:  # it died before the signal was armed
            os._exit(1)


_finished_events: tuple = ()  # in a side-by-side worker: one event per model, set when it is trained


def _start_pool_worker(parent: int, finished: tuple) -> None:
    """A spawned pretraining process is a fresh interpreter: it dies with the driver and is as quiet."""
    from calm_dist.quiet import quiet_libraries

    global _finished_events
    die_with_parent(parent)
    quiet_libraries()
    _finished_events = finished


def side_by_side_pool() -> ProcessPoolExecutor:
    """Two spawned workers that die with this process. The events that hand threads over reach them at start:
    a ``multiprocessing.Manager``, the other way to share events with a pool, runs a server process that
    outlives a killed driver."""
    context = multiprocessing.get_context("spawn")
    finished = (context.Event(), context.Event())
    return ProcessPoolExecutor(max_workers=2, mp_context=context, initializer=_start_pool_worker,
                               initargs=(os.getpid(), finished))


def _pretrain_side_by_side(index: int, task: PretrainTask, data: dp.PreparedData, all_threads: int):
    return pretrain(task, data, 1, _finished_events[index], _finished_events[1 - index], all_threads)


def ensure_trained(tasks: list[PretrainTask], threads: int = 0, log=print) -> list[Path]:
    """Each task's model directory; trains the missing ones (two side by side when there are two and
    at least two threads)."""
    targets = [task.model_dir() for task in tasks]
    missing = [task for task, target in zip(tasks, targets) if not is_saved(target)]
    prepared = [tokenised(task, log) for task in missing]
    all_threads = threads or torch.get_num_threads()
    if len(missing) == 2 and all_threads >= 2:
        with side_by_side_pool() as pool:
            futures = [pool.submit(_pretrain_side_by_side, index, task, data, all_threads)
                       for index, (task, data) in enumerate(zip(missing, prepared))]
            for future in futures:
                future.result()
    else:
        previous = torch.get_num_threads()
        try:
            for task, data in zip(missing, prepared):
                pretrain(task, data, threads)
        finally:
            torch.set_num_threads(previous)
    return targets
