"""Training m_A and m_B from scratch (the default job's base models), cached by fingerprint."""
from __future__ import annotations

import json
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

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


def _pretrain(config: Config, side: str, task_data: TaskData, target: Path, threads: int) -> dict:
    if threads:
        torch.set_num_threads(threads)
    base = getattr(config, side)
    seed = config.run.seed + (1 if side == "augment" else 2)
    model = build_model(base.model, task_data.vocab_size, task_data.special_ids, seed).train()
    reader = dp.ShardedReader(task_data.directory, SIDES[side], base.pretrain.batch_size, seed=seed,
                              pad_id=task_data.special_ids["pad_token_id"])
    log = []

    def loss_fn(batch):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return causal_lm_loss(logits, batch["labels"], batch["attention_mask"])

    start = time.perf_counter()
    train_loop(loss_fn, list(model.parameters()), reader, OptimSettings.of(base.pretrain),
               description=f"pretrain {side} ({'m_A' if side == 'augment' else 'm_B'})",
               on_step=lambda step, loss, lr: log.append({"step": step, "loss": loss, "lr": lr}))
    seconds = time.perf_counter() - start
    tokenizer = dp.load_tokenizer(task_data.tokenizer_dir)
    save_atomically(model.eval(), tokenizer, target, {"side": side, "seconds": seconds, "log": log})
    return {"side": side, "seconds": seconds, "final_loss": log[-1]["loss"]}


def ensure_base_models(config: Config, task_data: TaskData) -> dict[str, Path]:
    """Both base models' directories; trains the missing ones (side by side when both are)."""
    targets = {side: model_dir(config, side, task_data) for side in SIDES}
    missing = [side for side, path in targets.items() if not (path / "config.json").is_file()]
    for side in missing:
        if getattr(config, side).model.path:
            load_pretrained(targets[side], side)  # raises FileNotFoundError naming the key
    if len(missing) == 2 and (config.run.threads or torch.get_num_threads()) >= 2:
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=2, mp_context=context) as pool:
            futures = [pool.submit(_pretrain, config, side, task_data, targets[side], 1) for side in missing]
            for future in futures:
                future.result()
    else:
        for side in missing:
            _pretrain(config, side, task_data, targets[side], config.run.threads)
    return targets


def pretrain_summary(path: Path) -> dict:
    info = json.loads((path / "calm_dist_base.json").read_text()) if (path / "calm_dist_base.json").is_file() else {}
    return {"seconds": info.get("seconds"), "final_loss": (info.get("log") or [{}])[-1].get("loss")}
