"""Where a trained KV-arithmetic composition's errors come from: each prompt is asked again with its keys
replaced by their values (its numeric twin), so an error is either reading (the twin is right) or arithmetic
(the twin is wrong too); accuracy by operand count, largest value, key length and the answer's sign, and how far
off the wrong answers are (investigation rows 61, 83).

    PYTHONPATH=. python docs/experiments/kv_errors.py RUN_DIR/export TASK_DATA_DIR [EVAL_SET]
"""
import collections
import json
import sys
from pathlib import Path

import torch
from transformers import AutoTokenizer

from calm_dist.model.hf import CALMForCausalLM

export, data_dir = sys.argv[1], Path(sys.argv[2])
eval_set = sys.argv[3] if len(sys.argv) > 3 else "eval_kv_arithmetic"
model = CALMForCausalLM.from_pretrained(export).eval()
tok = AutoTokenizer.from_pretrained(export)
tok.padding_side = "left"


def rows(name):
    return [json.loads(line) for line in (data_dir / f"{name}.jsonl").read_text().splitlines()]


values = {}  # m_A's training prompts list keys, its completions their values, in the same order
for row in rows("augment_train"):
    values.update({key: int(value) for key, value in zip(row["prompt"].split()[:-1:2], row["completion"].split()[::2])})


def answers(prompts):
    out = []
    for start in range(0, len(prompts), 100):
        batch = tok(prompts[start:start + 100], return_tensors="pt", padding=True)
        with torch.no_grad():
            generated = model.generate(**batch, max_new_tokens=4, do_sample=False)
        texts = tok.batch_decode(generated[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
        out += [(text.split() or [""])[0] for text in texts]
    return out


examples = rows(eval_set)
truth = [row["completion"].strip() for row in examples]
composed = answers([row["prompt"] for row in examples])
twins = answers([" ".join(str(values.get(token, token)) for token in row["prompt"].split()) for row in examples])
outcomes = collections.Counter()
by_group = collections.defaultdict(lambda: [0, 0])
misses = collections.Counter()  # (operand count, answer - right answer): a misread key gives a near or a far number
for row, got, twin, want in zip(examples, composed, twins, truth):
    keys = [token for token in row["prompt"].split() if token in values]
    outcomes[f"{'right' if got == want else 'wrong'}, twin {'right' if twin == want else 'wrong'}"] += 1
    for group in (f"operands {len(keys)}", f"largest value {max(values[k] for k in keys) // 4 * 4}-",
                  f"longest key {max(len(k) for k in keys)} letters", f"answer {'< 0' if want.startswith('-') else '>= 0'}"):
        by_group[group][0] += got == want
        by_group[group][1] += 1
    if got != want and got.lstrip("-").isdigit():
        misses[(len(keys), int(got) - int(want))] += 1

def percent_right(got):
    return 100 * sum(g == w for g, w in zip(got, truth)) / len(truth)


print(f"{eval_set}: {len(examples)} prompts, composed {percent_right(composed):.1f}, numeric twins {percent_right(twins):.1f}")
for outcome, count in sorted(outcomes.items()):
    print(f"  {outcome}: {count}")
for group, (right, total) in sorted(by_group.items()):
    print(f"  {group}: {100 * right / total:.1f} of {total}")

for (operands, off), count in sorted(misses.items()):
    print(f"  {operands} operands, answer off by {off:+d}: {count}")

# Which key of a 3-operand prompt is misread: accuracy with only that key written as its value.
three = [(row, want) for row, want in zip(examples, truth) if len(row["prompt"].split()) == 6]
for position in range(3):
    prompts = []
    for row, _ in three:
        tokens = row["prompt"].split()
        tokens[2 * position] = str(values[tokens[2 * position]])
        prompts.append(" ".join(tokens))
    got = answers(prompts)
    right = sum(g == want for g, (_, want) in zip(got, three))
    print(f"  3 operands, operand {position + 1} given as a number: {100 * right / len(three):.1f} of {len(three)}")
