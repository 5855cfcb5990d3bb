"""Investigation row 13: a copy of m_B whose input embeddings of the tokens it never trained on (the keys)
are zero, so the anchor cannot tell one key from another.

    python docs/experiments/zero_unseen_embeddings.py DATA_DIR ANCHOR_DIR OUT_DIR

DATA_DIR is the task data under run.cache_dir (data-<hash>/), ANCHOR_DIR the cached m_B
(models/anchor-<hash>/); then run the job with ``--set anchor.model.path=OUT_DIR``.
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import torch
from transformers import AutoModelForCausalLM

import data_pipeline as dp


def main(data_dir: str, anchor_dir: str, out_dir: str) -> None:
    table, _ = dp.load_split(Path(data_dir), "anchor_train")
    seen = set(np.unique(pc.list_flatten(table.column("input_ids")).to_numpy()).tolist())
    model = AutoModelForCausalLM.from_pretrained(anchor_dir)
    embeddings = model.get_input_embeddings().weight
    unseen = [i for i in range(embeddings.shape[0]) if i not in seen]
    with torch.no_grad():
        embeddings[unseen] = 0
    out = Path(out_dir)
    shutil.rmtree(out, ignore_errors=True)
    model.save_pretrained(out)
    for item in Path(anchor_dir).iterdir():  # tokenizer and calm_dist metadata
        if item.is_file() and not (out / item.name).exists():
            shutil.copy(item, out / item.name)
    print(f"{len(unseen)} of {embeddings.shape[0]} token embeddings zeroed -> {out}")


if __name__ == "__main__":
    main(*sys.argv[1:4])
