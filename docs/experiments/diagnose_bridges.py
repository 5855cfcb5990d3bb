"""Where a trained KV-arithmetic composition fails: probes of the composed anchor's residual stream at key
positions (fitted on held-in keys, scored on held-out keys), and the same positions read with m_B's own probe
for numbers; the bridges' attention at key positions; accuracy with each bridge switched off (investigation row 53).

    PYTHONPATH=. python docs/experiments/diagnose_bridges.py RUN_DIR/export TASK_DATA_DIR
"""
import json, sys
from pathlib import Path
import torch
from transformers import AutoTokenizer, AutoModelForCausalLM
from calm_dist.model.hf import CALMForCausalLM
from calm_dist.model import bridge as bridge_mod
import torch.nn.functional as F

export, data_dir = sys.argv[1], Path(sys.argv[2])
hf = CALMForCausalLM.from_pretrained(export).eval()
calm = hf.calm
tok = AutoTokenizer.from_pretrained(export); tok.padding_side = "right"
rows = lambda name: [json.loads(l) for l in (data_dir / f"{name}.jsonl").read_text().splitlines()]
values = {}
for r in rows("augment_train"):
    values.update({k: int(v) for k, v in zip(r["prompt"].split()[:-1:2], r["completion"].split()[::2])})
kv = lambda rs: [r for r in rs if r["prompt"].split()[0].isalpha()]
heldin, heldout = kv(rows("composition_train"))[:3000], kv(rows("eval_kv_arithmetic"))
numeric_train = rows("anchor_train")[:3000]
layers = calm.anchor.model.layers
captured = {}
hooks = [layer.register_forward_hook(lambda m, i, o, idx=idx: captured.__setitem__(idx, o[0] if isinstance(o, tuple) else o))
         for idx, layer in enumerate(layers)]
hooks.append(calm.anchor.model.embed_tokens.register_forward_hook(lambda m, i, o: captured.__setitem__(-1, o)))
attn = {}
orig_attend = bridge_mod.CrossAttentionBridge._attend
def recording_attend(self, queries, bridge_input):
    keys, vals = self.project_memory(bridge_input.augment_hidden)
    mask = bridge_input.mask.additive(queries.dtype, queries.device)
    scores = queries @ keys.transpose(-1, -2) / self.head_dim ** 0.5
    if mask is not None: scores = scores + mask
    positions = self._position_logits(queries.shape[2], keys.shape[2], queries)
    if positions is not None: scores = scores + positions
    attn[id(self)] = scores.softmax(-1)
    return orig_attend(self, queries, bridge_input)
bridge_mod.CrossAttentionBridge._attend = recording_attend

def run(model_fn, rs):
    """Per row: predicted first answer token, and per-layer states at operand positions."""
    out = []
    for i in range(0, len(rs), 250):
        batch = rs[i:i + 250]
        enc = tok([r["prompt"] for r in batch], return_tensors="pt", padding=True)
        with torch.no_grad():
            logits = model_fn(enc)
        last = enc["attention_mask"].sum(1) - 1
        for b, r in enumerate(batch):
            words = r["prompt"].split()
            pred = tok.convert_ids_to_tokens(int(logits[b, last[b]].argmax()))
            operands = [(w + 1, word) for w, word in enumerate(words) if w % 2 == 0 and word != "="]
            states = {l: [captured[l][b, p].clone() for p, _ in operands] for l in captured}
            att = {name: a[b] for name, a in attn.items()}
            out.append(dict(pred=pred, answer=r["completion"].strip(), operands=operands, states=states,
                            attn={n: torch.stack([a[:, p, :p + 1].mean(0)[-1] for p, _ in operands]) for n, a in att.items()}))
    return out

composed = lambda enc: calm(enc["input_ids"], attention_mask=enc["attention_mask"]).logits
value_of = lambda word: values[word] if word.isalpha() else int(word)

def fit(xs, ys, classes=16):
    x, y = torch.stack(xs), torch.tensor(ys)
    mu, sd = x.mean(0), x.std(0) + 1e-5
    w = torch.zeros(x.shape[1], classes, requires_grad=True); bias = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.Adam([w, bias], lr=1e-2)
    for _ in range(300):
        opt.zero_grad(); F.cross_entropy(((x - mu) / sd) @ w + bias, y).backward(); opt.step()
    return lambda xs2: (((torch.stack(xs2) - mu) / sd) @ w + bias).argmax(-1)

def accuracy(f, res, layer):
    xs = [s for r in res for s in r["states"][layer]]
    ys = torch.tensor([value_of(w) for r in res for _, w in r["operands"]])
    return 100 * (f(xs) == ys).float().mean().item()

res_in, res_out = run(composed, heldin), run(composed, heldout)
res_num = run(composed, numeric_train)  # numeric prompts: m_B's own number representation (bridges add ~0 there)
acc = lambda res: 100 * sum(r["pred"] == r["answer"] for r in res) / len(res)
print(f"composed exact match: held-in D_C prompts {acc(res_in):.1f}, held-out {acc(res_out):.1f}, numeric {acc(res_num):.1f}")
print("layer  probe(held-in keys -> held-out keys)  m_B's number probe on held-out keys")
for layer in sorted(captured):
    f_keys = fit([s for r in res_in for s in r["states"][layer]], [value_of(w) for r in res_in for _, w in r["operands"]])
    f_num = fit([s for r in res_num for s in r["states"][layer]], [value_of(w) for r in res_num for _, w in r["operands"]])
    print(f"{layer:5d}  {accuracy(f_keys, res_out, layer):6.1f}  {accuracy(f_num, res_out, layer):6.1f}   (number probe on numbers {accuracy(f_num, res_num, layer):.1f})")
print("bridge attention at operand positions: mass on the operand's own augment position, by slot")
for index, b in enumerate(calm.bridges):
    slots = {}
    for r in res_out:
        for slot, mass in enumerate(r["attn"][id(b)].tolist()):
            slots.setdefault(slot, []).append(mass)
    print(f"bridge {index}: " + ", ".join(f"slot {s}: {sum(v) / len(v):.2f}" for s, v in sorted(slots.items())))
for index, b in enumerate(calm.bridges):
    saved = b.o_proj.weight.data.clone(); b.o_proj.weight.data.zero_()
    print(f"bridge {index} off: held-out {acc(run(composed, heldout)):.1f}")
    b.o_proj.weight.data.copy_(saved)
