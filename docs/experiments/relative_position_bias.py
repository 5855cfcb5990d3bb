"""Investigation rows 17, 22 and 23: bridges with a learned relative-position bias over the distance
between the anchor position and the augment position (buckets 0..BUCKETS-1, the last one for every
longer distance), added to the cross-attention logits. With the anchor's key embeddings zero its
query at a key position carries nothing about the key, so without positions the bridge cannot single
out the current key's m_A state; the bias lets it.

    PYTHONPATH=. python docs/experiments/relative_position_bias.py ANCHOR_DIR AUGMENT_DIR BUCKETS STEPS \
        [--same-position-init LOGIT] [--set overrides]

ANCHOR_DIR / AUGMENT_DIR: saved m_B / m_A (the KV recipe's cache entries under
run.cache_dir/kv_arithmetic/models/, m_B trained with recipe.anchor.zero_unseen_embeddings=true). Runs
the generic job's composition of configs/kv_arithmetic_200keys.yaml (the first default job) with the
overrides given, in one process, on the recipe's data, then the recipe's table.
The bias starts at zero, or with LOGIT in bucket 0 (an anchor position reading its own augment
position) for every head: Adam moves a logit by about the learning rate per step, so a zero-initialised
bias stays small for the whole run.
"""
import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from calm_dist.config import load_config
from calm_dist.model.bridge import CrossAttentionBridge
from calm_dist.train.job import Timer, build_local_model, open_run_dir, prepare_job, write_results
from calm_dist.train.local import LoopSettings, train_in_process
from calm_dist.train.report import MetricsLogger
from recipes.kv_arithmetic import recipe
from recipes.kv_arithmetic.recipe import Prepared, job_config
from recipes.kv_arithmetic.settings import recipe_settings
from recipes.kv_arithmetic.task_data import max_length, prepare_task_files


def biased_forward(self, hidden, bridge_input):
    keys, values = self.project_memory(bridge_input.augment_hidden)
    if bridge_input.cache is not None:
        keys, values = bridge_input.cache.extend(keys, values)
    queries = self._heads(self.q_proj(hidden.to(self.q_proj.weight.dtype)))
    blocked = torch.full((), torch.finfo(queries.dtype).min, dtype=queries.dtype)
    mask = torch.where(bridge_input.mask.allowed, torch.zeros((), dtype=queries.dtype), blocked)
    buckets = self.position_bias.shape[1]
    query_len, key_len = queries.shape[2], keys.shape[2]
    distance = torch.arange(key_len - query_len, key_len)[:, None] - torch.arange(key_len)[None, :]
    mask = mask + self.position_bias[:, distance.clamp(0, buckets - 1)][None]
    attended = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask)
    attended = attended * bridge_input.mask.query_has_key.to(attended.dtype)
    batch, _, length, _ = attended.shape
    attended = attended.transpose(1, 2).reshape(batch, length, self.num_heads * self.head_dim)
    return self.o_proj(attended).to(hidden.dtype)


def main(anchor_dir: str, augment_dir: str, buckets: int, steps: int, same_position_init: float,
         overrides: list[str]) -> None:
    CrossAttentionBridge.forward = biased_forward
    config = load_config("configs/kv_arithmetic_200keys.yaml",
                         ["run.launcher=local", f"train.max_steps={steps}",
                          f"run.name=position_bias-{buckets}-{steps}", *overrides])
    settings = recipe_settings(config)
    files = prepare_task_files(config.run.cache_dir, settings.data, config.run.seed)
    config = job_config(config, Prepared(files, Path(anchor_dir), Path(augment_dir), {}), max_length(settings.data))
    job = prepare_job(config)
    model = build_local_model(job)
    for bridge in model.bridges:
        bias = torch.zeros(bridge.num_heads, buckets)
        bias[:, 0] = same_position_init
        bridge.position_bias = torch.nn.Parameter(bias)
    run_dir = open_run_dir(job)
    logger = MetricsLogger(run_dir)
    try:
        train_in_process(model, job.data, LoopSettings(config.train, config.eval, config.run.seed),
                         lambda report: logger.log(report.record()))
    finally:
        logger.close()
    write_results(job, model.composition_state_dict(), Timer())
    recipe.finish(config, run_dir)
    print(run_dir)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("anchor_dir")
    parser.add_argument("augment_dir")
    parser.add_argument("buckets", type=int)
    parser.add_argument("steps", type=int)
    parser.add_argument("--same-position-init", type=float, default=0.0, metavar="LOGIT")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", dest="overrides")
    args = parser.parse_args()
    main(args.anchor_dir, args.augment_dir, args.buckets, args.steps, args.same_position_init, args.overrides)
