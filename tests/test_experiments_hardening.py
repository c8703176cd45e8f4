"""Hardening of the experiments CLI (issue 13, points 1, 7, 8, 9).

Non-finite losses, workdir faults (unwritable, full disk, corrupt
checkpoint), two writers on one workdir, sweep children outliving their
parent, and re-running a finished run. Runs use the tiny LeNet-300-100 of
``test_experiments`` (digits, width 0.25, 2 epochs of 22 steps), in-process
so that they share its compiled steps; real processes only where the point
is a second process.
"""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import subprocess
import sys
import time

import orbax.checkpoint as ocp
import pytest

from experiments import train
from test_experiments import MAIN_CONFIG, REPO, TINY
from test_experiments import assert_bit_identical, cli, final_params, load_config


def _one_line_error(err) -> str:
  msg = str(err.value.code)
  assert msg.startswith("error: ") and "\n" not in msg, msg
  return msg


def _no_setup(monkeypatch):
  """Makes the expensive setup (data, model init, compiles) fail if reached."""
  def setup(config):
    raise AssertionError("_setup ran")
  monkeypatch.setattr(train, "_setup", setup)


def _tiny_config():
  return load_config(MAIN_CONFIG, *[a for a in TINY if a.startswith("--config")])


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  """A finished tiny run: (workdir, result)."""
  workdir = tmp_path_factory.mktemp("finished")
  return workdir, cli(workdir)


# --- 1. A non-finite loss stops the run ---------------------------------------


def test_non_finite_loss_stops_with_one_line_error_naming_the_step(tmp_path):
  with pytest.raises(SystemExit) as err:
    cli(tmp_path, "--config.lr=1000")
  msg = _one_line_error(err)
  assert msg.startswith("error: non-finite training loss (nan) at step ")
  step = int(msg.split(" at step ")[1].split()[0])
  assert 1 <= step <= 2 * 22
  assert "(epoch 1/2)" in msg or "(epoch 2/2)" in msg
  assert not os.path.exists(tmp_path / "final.json")
  # Nothing of the bad epoch was saved.
  epochs = [r["epoch"] for r in train.read_metrics(str(tmp_path))]
  assert epochs == list(range(1, (step - 1) // 22 + 1))


def test_first_non_finite():
  import numpy as np  # pylint: disable=g-import-not-at-top
  assert train.first_non_finite(np.array([1.0, 2.0], np.float32)) is None
  assert train.first_non_finite(np.array([1.0, np.inf, np.nan])) == 1


# --- 7. Workdir faults ----------------------------------------------------------


def test_unwritable_workdir_fails_in_one_line_before_setup(tmp_path, monkeypatch):
  # Root may write anywhere: a workdir below a regular file cannot be made.
  (tmp_path / "file").write_text("")
  _no_setup(monkeypatch)
  with pytest.raises(SystemExit) as err:
    cli(tmp_path / "file" / "run")
  msg = _one_line_error(err)
  assert msg.startswith(f"error: workdir: cannot write to {tmp_path / 'file' / 'run'}")


def test_full_disk_ends_in_one_line_with_committed_checkpoints_intact(
    tmp_path, monkeypatch, finished):
  save = ocp.CheckpointManager.save

  def full_at_epoch_2(self, step, *args, **kwargs):
    if step == 2:
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC),
                    os.path.join(str(tmp_path), "checkpoints", "2"))
    return save(self, step, *args, **kwargs)

  monkeypatch.setattr(ocp.CheckpointManager, "save", full_at_epoch_2)
  with pytest.raises(SystemExit) as err:
    cli(tmp_path)
  msg = _one_line_error(err)
  assert msg.startswith(f"error: no space left on {tmp_path};")
  monkeypatch.setattr(ocp.CheckpointManager, "save", save)
  # Epoch 1's checkpoint is intact: the resumed run ends where an
  # uninterrupted one does, bit for bit.
  result = cli(tmp_path, "--resume")
  assert_bit_identical(final_params(finished[0]), final_params(tmp_path))
  assert result["test_accuracy"] == finished[1]["test_accuracy"]


def test_no_space_is_found_through_wrapping_exceptions():
  try:
    try:
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    except OSError as e:
      raise ValueError("could not save") from e
  except ValueError as e:
    assert train.is_no_space(e)
  assert train.is_no_space(RuntimeError(f"write: {os.strerror(errno.ENOSPC)}"))
  assert not train.is_no_space(OSError(errno.EACCES, "denied"))


def test_corrupt_latest_checkpoint_falls_back_with_a_warning(
    tmp_path, capsys, finished):
  wd = str(tmp_path)
  assert train.run(_tiny_config(), wd, progress=False, stop_after_epochs=2) is None
  latest = os.path.join(wd, "checkpoints", "2")
  for root, _, files in os.walk(latest):
    for name in files:  # truncate every file of the latest checkpoint
      with open(os.path.join(root, name), "r+b") as f:
        f.truncate(os.path.getsize(os.path.join(root, name)) // 2)
  capsys.readouterr()
  result = cli(wd, "--resume")
  out, errout = capsys.readouterr()
  assert f"warning: checkpoint {latest} does not restore" in errout
  assert f"{wd}: resumed after epoch 1/2" in out
  assert os.path.isdir(os.path.join(wd, "checkpoints.bad", "2"))
  assert_bit_identical(final_params(finished[0]), final_params(wd))
  assert result["test_accuracy"] == finished[1]["test_accuracy"]


# --- 8. Two writers -------------------------------------------------------------


def test_second_process_on_a_locked_workdir_is_refused_naming_the_pid(tmp_path):
  lock = train.lock_workdir(str(tmp_path))
  try:
    t = time.time()
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.main", f"--config={MAIN_CONFIG}",
         *TINY, f"--workdir={tmp_path}", "--resume"], cwd=REPO,
        capture_output=True, text=True, timeout=120, check=False)
  finally:
    lock.close()
  assert proc.returncode == 1, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
  assert proc.stderr.strip().splitlines()[-1] == (
      f"error: workdir: {tmp_path} is in use by another run (pid "
      f"{os.getpid()}); wait for it to end, stop it, or use another --workdir")
  assert not os.path.exists(tmp_path / "config.json")
  print(f"refused after {time.time() - t:.1f}s")


def test_lock_names_the_holder_and_a_dead_holder_does_not_block(tmp_path):
  wd = str(tmp_path)
  lock = train.lock_workdir(wd)
  with open(tmp_path / train.LOCK_FILE) as f:
    assert f.read().strip() == str(os.getpid())
  # flock locks belong to the open file: a second open conflicts here too.
  with pytest.raises(train.ConfigError, match=f"in use by another run .pid {os.getpid()}"):
    train.lock_workdir(wd)
  lock.close()
  # The file a dead process left (its pid, no lock held) does not block.
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True, check=True).stdout.strip()
  (tmp_path / train.LOCK_FILE).write_text(dead + "\n")
  lock = train.lock_workdir(wd)
  with open(tmp_path / train.LOCK_FILE) as f:
    assert f.read().strip() == str(os.getpid())
  with pytest.raises(BlockingIOError):  # and it is really held
    with open(tmp_path / train.LOCK_FILE) as f:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
  lock.close()


def _alive(pid: int) -> bool:
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # zombies are dead
  except FileNotFoundError:
    return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl")
def test_sweep_children_die_with_their_parent():
  parent = subprocess.Popen(
      [sys.executable, "-c",
       "import sys, time\n"
       "from experiments import sweep\n"
       "child = sweep.spawn([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
       "print(child.pid, flush=True)\n"
       "time.sleep(120)\n"],
      cwd=REPO, stdout=subprocess.PIPE, text=True)
  child = int(parent.stdout.readline())
  try:
    assert _alive(child)
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.time() + 20
    while _alive(child) and time.time() < deadline:
      time.sleep(0.05)
    assert not _alive(child)
  finally:
    if _alive(child):
      os.kill(child, signal.SIGKILL)
    parent.stdout.close()


# --- 9. Running the same command again --------------------------------------------


def test_finished_run_is_reported_at_once_without_setup(finished, capsys,
                                                        monkeypatch):
  workdir, result = finished
  _no_setup(monkeypatch)
  for flags in ([], ["--resume"]):
    capsys.readouterr()
    t = time.time()
    assert cli(workdir, *flags) == result
    assert time.time() - t < 2
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1] == train.final_line(result)
    assert out[-2] == f"{workdir}: finished before (final.json); skipped."


def test_resume_with_overwrite_is_a_one_line_error(finished, monkeypatch):
  _no_setup(monkeypatch)
  with pytest.raises(SystemExit) as err:
    cli(finished[0], "--resume", "--overwrite")
  assert "--resume and --overwrite" in _one_line_error(err)
  assert os.path.exists(finished[0] / "final.json")  # nothing deleted


def test_unfinished_run_is_refused_without_resume(tmp_path, monkeypatch):
  (tmp_path / "metrics.jsonl").write_text("")
  _no_setup(monkeypatch)
  with pytest.raises(SystemExit) as err:
    cli(tmp_path)
  msg = _one_line_error(err)
  assert f"{tmp_path} holds an unfinished run; pass --resume" in msg


def test_resume_with_nothing_to_resume_says_it_starts_fresh(tmp_path, capsys,
                                                             finished):
  result = cli(tmp_path, "--resume")
  out = capsys.readouterr().out
  assert f"{tmp_path}: nothing to resume (no checkpoint); starting fresh." in out
  assert result["test_accuracy"] == finished[1]["test_accuracy"]
