"""The transformations under jax.sharding: 8 simulated CPU devices, 2 hosts.

A JAX process fixes its device count when its backend starts, so the sharded
runs happen in subprocesses:

* ``tests/sharding_worker.py`` (one process, 8 CPU devices, a 2 x 4
  ("data", "model") mesh) trains ``examples/sharded_train.py``'s MLP with
  FlipOut and DST-EE for 30 steps (pruning / drop-and-grow events every 5)
  on one device and sharded, and reports masks, params, state shardings, the
  collectives of the compiled step, random-bit invariance and an
  elementwise-gradient run; it runs once per session (shared by the tests
  below through a file lock, also under pytest-xdist);
* meanwhile, ``python -m examples.sharded_train`` runs as two processes
  ("hosts") with 4 CPU devices each, joined by ``jax.distributed.initialize``
  over gloo on 127.0.0.1, and its FlipOut run is compared with the worker's
  single-device one.

All subprocesses compile with ``--xla_backend_optimization_level=0`` (LLVM
codegen only; sharding and the compared runs use the same flags) to keep the
test under a minute of CPU.

Why "same params" is a tolerance for the MLP and bitwise elsewhere: the
sharded step sums some floats across devices (the data-parallel gradient
over the batch, the model-parallel activation gradients and softmax
normaliser, FlipOut's per-tensor noise std ‖g‖) in a different order than
one device does, so params differ in the last bits (a few ulp). The
transformations themselves add no such sum except the noise std: with
elementwise gradients, DST-EE and noise-free FlipOut are bitwise identical,
sharded or not, and the random draws are bitwise identical on any sharding.
Masks and integer state (flip counts, coverage counts) are compared exactly.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))

from examples import sharded_train as st  # pylint: disable=g-import-not-at-top,wrong-import-position

TIMEOUT = 900  # seconds, all subprocesses; they need ~40 s of CPU in total
# Sharded vs one device, MLP: a few ulp of float32 weights of size ~0.1-1.
RTOL, ATOL = 1e-5, 1e-6
KERNELS = {f"dense{i}": (a, b)
           for i, (a, b) in enumerate(zip(st.SIZES[:-1], st.SIZES[1:]))}
COMPILE_FAST = "--xla_backend_optimization_level=0"


def _env(devices: int) -> dict[str, str]:
  env = dict(os.environ)
  env["XLA_FLAGS"] = " ".join([
      env.get("XLA_FLAGS", ""), COMPILE_FAST,
      f"--xla_force_host_platform_device_count={devices}"]).strip()
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = os.pathsep.join(
      [str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
  return env


def _load(path):
  with np.load(path) as data:
    report = json.loads(str(data["report"]))
    arrays = {k: data[k] for k in data.files if k != "report"}
  return report, arrays


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@contextlib.contextmanager
def _file_lock(path):
  with open(path, "w") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _launch(out_dir: pathlib.Path) -> None:
  """Starts the 8-device worker and the two hosts at once; waits for all."""
  port = _free_port()
  commands = {
      "worker": ([sys.executable, str(REPO / "tests" / "sharding_worker.py"),
                  str(out_dir / "worker.npz")], _env(8)),
  }
  for i in range(2):
    cmd = [sys.executable, "-m", "examples.sharded_train",
           "--method", "flipout", "--coordinator", f"127.0.0.1:{port}",
           "--num_processes", "2", "--process_id", str(i)]
    if i == 0:
      cmd += ["--out", str(out_dir / "multihost.npz")]
    commands[f"host{i}"] = (cmd, _env(4))
  procs, logs = {}, {}
  try:
    for name, (cmd, env) in commands.items():
      logs[name] = open(out_dir / f"{name}.log", "w")
      procs[name] = subprocess.Popen(cmd, cwd=REPO, env=env,
                                     stdout=logs[name],
                                     stderr=subprocess.STDOUT)
    deadline = time.monotonic() + TIMEOUT  # for all of them together
    for proc in procs.values():
      proc.wait(timeout=max(1.0, deadline - time.monotonic()))
  finally:
    for proc in procs.values():  # only our own children, on timeout/error
      if proc.poll() is None:
        proc.kill()
        proc.wait()
    for f in logs.values():
      f.close()
  for name, proc in procs.items():
    (out_dir / f"{name}.rc").write_text(str(proc.returncode))


def _result(out_dir, name, npz):
  rc = int((out_dir / f"{name}.rc").read_text())
  log = (out_dir / f"{name}.log").read_text()
  assert rc == 0, f"{name} failed ({rc}):\n{log[-8000:]}"
  return _load(out_dir / npz) if npz else None


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """The subprocess runs, once per session (xdist workers share them)."""
  if os.environ.get("PYTEST_XDIST_WORKER"):  # one directory per session
    out_dir = tmp_path_factory.getbasetemp().parent / "sharding"
  else:
    out_dir = tmp_path_factory.getbasetemp() / "sharding"
  out_dir.mkdir(exist_ok=True)
  with _file_lock(out_dir / "lock"):
    if not (out_dir / "worker.rc").exists():
      _launch(out_dir)
  return out_dir


@pytest.fixture(scope="module")
def worker(runs):
  return _result(runs, "worker", "worker.npz")


def _run(arrays, prefix):
  return {k[len(prefix) + 1:]: v for k, v in arrays.items()
          if k.startswith(prefix + "/")}


def _assert_same_run(single, sharded, *, exact: bool):
  assert single.keys() == sharded.keys()
  assert single
  for key in sorted(single):
    a, b = single[key], sharded[key]
    assert a.dtype == b.dtype and a.shape == b.shape, key
    if exact or a.dtype.kind in "biu":  # masks, counts, steps: always exact
      np.testing.assert_array_equal(b, a, err_msg=key)
    else:
      np.testing.assert_allclose(b, a, rtol=RTOL, atol=ATOL, err_msg=key)


def _assert_sharded_like_params(shardings, kernel_spec="(None, 'model')"):
  """Per-weight leaves carry their param's spec; the rest is replicated."""
  checked = 0
  for path, spec in shardings.items():
    if path.endswith("['kernel']"):
      assert spec == kernel_spec, (path, spec)
      checked += 1
    elif path.endswith("['bias']"):
      assert spec == "('model',)", (path, spec)
    else:  # step counts, PRNG keys
      assert set(spec.strip("(),").replace(" ", "").split(",")) <= {"None", ""}, (
          path, spec)
  return checked


# ---------------------------------------------------------------------------
# One process, 8 devices.


def test_worker_saw_8_devices_and_partitionable_threefry(worker):
  report, _ = worker
  assert report["device_count"] == 8
  assert report["threefry_partitionable"] is True


@pytest.mark.parametrize("method", st.METHODS)
def test_sharded_run_matches_single_device(worker, method):
  report, arrays = worker
  single = _run(arrays, f"mlp/{method}/single")
  sharded = _run(arrays, f"mlp/{method}/sharded")
  masks = {k: v for k, v in single.items() if k.startswith("masks")}
  assert len(masks) == len(KERNELS)
  # The events happened: FlipOut reached 90% sparsity by pruning, DST-EE
  # holds its 80% (its drop-and-grow events conserve the count).
  alive = sum(int(m.sum()) for m in masks.values())
  total = sum(a * b for a, b in KERNELS.values())
  sparsity = {"flipout": 0.9, "dst_ee": 0.8}[method]
  assert alive == total - round(sparsity * total)
  _assert_same_run(single, sharded, exact=False)
  assert report[f"mlp/{method}"]["loss_last"] < report[f"mlp/{method}"][
      "loss_first"]


@pytest.mark.parametrize("method", st.METHODS)
def test_state_is_sharded_like_params(worker, method):
  report, _ = worker
  per_weight = {"flipout": 4, "dst_ee": 5}[method]  # params, masks, counts,
  expected = per_weight * len(KERNELS)              # momentum / Adam mu, nu
  # Straight out of jax.jit(tx.init) on sharded params ...
  assert _assert_sharded_like_params(
      report[f"mlp/{method}"]["init_shardings"]) == expected
  # ... and after 30 jitted steps (GSPMD propagation, no out_shardings).
  assert _assert_sharded_like_params(
      report[f"mlp/{method}"]["shardings"]) == expected


def test_explicit_axes_mesh_init_is_sharded_like_params(worker):
  shardings = worker[0]["explicit"]["jit_init/dst_ee"]
  assert _assert_sharded_like_params(shardings) == 5 * len(KERNELS)


def _full_size_gathers(collectives, dtypes):
  full = {a * b for a, b in KERNELS.values()}
  return [c for c in collectives if c["op"] in ("all-gather", "all-to-all")
          for t, s in zip(c["types"], c["shapes"])
          if t in dtypes and int(np.prod(s)) in full]


@pytest.mark.parametrize("method", st.METHODS)
def test_step_gathers_no_full_size_weights_scores_or_keys(worker, method):
  collectives = worker[0][f"mlp/{method}"]["collectives"]
  # Weights, gradients, scores (f32), selection keys (u32) and ranks (s32)
  # stay sharded: no device receives a whole prunable tensor of them.
  assert not _full_size_gathers(collectives, {"f32", "u32", "s32"}), [
      (c["types"], c["shapes"], c["op_name"])
      for c in _full_size_gathers(collectives, {"f32", "u32", "s32"})]
  # What crosses devices on an event are counts: integer all-reduces.
  assert any(c["op"] == "all-reduce" and set(c["types"]) == {"s32"}
             and "cond" in c["op_name"] for c in collectives)


@pytest.mark.parametrize("method", st.METHODS)
def test_step_gathers_no_full_size_tensor_at_all(worker, method):
  collectives = worker[0][f"mlp/{method}"]["collectives"]
  assert not _full_size_gathers(collectives, {"pred"})


@pytest.mark.parametrize("name", ["dst_ee", "flipout_no_noise"])
def test_elementwise_gradients_give_bitwise_identical_runs(worker, name):
  _, arrays = worker
  _assert_same_run(_run(arrays, f"synthetic/{name}/single"),
                   _run(arrays, f"synthetic/{name}/sharded"), exact=True)


@pytest.mark.parametrize("name", ["dst_ee", "flipout_no_noise"])
def test_packed_masks_stay_sharded_and_give_the_same_run(worker, name):
  report, arrays = worker
  info = report["packed"][name]
  # Kernels (in, out) split on out over "model": the bits pack along in
  # (unsharded), so they keep the kernel's spec; one byte per 8 rows.
  assert set(info["bits"]) == {f"{k}/kernel/bits" for k in KERNELS}
  for layer, (fan_in, fan_out) in KERNELS.items():
    entry = info["bits"][f"{layer}/kernel/bits"]
    assert entry == {"spec": "(None, 'model')", "dtype": "uint8",
                     "shape": [-(-fan_in // 8), fan_out]}, (layer, entry)
  assert not _full_size_gathers(info["collectives"], {"u8", "pred"})
  # Same masks, params and state as the bool-mask sharded run, bit for bit.
  _assert_same_run(_run(arrays, f"synthetic/{name}/sharded"),
                   _run(arrays, f"packed/{name}/sharded"), exact=True)


def test_random_draws_are_sharding_invariant_and_drawn_per_shard(worker):
  rng = worker[0]["rng"]
  assert len(rng) == 8
  for name, entry in rng.items():
    assert entry["bit_equal"], name
    if "max_u32_elements" in entry:
      # normal16 (threefry or hash words): each device draws (half) its
      # shard's words, not the tensor's.
      assert entry["max_u32_elements"] <= entry["shard_elements"], (name, entry)


@pytest.mark.parametrize("method", st.METHODS)
def test_fsdp_streamed_selection_matches_single_device(worker, method):
  report, arrays = worker
  info = report[f"fsdp/{method}"]
  # Blocks of 128 entries: every kernel (192..768 entries) is streamed.
  assert info["blocking"] == [16 * 8, True]
  assert _assert_sharded_like_params(
      info["shardings"], "('data', 'model')") == {"flipout": 4,
                                                   "dst_ee": 5}[method] * len(KERNELS)
  _assert_same_run(_run(arrays, f"mlp/{method}/single"),
                   _run(arrays, f"fsdp/{method}/sharded"), exact=False)
  # FSDP gathers weights for the matmuls (that is the model's business);
  # the selection itself moves only counts: no gather, all-to-all or
  # permute inside it.
  moved = [c for c in info["collectives"]
           if c["op"] in ("all-gather", "all-to-all", "collective-permute")
           and ("_top_k_masks" in c["op_name"]
                or "_kth_largest_keys" in c["op_name"])]
  assert not moved, [(c["op"], c["shapes"], c["op_name"]) for c in moved]
  assert any(c["op"] == "all-reduce" and "_top_k_masks" in c["op_name"]
             for c in info["collectives"])


def test_fsdp_explicit_axes_streamed_update_is_bitwise_identical(worker):
  report, arrays = worker
  assert _assert_sharded_like_params(
      report["fsdp_explicit/dst_ee"]["shardings"],
      "('data', 'model')") == 5 * len(KERNELS)
  _assert_same_run(_run(arrays, "synthetic/dst_ee/single"),
                   _run(arrays, "fsdp_explicit/dst_ee/sharded"), exact=True)


EVERY_METHOD = ("global_magnitude", "random_pruning", "snip", "gradient_flow",
                "st3", "st3_sigma", "rigl", "set", "nm_magnitude",
                "nm_flipout", "nm_st3", "nm_dst", "unipts")


# ST-3's rescale is a mean over each output channel's inputs, i.e. a float sum
# across the FSDP shards of `in`: a few ulp apart, masks still identical.
CHANNEL_SUMS = ("st3", "st3_sigma", "nm_st3")


@pytest.mark.parametrize("name", EVERY_METHOD)
def test_every_method_sharded_fsdp_matches_the_single_device_run(worker, name):
  info = worker[0]["every_method"][name]
  assert info["masks_equal"], name
  if name in CHANNEL_SUMS:
    assert info["max_abs_diff"] < 1e-5, info["max_abs_diff"]
  else:
    assert info["bit_equal"], (name, info["max_abs_diff"])
  assert info["sparsity"] > 0.4, info["sparsity"]  # events happened
  # Every per-weight leaf (masks, raw weights, counts, moments, N:M group
  # thresholds) carries its kernel's sharding; per-channel vectors (ST-3's
  # scales) the `out` axis's, scalars none.
  specs = {path: spec for path, spec in info["shardings"].items()
           if path.endswith("['kernel']")}
  per_weight = [spec for spec in specs.values() if spec.count(",") == 1
                and spec != "('model',)"]
  assert len(per_weight) >= 3 * len(KERNELS)
  assert all(spec == "('data', 'model')" for spec in per_weight), specs
  assert all(spec in ("('data', 'model')", "('model',)", "()")
             for spec in specs.values()), specs


def test_explicit_axes_mesh_update_is_bitwise_identical(worker):
  report, arrays = worker
  assert report["explicit"]["update_error"] is None, report["explicit"]
  _assert_same_run(_run(arrays, "synthetic/dst_ee/single"),
                   _run(arrays, "explicit/dst_ee/sharded"), exact=True)


# ---------------------------------------------------------------------------
# Two processes, 4 devices each.


def test_multihost_flipout_matches_single_process(worker, runs):
  log = (runs / "host0.log").read_text() + (runs / "host1.log").read_text()
  # `import flipout_jax` must not start the XLA backend (no jnp constants at
  # import), or jax.distributed.initialize() after it raises.
  assert "initialize() must be called before any JAX calls" not in log
  report, arrays = _result(runs, "host0", "multihost.npz")
  assert _result(runs, "host1", None) is None
  assert report["process_count"] == 2
  assert report["device_count"] == 8 and report["local_device_count"] == 4
  # "data" spans the hosts, "model" stays within one (as on a pod).
  assert report["mesh_processes"] == [[0] * 4, [1] * 4]
  info = report["methods"]["flipout"]
  assert _assert_sharded_like_params(info["shardings"]) == 4 * len(KERNELS)
  sharded = _run(arrays, "flipout")
  single = {k: v for k, v in _run(worker[1], "mlp/flipout/single").items()
            if k.split("[")[0] in ("masks", "params", "method_state")}
  _assert_same_run(single, sharded, exact=False)
