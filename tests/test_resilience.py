"""Training at scale, rehearsed on CPU: device-count invariance, multi-process, exact resume after
SIGKILL / SIGTERM / a torn checkpoint write, the non-finite guard, and profiling."""

import glob
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import tests
from tests import datasets
from tests import toy_config
from wikitopics_jax import checkpointing
from wikitopics_jax import trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The CLI runs take the same config: tests/toy_config.py (the toy model; efficientnet_tiny with
# WIKITOPICS_SLOW_TESTS=1).
CONFIG = os.path.join(REPO, "tests", "toy_config.py")


def tiny_config(data_dir, **overrides):
  c = toy_config.get_config(data_dir)
  c.thresholds.tune = False
  c.update_from_flattened_dict(overrides)
  return c


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("resilience") / "data")
  datasets.make_dataset(d, sizes={"train": 128, "val": 32, "test": 32}, image_size=32)
  return d


@pytest.fixture(scope="session")
def reference(tmp_path_factory, data_dir):
  """An uninterrupted run: 2 epochs of 4 steps, a checkpoint every step."""
  workdir = str(tmp_path_factory.mktemp("reference"))
  trainer.train(tiny_config(data_dir, **{"checkpoint.every_steps": 1, "checkpoint.keep_latest": 8}),
                workdir)
  return workdir


def _final_arrays(workdir, step=8):
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)
  return ckpt.restore_arrays(step)


def _assert_same_state(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def _cli(args, env=None):
  return [sys.executable, "-m", "wikitopics_jax.main", *args]


def _env(devices):
  env = dict(os.environ, XLA_FLAGS=tests.xla_flags(devices),
             JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  return env


def test_one_device_and_eight_devices_give_the_same_losses(tmp_path, data_dir, reference):
  assert jax.device_count() == 8
  one = str(tmp_path / "one")
  trainer.train(tiny_config(data_dir, num_train_steps=4, **{"mesh.num_devices": 1}), one)
  eight = _losses(reference)
  for step, loss in _losses(one).items():
    assert loss == pytest.approx(eight[step], rel=1e-4, abs=1e-5)


def test_two_processes_equal_one_process_with_four_devices(tmp_path, data_dir):
  """jax.distributed on 127.0.0.1 with gloo collectives. Equal losses at every step mean equal global
  batches, i.e. each process fed its own half (tests/test_pipeline.py checks the halves are disjoint);
  both processes must also agree on the best checkpoint and exit 0 (a race on best.json once broke
  the run)."""
  single = str(tmp_path / "single")
  trainer.train(tiny_config(data_dir, num_train_steps=4, **{"mesh.num_devices": 4}), single)
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  multi = str(tmp_path / "multi")
  procs = [subprocess.Popen(
      _cli(["train", f"--config={CONFIG}:{data_dir}", f"--workdir={multi}",
            "--config.num_train_steps=4", "--config.thresholds.tune=False",
            f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}",
            # Independent of what a persistent cache holds: each process compiles its own.
            "--jax_cache_dir="]),
      env=_env(2), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
  outputs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-3000:]
  assert "4 devices in 2 processes" in outputs[0]
  single_best = json.load(open(os.path.join(single, "checkpoints", "best.json")))
  assert json.load(open(os.path.join(multi, "checkpoints", "best.json")))["step"] == single_best["step"]
  assert os.path.exists(os.path.join(multi, "results.json"))
  reference_losses = _losses(single)
  for step, loss in _losses(multi).items():
    assert loss == pytest.approx(reference_losses[step], rel=1e-4, abs=1e-5)


def test_sigkill_at_a_random_step_then_restart_is_bitwise_identical(tmp_path, data_dir, reference):
  workdir = str(tmp_path / "killed")
  proc = subprocess.Popen(
      _cli(["train", f"--config={CONFIG}:{data_dir}", f"--workdir={workdir}",
            "--config.checkpoint.every_steps=1", "--config.thresholds.tune=False"]),
      env=_env(8), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  target = random.Random(os.getpid()).randint(1, 6)
  deadline = time.time() + 300
  ckpt_dir = os.path.join(workdir, "checkpoints")
  while time.time() < deadline and proc.poll() is None:
    steps = [int(d) for d in os.listdir(ckpt_dir) if d.isdigit()] if os.path.isdir(ckpt_dir) else []
    if steps and max(steps) >= target:
      break
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  trainer.train(tiny_config(data_dir, **{"checkpoint.every_steps": 1}), workdir)
  _assert_same_state(_final_arrays(workdir), _final_arrays(reference))
  assert _losses(workdir) == _losses(reference)


def test_sigterm_saves_at_the_stop_step_and_the_rerun_continues(tmp_path, data_dir, reference):
  workdir = str(tmp_path / "terminated")
  config = tiny_config(data_dir)  # checkpoints only at epoch ends (steps 4, 8)

  original = trainer._Profiler.before_step  # pylint: disable=protected-access

  def send_sigterm_at_step_3(self, step):
    if step == 3:
      os.kill(os.getpid(), signal.SIGTERM)
    return original(self, step)

  trainer._Profiler.before_step = send_sigterm_at_step_3  # pylint: disable=protected-access
  try:
    outcome = trainer.train(config, workdir)
  finally:
    trainer._Profiler.before_step = original  # pylint: disable=protected-access
  assert outcome == {"preempted": True, "step": 3}
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)
  assert ckpt.latest_step() == 3
  trainer.train(config, workdir)
  _assert_same_state(_final_arrays(workdir), _final_arrays(reference))


def test_sigterm_in_a_subprocess_exits_zero_with_a_checkpoint(tmp_path, data_dir):
  workdir = str(tmp_path / "sub")
  proc = subprocess.Popen(
      _cli(["train", f"--config={CONFIG}:{data_dir}", f"--workdir={workdir}",
            "--config.num_epochs=50", "--config.thresholds.tune=False"]),
      env=_env(1), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  metrics = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + 300
  while time.time() < deadline and not (os.path.exists(metrics) and os.path.getsize(metrics)):
    time.sleep(0.1)
  proc.send_signal(signal.SIGTERM)
  out = proc.communicate(timeout=300)[0]
  assert proc.returncode == 0, out[-3000:]
  assert "preempted (SIGTERM): checkpoint saved at step" in out
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)
  assert ckpt.latest_step() is not None and ckpt.latest_step() < 50 * 4


def test_a_torn_checkpoint_write_is_ignored_on_restart(tmp_path, data_dir, reference):
  workdir = str(tmp_path / "torn")
  shutil.copytree(reference, workdir)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  for step in (6, 7, 8):
    shutil.rmtree(os.path.join(ckpt_dir, str(step)))
  # What a kill during Orbax's write of step 6 leaves behind: a temporary directory, half written.
  torn = os.path.join(ckpt_dir, "6.orbax-checkpoint-tmp-1234")
  shutil.copytree(os.path.join(ckpt_dir, "5"), torn)
  for path in glob.glob(os.path.join(torn, "state", "*"))[:2]:
    if os.path.isfile(path):
      os.remove(path)
  assert checkpointing.Checkpointer(ckpt_dir, read_only=True).latest_step() == 5
  trainer.train(tiny_config(data_dir, **{"checkpoint.every_steps": 1}), workdir)
  _assert_same_state(_final_arrays(workdir), _final_arrays(reference))


def test_non_finite_update_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path, data_dir):
  workdir = str(tmp_path / "nan")
  good = tiny_config(data_dir, num_train_steps=2, **{"checkpoint.every_steps": 1})
  trainer.train(good, workdir)
  before = _final_arrays(workdir, step=2)
  # Resume with a learning rate that overflows float32: step 3's update is not finite.
  poisoned = tiny_config(data_dir, num_train_steps=4, **{"checkpoint.every_steps": 1,
                                                          "optimizer.learning_rate": 1e39})
  with pytest.raises(trainer.NonFiniteError,
                     match=r"step 3: non-finite parameter norm after the update .* last good "
                           r"checkpoint: step 2"):
    trainer.train(poisoned, workdir)
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)
  assert ckpt.latest_step() == 2
  _assert_same_state(ckpt.restore_arrays(2), before)
  # With nan_policy="skip" the bad updates are dropped: parameters stay those of step 2.
  poisoned.nan_policy = "skip"
  trainer.train(poisoned, workdir)
  after = _final_arrays(workdir, step=4)
  params = [k for k in before if k.startswith("0/") and "rngs" not in k and "mean" not in k
            and not k.endswith("var")]
  assert params
  for k in params:
    np.testing.assert_array_equal(np.asarray(after[k]), np.asarray(before[k]), err_msg=k)


def test_profile_window_writes_a_trace(tmp_path, data_dir):
  workdir = str(tmp_path / "profiled")
  trainer.train(tiny_config(data_dir, num_train_steps=3,
                            **{"profile.start_step": 2, "profile.num_steps": 1}), workdir)
  traces = glob.glob(os.path.join(workdir, "profile", "plugins", "profile", "*", "*.xplane.pb"))
  assert traces, os.listdir(os.path.join(workdir, "profile"))


def _kill_when_checkpoint(workdir, data_dir, overrides, min_step):
  """Starts `train` in a subprocess and SIGKILLs it once a checkpoint >= min_step is on disk."""
  proc = subprocess.Popen(
      _cli(["train", f"--config={CONFIG}:{data_dir}", f"--workdir={workdir}",
            *[f"--config.{k}={v}" for k, v in overrides.items()]]),
      env=_env(8), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    steps = [int(d) for d in os.listdir(ckpt_dir) if d.isdigit()] if os.path.isdir(ckpt_dir) else []
    if steps and max(steps) >= min_step:
      break
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()


def _results(workdir):
  with open(os.path.join(workdir, "results.json")) as f:
    return json.load(f)


def test_best_checkpoint_and_results_survive_repeated_kills(tmp_path, data_dir):
  """Validation loss goes down, then up (a learning rate that diverges after step 8); only the latest
  checkpoint and the best are kept. Before checkpoints stored their metrics, a restart forgot the
  best, Orbax deleted it, and a later, worse checkpoint was marked best."""
  overrides = {"thresholds.tune": False, "num_epochs": 3, "eval_every_steps": 2,
               "optimizer.learning_rate": 0.03, "checkpoint.keep_latest": 1}
  reference = str(tmp_path / "reference")
  trainer.train_and_evaluate(tiny_config(data_dir, **overrides), reference)
  best = json.load(open(os.path.join(reference, "checkpoints", "best.json")))
  assert 2 < best["step"] < 10, best  # the precondition: the best is neither first nor last

  killed = str(tmp_path / "killed")
  for min_step in (best["step"] - 2, best["step"] + 2):
    _kill_when_checkpoint(killed, data_dir, overrides, min_step)
  trainer.train_and_evaluate(tiny_config(data_dir, **overrides), killed)
  assert json.load(open(os.path.join(killed, "checkpoints", "best.json"))) == best
  ckpt = checkpointing.Checkpointer(os.path.join(killed, "checkpoints"), read_only=True)
  assert best["step"] in ckpt.all_steps()
  _assert_same_state(ckpt.restore_arrays(best["step"]),
                     _final_arrays(reference, step=best["step"]))
  assert _results(killed) == _results(reference)


def _damage_arrays(workdir, step):
  state = os.path.join(workdir, "checkpoints", str(step), "state")
  files = [p for p in glob.glob(os.path.join(state, "**", "d", "*"), recursive=True)]
  assert files
  for path in files:
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 2)


def test_a_corrupt_latest_checkpoint_is_skipped_and_training_resumes_from_the_previous(
    tmp_path, data_dir, reference):
  workdir = str(tmp_path / "corrupt")
  shutil.copytree(reference, workdir)
  _damage_arrays(workdir, 8)
  _damage_arrays(workdir, 7)
  proc = subprocess.run(
      _cli(["train", f"--config={CONFIG}:{data_dir}", f"--workdir={workdir}",
            "--config.checkpoint.every_steps=1", "--config.checkpoint.keep_latest=8",
            "--config.thresholds.tune=False"]),
      env=_env(8), capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  skipped = [line for line in proc.stdout.splitlines() if line.startswith("skipping checkpoint")]
  assert [line.split()[3].rstrip(":") for line in skipped] == ["8", "7"], proc.stdout
  assert "resumed from" in proc.stdout and "at step 6" in proc.stdout
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert len(glob.glob(os.path.join(workdir, "checkpoints.corrupt", "*"))) == 2
  _assert_same_state(_final_arrays(workdir), _final_arrays(reference))


def test_evaluate_latest_skips_a_corrupt_checkpoint_and_names_the_step_it_used(
    tmp_path, data_dir, reference, capsys):
  from wikitopics_jax.eval import evaluate_job  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / "evaluate_corrupt")
  shutil.copytree(reference, workdir)
  _damage_arrays(workdir, 8)
  capsys.readouterr()
  result = evaluate_job.evaluate(workdir, checkpoint="latest", split="test", thresholds="0.5")
  out = capsys.readouterr().out
  assert result["checkpoint_step"] == 7
  assert "skipping checkpoint step 8: checkpoint step 8 in" in out and "is unreadable" in out
  assert "checkpoint 'latest': step 7" in out
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "8"))  # a reader moves nothing
  with pytest.raises(checkpointing.CorruptCheckpointError, match=r"^checkpoint step 8 in \S+ is unreadable"):
    evaluate_job.evaluate(workdir, checkpoint="8", split="test", thresholds="0.5")
