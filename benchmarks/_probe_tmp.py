import os, sys, threading, time, gc, json
from pathlib import Path
import torch
from benchmarks import bench_anchor_memory as B
from benchmarks._common import spawn_ranks, init_anchor_world, current_rss_bytes, peak_rss_bytes, log, anchor_step_fn, anchor_only_groups

def status():
    d = {}
    for line in open("/proc/self/status"):
        k, _, v = line.partition(":")
        if k in ("RssAnon", "RssFile", "VmRSS"):
            d[k] = int(v.split()[0]) * 1024
    return d

class Sampler(threading.Thread):
    def __init__(self):
        super().__init__(daemon=True); self.max = {}; self.running = True
    def run(self):
        while self.running:
            for k, v in status().items(): self.max[k] = max(self.max.get(k, 0), v)
            time.sleep(0.02)

def rank_fn(rank, world, model_dir, size):
    from calm_dist.config import load_config
    from calm_dist.distributed.zero_anchor import deepspeed_config, load_partitioned
    init_anchor_world()
    config = load_config(None, ["deepspeed.param_persistence_threshold=0", f"train.batch_size={world}"])
    batch, states = B.step_inputs(rank, size)
    B.import_loading_code(model_dir)
    gc.collect()
    base = status()
    s = Sampler(); s.start()
    anchor = load_partitioned(model_dir, deepspeed_config(config, 1))
    time.sleep(0.1)
    load_max = dict(s.max); s.max = {}
    after = status()
    engine = B.composed_engine(anchor, size, config)
    step = anchor_step_fn(engine, anchor_only_groups(world, rank, [0], 1), B.AUGMENT_HIDDEN)
    step(batch, states)
    time.sleep(0.1)
    s.running = False
    step_max = dict(s.max)
    M = 1 << 20
    fmt = lambda d: {k: round((v - base[k]) / M) for k, v in d.items()}
    return {"rank": rank, "base": {k: v // M for k, v in base.items()}, "load_max": fmt(load_max), "after_load": fmt(after), "step_max": fmt(step_max)}

if __name__ == "__main__":
    size = B.DEFAULT_SIZE
    d = Path("/tmp/probe/ckpt")
    B.ensure_checkpoint(size, d)
    n = int(sys.argv[1])
    for r in spawn_ranks(rank_fn, n, (str(d), size), Path(f"/tmp/probe/out{n}")):
        print(json.dumps(r), file=sys.stderr)
