"""Tests of the text task: the `python_stdlib` corpus and a GPT through the harness."""

from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import pathlib

import numpy as np
import pytest

from experiments import data
from experiments import main
from experiments import train

CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      "experiments", "configs", "gpt_stdlib.py")


def test_corpus_is_deterministic_and_split_by_position():
  first = data.load("python_stdlib", seq_len=32, max_bytes=100_000)
  data._stdlib_corpus.cache_clear()  # read the files again
  second = data.load("python_stdlib", seq_len=32, max_bytes=100_000)
  assert first.info == second.info and first.info["corpus_bytes"] == 100_000
  whole = np.concatenate([first.train.tokens, first.test.tokens])
  assert whole.tobytes() == second.train.tokens.tobytes() + second.test.tokens.tobytes()
  assert hashlib.sha256(whole.tobytes()).hexdigest() == first.info["corpus_sha256"]
  assert len(first.test.tokens) == 10_000  # the last 10 %
  files = sorted(glob.glob(os.path.join(os.path.dirname(os.__file__), "*.py")))
  corpus = data.SEPARATOR.join(pathlib.Path(f).read_bytes() for f in files)
  assert whole.tobytes() == corpus[:100_000]


def test_windows_targets_are_the_inputs_shifted_and_seeded():
  ds = data.load("python_stdlib", seq_len=16, max_bytes=50_000)
  batches = list(data.train_batches(ds, 8, seed=3, epoch=1))
  assert len(batches) == data.steps_per_epoch(ds, 8) == (45_000 - 1) // 16 // 8
  x, y = batches[0]
  assert x.shape == y.shape == (8, 16) and x.dtype == y.dtype == np.int32
  np.testing.assert_array_equal(x[:, 1:], y[:, :-1])
  again = list(data.train_batches(ds, 8, seed=3, epoch=1))
  other = next(data.train_batches(ds, 8, seed=4, epoch=1))
  for (a, b), (c, d) in zip(batches, again):
    assert a.tobytes() == c.tobytes() and b.tobytes() == d.tobytes()
  assert other[0].tobytes() != x.tobytes()
  ex, ey = next(data.eval_batches(ds, 4))  # consecutive, not overlapping
  np.testing.assert_array_equal(ex.reshape(-1), ds.test.tokens[:64])
  assert ey[-1, -1] == ds.test.tokens[64]


def test_hash_pin_mismatch_names_the_field_and_both_hashes():
  ds = data.load("python_stdlib", seq_len=16, max_bytes=20_000)
  digest = ds.info["corpus_sha256"]
  assert data.load("python_stdlib", seq_len=16, max_bytes=20_000,
                   sha256=digest).info == ds.info
  with pytest.raises(ValueError) as err:
    data.load("python_stdlib", seq_len=16, max_bytes=20_000, sha256="ab" * 32)
  msg = str(err.value)
  assert "data_kw.sha256" in msg and digest in msg and "ab" * 32 in msg


TINY = [f"--config={CONFIG}", "--config.model_kw.num_layers=1",
        "--config.model_kw.d_model=16", "--config.model_kw.num_heads=2",
        "--config.model_kw.mlp_dim=32", "--config.data_kw.seq_len=16",
        "--config.data_kw.max_bytes=30000", "--config.batch_size=16",
        "--config.num_epochs=2", "--noprogress"]


def test_tiny_gpt_run_writes_a_finite_validation_perplexity(tmp_path, capsys):
  result = main.run_main(["prog", *TINY, f"--workdir={tmp_path}"])
  assert "val_perplexity=" in capsys.readouterr().out
  with open(tmp_path / "final.json") as f:
    final = json.load(f)
  assert result["val_loss"] == final["val_loss"]
  assert final["steps"] == 2 * ((27_000 - 1) // 16 // 16)
  assert math.isfinite(final["val_perplexity"]) and final["val_perplexity"] > 1
  assert final["val_perplexity"] == pytest.approx(math.exp(final["val_loss"]))
  assert len(final["corpus_sha256"]) == 64 and final["corpus_bytes"] == 30_000
  rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert [r["epoch"] for r in rows] == [1, 2] and "val_loss" in rows[0]
  assert rows[1]["val_loss"] < math.log(256)  # better than uniform bytes


def test_pin_mismatch_and_image_model_are_one_line_cli_errors(tmp_path):
  for args, want in ((["--config.data_kw.sha256=00"], "error: data_kw.sha256: "),
                     (["--config.model=lenet5"], "error: model: lenet5 does not")):
    with pytest.raises(SystemExit) as err:
      main.run_main(["prog", *TINY, *args, f"--workdir={tmp_path}"])
    assert str(err.value.code).startswith(want), err.value.code


def test_text_run_killed_after_an_epoch_resumes_bit_identical(tmp_path):
  main.run_main(["prog", *TINY, f"--workdir={tmp_path / 'a'}"])
  config = main.parse_flags(["prog", *TINY])["config"].value
  train.run(config, str(tmp_path / "b"), progress=False, stop_after_epochs=1)
  main.run_main(["prog", *TINY, "--resume", f"--workdir={tmp_path / 'b'}"])
  a, b = (train.load_final_params(str(tmp_path / w)) for w in "ab")
  assert sorted(a) == sorted(b)
  assert all(a[k].tobytes() == b[k].tobytes() for k in a)


def test_post_training_a_tiny_gpt_keeps_the_embeddings_dense(tmp_path):
  main.run_main(["prog", *TINY, f"--workdir={tmp_path / 'dense'}"])
  post = [a.replace("gpt_stdlib.py", "post_training_gpt_stdlib.py") for a in TINY]
  for method, structure in (("wanda", "unstructured"), ("magnitude_uniform", "2:4")):
    result = main.run_main(["prog", *post, f"--config.method={method}",
                            f"--config.structure={structure}",
                            f"--config.init_from={tmp_path / 'dense'}",
                            f"--workdir={tmp_path / method}"])
    assert math.isfinite(result["val_perplexity"]) and result["sparsity"] == 0.5
    params = train.load_final_params(str(tmp_path / method))
    embeddings = [k for k in params if "embed" in k]
    assert embeddings and all(np.all(params[k] != 0) for k in embeddings)
    assert np.mean(params["params/head/kernel"] == 0) == 0.5
