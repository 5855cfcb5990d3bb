"""Investigation row 52: how much m_B's last position ("=") attends to the operand positions, by layer, on
KV-Arithmetic prompts (keys: zero embeddings, or with `mean` the mean embedding of the values 0..15) and on the
same expressions written in numbers; and m_B's exact match on each.

    PYTHONPATH=. python docs/experiments/anchor_attention_to_operands.py TASK_DATA_DIR ANCHOR_DIR [mean]
"""
import json, sys
from pathlib import Path
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
data_dir, anchor = Path(sys.argv[1]), sys.argv[2]
fill = sys.argv[3] if len(sys.argv) > 3 else "zero"
tok = AutoTokenizer.from_pretrained(anchor)
m = AutoModelForCausalLM.from_pretrained(anchor, attn_implementation="eager").eval()
rows = lambda name: [json.loads(l) for l in (data_dir / f"{name}.jsonl").read_text().splitlines()]
values = {}
for r in rows("augment_train"):
    values.update({k: int(v) for k, v in zip(r["prompt"].split()[:-1:2], r["completion"].split()[::2])})
emb = m.model.embed_tokens.weight.data
number_ids = [tok.convert_tokens_to_ids(str(v)) for v in range(16)]
key_ids = [tok.convert_tokens_to_ids(k) for k in values]
print("key emb norm", emb[key_ids].norm(dim=-1).mean().item(), "number emb norm", emb[number_ids].norm(dim=-1).mean().item())
if fill == "mean":
    emb[key_ids] = emb[number_ids].mean(0)
kv = [r for r in rows("eval_kv_arithmetic")][:400]
num = [{"prompt": " ".join(str(values[w]) if w.isalpha() else w for w in r["prompt"].split()), "completion": r["completion"]} for r in kv]
for name, rs in (("kv", kv), ("same expressions in numbers", num)):
    enc = tok([r["prompt"] for r in rs], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = m(**enc, output_attentions=True)
    last = enc["attention_mask"].sum(1) - 1
    pred = [tok.convert_ids_to_tokens(int(out.logits[b, last[b]].argmax())) for b in range(len(rs))]
    acc = 100 * sum(p == r["completion"].strip() for p, r in zip(pred, rs)) / len(rs)
    masses = []
    for layer, a in enumerate(out.attentions):
        tot = 0.0
        for b, r in enumerate(rs):
            words = r["prompt"].split()
            ops = [w + 1 for w in range(0, len(words) - 1, 2)]
            tot += a[b, :, last[b], ops].sum(-1).mean().item()
        masses.append(tot / len(rs))
    print(f"{name}: exact match {acc:.1f}; attention of '=' on operand positions by layer", " ".join(f"{x:.2f}" for x in masses))
