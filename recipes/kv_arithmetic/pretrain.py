"""Training m_A and m_B from scratch (the default job's base models), cached by fingerprint."""
from __future__ import annotations

import json
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import torch

import data_pipeline as dp
from calm_dist.config import Config
from calm_dist.model.loss import causal_lm_loss
from calm_dist.train.base_models import build_model, cache_key, load_pretrained, save_atomically
from calm_dist.train.loop import OptimSettings, train_loop
from calm_dist.train.task_data import ANCHOR_TRAIN, AUGMENT_TRAIN, TaskData

SIDES = {"augment": AUGMENT_TRAIN, "anchor": ANCHOR_TRAIN}


def model_dir(config: Config, side: str, task_data: TaskData) -> Path:
    """Where a side's model is: its configured path, or its cache entry."""
    base = getattr(config, side)
    if base.model.path:
        return Path(base.model.path)
    key = cache_key(base, task_data.split_fingerprint(SIDES[side]), config.run.seed)
    return Path(config.run.cache_dir) / "models" / f"{side}-{key}"


class _ThreadHandover:
    """Side by side each model trains on one thread; the one still training when the other is done
    takes every thread for the rest of its steps."""

    def __init__(self, other_done, all_threads: int):
        self.other_done, self.all_threads, self.taken = other_done, all_threads, False

    def __call__(self) -> None:
        if not self.taken and self.other_done is not None and self.other_done.is_set():
            torch.set_num_threads(self.all_threads)
            self.taken = True


def init_seed(config: Config, side: str) -> int:
    """The seed of a side's initial weights and of its training batches."""
    return config.run.seed + (1 if side == "augment" else 2)


def pretrain_on_split(config: Config, side: str, split: str, task_data: TaskData, target: Path) -> dict:
    """Trains a model like ``side``'s (architecture, settings, seed) on another split, saved to ``target``."""
    return _pretrain(config, side, task_data, target, config.run.threads, split=split)


def _pretrain(config: Config, side: str, task_data: TaskData, target: Path, threads: int,
              done=None, other_done=None, all_threads: int = 0, split: str | None = None) -> dict:
    if threads:
        torch.set_num_threads(threads)
    handover = _ThreadHandover(other_done, all_threads)
    base = getattr(config, side)
    split = split or SIDES[side]
    seed = init_seed(config, side)
    model = build_model(base.model, task_data.vocab_size, task_data.special_ids, seed).train()
    reader = dp.ShardedReader(task_data.directory, split, base.pretrain.batch_size, seed=seed,
                              pad_id=task_data.special_ids["pad_token_id"])
    log = []

    def loss_fn(batch):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return causal_lm_loss(logits, batch["labels"], batch["attention_mask"])

    start = time.perf_counter()
    train_loop(loss_fn, list(model.parameters()), reader, OptimSettings.of(base.pretrain),
               description=f"pretrain {side} ({'m_A' if side == 'augment' else 'm_B'}) on {split}",
               on_step=lambda step, loss, lr: (log.append({"step": step, "loss": loss, "lr": lr}), handover()))
    seconds = time.perf_counter() - start
    if done is not None:
        done.set()
    if base.zero_unseen_embeddings:
        zero_unseen_embeddings(model, task_data, split)
    tokenizer = dp.load_tokenizer(task_data.tokenizer_dir)
    save_atomically(model.eval(), tokenizer, target, {"side": side, "split": split, "seconds": seconds, "log": log})
    return {"side": side, "seconds": seconds, "final_loss": log[-1]["loss"]}


def zero_unseen_embeddings(model, task_data: TaskData, split: str) -> int:
    """Zeroes the input embeddings of the tokens that never occur in ``split``; returns their count."""
    table, _ = dp.load_split(task_data.directory, split)
    seen = torch.from_numpy(np.unique(pc.list_flatten(table.column("input_ids")).to_numpy()))
    embeddings = model.get_input_embeddings().weight
    unseen = torch.ones(embeddings.shape[0], dtype=torch.bool)
    unseen[seen] = False
    with torch.no_grad():
        embeddings[unseen] = 0
    return int(unseen.sum())


def ensure_base_models(config: Config, task_data: TaskData) -> dict[str, Path]:
    """Both base models' directories; trains the missing ones (side by side when both are)."""
    targets = {side: model_dir(config, side, task_data) for side in SIDES}
    missing = [side for side, path in targets.items() if not (path / "config.json").is_file()]
    for side in missing:
        if getattr(config, side).model.path:
            load_pretrained(targets[side], side)  # raises FileNotFoundError naming the key
    all_threads = config.run.threads or torch.get_num_threads()
    if len(missing) == 2 and all_threads >= 2:
        context = multiprocessing.get_context("spawn")
        with context.Manager() as manager, ProcessPoolExecutor(max_workers=2, mp_context=context) as pool:
            done = {side: manager.Event() for side in missing}
            futures = [pool.submit(_pretrain, config, side, task_data, targets[side], 1, done[side],
                                   done[other], all_threads) for side, other in zip(missing, reversed(missing))]
            for future in futures:
                future.result()
    else:
        for side in missing:
            _pretrain(config, side, task_data, targets[side], config.run.threads)
    return targets


def pretrain_summary(path: Path) -> dict:
    info = json.loads((path / "calm_dist_base.json").read_text()) if (path / "calm_dist_base.json").is_file() else {}
    return {"seconds": info.get("seconds"), "final_loss": (info.get("log") or [{}])[-1].get("loss")}
