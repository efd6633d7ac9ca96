"""Checkpoint bookkeeping and integrity: the best checkpoint across restarts, checksums, corrupt
checkpoints skipped and moved aside, and a failing writer reported in one line."""

import glob
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from wikitopics_jax import checkpointing

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _state(step):
  rng = np.random.default_rng(step)
  return {"w": rng.standard_normal((64, 32)).astype(np.float32),
          "b": np.full((32,), step, np.float32), "count": np.array(step, np.int32)}


def _save(ckpt, step, val_loss=None):
  metrics = None if val_loss is None else {"val_loss": val_loss, "val_macro_ap": 0.5}
  ckpt.save(step, _state(step), meta={"step": step}, metrics=metrics, force=True)
  ckpt.wait()


def _marker(directory):
  with open(os.path.join(directory, checkpointing.BEST_MARKER)) as f:
    return json.load(f)


def test_best_checkpoint_survives_a_restart(tmp_path):
  """The issue's repro: before metrics were stored, the restart forgot step 1, Orbax deleted it, and
  step 5 (val_loss 0.9) became the best."""
  d = str(tmp_path / "ckpt")
  ckpt = checkpointing.Checkpointer(d, keep_latest=1)
  _save(ckpt, 1, 0.1)
  _save(ckpt, 2, 0.5)
  ckpt.close()
  ckpt = checkpointing.Checkpointer(d, keep_latest=1)
  assert ckpt.best_step() == 1
  _save(ckpt, 4)  # a preemption save: no metrics
  assert ckpt.all_steps() == [1, 4]
  _save(ckpt, 5, 0.9)
  assert ckpt.all_steps() == [1, 5]
  assert ckpt.best_step() == 1 and _marker(d)["step"] == 1
  ckpt.close()
  reader = checkpointing.Checkpointer(d, read_only=True)
  assert reader.resolve_step("best") == 1
  np.testing.assert_array_equal(reader.restore_arrays(1)["w"], _state(1)["w"])


def test_a_stale_or_torn_marker_is_rederived_from_the_stored_metrics(tmp_path):
  """A kill between a checkpoint's commit and the marker's rewrite leaves the marker behind."""
  d = str(tmp_path / "ckpt")
  ckpt = checkpointing.Checkpointer(d, keep_latest=3)
  for step, loss in ((1, 0.4), (2, 0.2), (3, 0.3)):
    _save(ckpt, step, loss)
  ckpt.close()
  with open(os.path.join(d, checkpointing.BEST_MARKER), "w") as f:
    json.dump({"step": 1, "metric": "val_loss", "value": 0.4}, f)
  assert checkpointing.Checkpointer(d, read_only=True).best_step() == 2  # readers too
  checkpointing.Checkpointer(d, keep_latest=3).close()
  assert _marker(d) == {"step": 2, "metric": "val_loss", "value": 0.2}
  with open(os.path.join(d, checkpointing.BEST_MARKER), "w") as f:
    f.write('{"step": 1, "met')
  checkpointing.Checkpointer(d, keep_latest=3).close()
  assert _marker(d)["step"] == 2


def test_ties_and_non_finite_values_follow_the_uninterrupted_rule(tmp_path):
  d = str(tmp_path / "ckpt")
  ckpt = checkpointing.Checkpointer(d, keep_latest=1)
  _save(ckpt, 1, float("nan"))
  _save(ckpt, 2, 0.3)
  _save(ckpt, 3, 0.3)  # equal: the earlier one stays the best
  _save(ckpt, 4, float("inf"))
  assert ckpt.best_step() == 2 and ckpt.all_steps() == [2, 4]
  ckpt.close()
  assert checkpointing.Checkpointer(d, keep_latest=1).best_step() == 2


def _array_files(d, step):
  files = [p for p in glob.glob(os.path.join(d, str(step), "state", "**", "*"), recursive=True)
           if os.path.isfile(p) and "/d/" in p]
  assert files, os.listdir(os.path.join(d, str(step), "state"))
  return files


def _truncate(path):
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


def _overwrite(path):
  size = os.path.getsize(path)
  with open(path, "r+b") as f:
    for offset in np.linspace(size // 4, size - 8, 16).astype(int):
      f.seek(int(offset))
      f.write(b"\x7f\xff\xff\xff")


@pytest.mark.parametrize("damage", ["truncate", "overwrite", "remove"])
def test_a_corrupt_checkpoint_is_refused_in_one_line_and_skipped(tmp_path, damage):
  d = str(tmp_path / "ckpt")
  ckpt = checkpointing.Checkpointer(d, keep_latest=3)
  for step in (1, 2):
    _save(ckpt, step, 0.5 - step / 10)
  ckpt.close()
  for path in _array_files(d, 2):
    {"truncate": _truncate, "overwrite": _overwrite, "remove": os.remove}[damage](path)

  reader = checkpointing.Checkpointer(d, read_only=True)
  with pytest.raises(checkpointing.CorruptCheckpointError, match=r"checkpoint step 2 in .*ckpt") as e:
    reader.restore_arrays(2)
  assert "\n" not in str(e.value)
  lines = []
  step, arrays = reader.restore_newest(reader.restore_arrays, log=lines.append)
  assert step == 1 and lines[-1].startswith("using checkpoint step 1")
  np.testing.assert_array_equal(arrays["w"], _state(1)["w"])
  assert reader.all_steps() == [1, 2]  # a reader moves nothing

  writer = checkpointing.Checkpointer(d, keep_latest=3)
  step, _ = writer.restore_newest(writer.restore_arrays, log=lines.append)
  assert step == 1 and writer.all_steps() == [1] and writer.best_step() == 1
  moved = glob.glob(str(tmp_path / "ckpt.corrupt" / "2-*"))
  assert len(moved) == 1  # kept for inspection, out of Orbax's way
  _save(writer, 2, 0.1)  # the replayed step is written afresh
  assert writer.best_step() == 2
  np.testing.assert_array_equal(writer.restore_arrays(2)["w"], _state(2)["w"])


def test_when_no_checkpoint_restores_nothing_is_moved(tmp_path):
  d = str(tmp_path / "ckpt")
  ckpt = checkpointing.Checkpointer(d)
  _save(ckpt, 1, 0.5)
  ckpt.close()
  for path in _array_files(d, 1):
    os.remove(path)
  writer = checkpointing.Checkpointer(d)
  with pytest.raises(checkpointing.CorruptCheckpointError, match="no checkpoint restores"):
    writer.restore_newest(writer.restore_arrays, log=lambda _: None)
  assert writer.all_steps() == [1]


def test_a_failing_writer_is_one_line_and_the_previous_checkpoint_survives(tmp_path):
  """A full disk, simulated by a file-size limit: the checkpoint's array file cannot be written."""
  d = str(tmp_path / "ckpt")
  script = textwrap.dedent(f"""
      import resource, signal, sys
      import numpy as np
      sys.path.insert(0, {REPO!r})
      from wikitopics_jax import checkpointing
      ckpt = checkpointing.Checkpointer({d!r})
      ckpt.save(1, {{"w": np.ones((8,), np.float32)}}, meta={{}}, metrics={{"val_loss": 0.1}})
      ckpt.wait()
      signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG
      resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))
      try:
        ckpt.save(2, {{"w": np.random.default_rng(0).standard_normal(1 << 20).astype(np.float32)}}, meta={{}}, metrics={{"val_loss": 0.05}})
        ckpt.wait()
      except checkpointing.CheckpointWriteError as e:
        print("ERROR", e)
        sys.exit(2)
      print("no error")
  """)
  proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 2, proc.stdout + proc.stderr[-3000:]
  error = [line for line in proc.stdout.splitlines() if line.startswith("ERROR")]
  assert len(error) == 1 and "could not write checkpoint" in error[0] and d in error[0], proc.stdout
  assert "File too large" in error[0], error[0]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]  # Orbax's own logs of it are dropped
  assert not glob.glob(os.path.join(d, "*tmp*"))  # nothing half-written left behind
  reader = checkpointing.Checkpointer(d, read_only=True)
  assert reader.all_steps() == [1] and reader.best_step() == 1
  np.testing.assert_array_equal(reader.restore_arrays(1)["w"], np.ones((8,), np.float32))
