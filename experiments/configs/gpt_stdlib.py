"""A byte-level GPT language model on the Python standard library (CPU scale).

Data `python_stdlib` (`experiments/data.py`): the first 750 kB of this Python's
top-level stdlib `*.py` files, the last 10 % for validation; final.json records
its sha256 and size (`data_kw.sha256` pins it; unset: it depends on the Python
version). gpt_tiny at 2 blocks (d_model 128), windows of 64 bytes, batch 32, 2
epochs of 329 steps, AdamW lr 3e-3 cosine; dense by default. Numbers: README.

    python -m experiments.main --config experiments/configs/gpt_stdlib.py --workdir /tmp/gpt_dense
    python -m experiments.main --config experiments/configs/gpt_stdlib.py \
        --config.method=global_magnitude --config.method_kw.sparsity=0.5
"""

from ml_collections import config_dict

from experiments.configs import _base


def get_config():
  c = _base.base_config()
  c.update(dict(method="dense", model="gpt_tiny", dataset="python_stdlib",
                batch_size=32, eval_batch_size=128, num_epochs=2, lr=3e-3,
                lr_schedule="cosine", optimizer="adamw", weight_decay=0.0))
  c.optimizer_kw = dict(b1=0.9, b2=0.95, weight_decay=0.01)
  c.model_kw = dict(num_layers=2, d_model=128, num_heads=4, mlp_dim=512)
  c.data_kw = dict(seq_len=64, max_bytes=750_000, sha256=config_dict.placeholder(str))
  c.method_kw.every_epochs = 1.0  # the pruning methods' events: one for 50 %
  return c
