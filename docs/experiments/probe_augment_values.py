"""Investigation row 51: linear probes of m_A's states (HF hidden_states: 0 = embeddings) at each operand slot of
KV-Arithmetic prompts, fitted on D_C's prompts (held-in keys) and scored on the held-out evaluation prompts.

    PYTHONPATH=. python docs/experiments/probe_augment_values.py TASK_DATA_DIR AUGMENT_DIR

TASK_DATA_DIR / AUGMENT_DIR: the KV recipe's cache entries (run.cache_dir/kv_arithmetic/data-… and models/augment-…).
"""
import json, sys, random
from pathlib import Path
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

data_dir, model_dir = Path(sys.argv[1]), sys.argv[2]
torch.manual_seed(0)
rows = lambda name: [json.loads(l) for l in (data_dir / f"{name}.jsonl").read_text().splitlines()]
values = {}
for r in rows("augment_train"):
    ks = r["prompt"].split()[:-1:2]; vs = r["completion"].split()[::2]
    values.update({k: int(v) for k, v in zip(ks, vs)})
def kv_rows(name):
    return [r for r in rows(name) if r["prompt"].split()[0].isalpha()]
train = kv_rows("composition_train")[:4000]
heldout = kv_rows("eval_kv_arithmetic")
tok = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForCausalLM.from_pretrained(model_dir).eval()

def states(rs):
    feats = {}  # (layer, slot) -> list of (vector, label)
    for i in range(0, len(rs), 200):
        batch = rs[i:i+200]
        enc = tok([r["prompt"] for r in batch], return_tensors="pt", padding=True)
        with torch.no_grad():
            hs = model(**enc, output_hidden_states=True).hidden_states
        for b, r in enumerate(batch):
            words = r["prompt"].split()
            for w, word in enumerate(words):
                pos = w + 1  # BOS first
                if word.isalpha():
                    slot, label = f"key{w//2}", values[word]
                elif word == "=":
                    slot, label = "eq->key0", values[words[0]]
                elif w % 2 == 1:
                    slot, label = f"op-after-key{w//2}", values[words[w-1]]
                else:
                    continue
                for layer, h in enumerate(hs):
                    feats.setdefault((layer, slot), []).append((h[b, pos], label))
    return feats

def fit(xs, ys, classes=16):
    x = torch.stack(xs); y = torch.tensor(ys)
    mu, sd = x.mean(0), x.std(0) + 1e-5
    w = torch.zeros(x.shape[1], classes, requires_grad=True); bias = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.Adam([w, bias], lr=1e-2)
    for _ in range(300):
        opt.zero_grad(); loss = torch.nn.functional.cross_entropy(((x - mu) / sd) @ w + bias, y) + 1e-3 * w.pow(2).sum(); loss.backward(); opt.step()
    return lambda xs2: (((torch.stack(xs2) - mu) / sd) @ w + bias).argmax(-1)

tr, te = states(train), states(heldout)
print(f"{len(values)} keys; probe trained on {len(train)} D_C prompts, scored on {len(heldout)} held-out prompts")
print("layer slot train_acc heldout_acc")
for (layer, slot), items in sorted(tr.items()):
    if (layer, slot) not in te: continue
    f = fit([v for v, _ in items], [l for _, l in items])
    acc_tr = (f([v for v, _ in items]) == torch.tensor([l for _, l in items])).float().mean().item()
    acc_te = (f([v for v, _ in te[(layer, slot)]]) == torch.tensor([l for _, l in te[(layer, slot)]])).float().mean().item()
    print(f"{layer} {slot:18s} {100*acc_tr:5.1f} {100*acc_te:5.1f}")
