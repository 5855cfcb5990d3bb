"""The job's own evaluation (teacher-forced exact match, as in the run's table) of exports on a run's
KV-Arithmetic and Numeric evaluation sets (investigation rows 75, 76).

    PYTHONPATH=. python docs/experiments/score_exports.py RUN_DIR EXPORT [EXPORT ...]
"""
import sys
from pathlib import Path

import data_pipeline as dp
from calm_dist.config import load_config
from calm_dist.model.hf import CALMForCausalLM
from calm_dist.train.evaluate import calm_statistics, evaluate_set
from calm_dist.train.job import data_spec
from calm_dist.train.models import plan_models

SETS = ("kv_arithmetic", "kv_arithmetic_heldin", "numeric_arithmetic")

run_dir = Path(sys.argv[1])
config = load_config(str(run_dir / "config.yaml"), [])
_, tokenizer = plan_models(config)
data = dp.prepare_data(data_spec(config), tokenizer, config.run.cache_dir, lambda *args: None)  # the run's, cached
for export in sys.argv[2:]:
    model = CALMForCausalLM.from_pretrained(export).calm.eval()
    scores = {name: evaluate_set(calm_statistics(model), data.eval_dir(name), name, config.eval.batch_size,
                                 data.pad_id).exact_match for name in SETS if name in data.eval_names}
    print(Path(export).name, " ".join(f"{name} {value:.1f}" for name, value in scores.items()), flush=True)
