"""SIGTERM to one process of a two-process job (jax.distributed on 127.0.0.1, gloo collectives)."""

import json
import os
import signal
import socket
import subprocess
import time

import pytest

from tests import datasets
from tests.test_resilience import CONFIG, _cli, _env, _losses
from wikitopics_jax import checkpointing

NUM_STEPS = 12


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("preemption") / "data")
  datasets.make_dataset(d, sizes={"train": 128, "val": 32, "test": 32}, image_size=32)
  return d


def _start(workdir, data_dir, cache_dir):
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  # One evaluation and checkpoint, at the end: the steps themselves are what this test is about.
  return [subprocess.Popen(
      _cli(["train", f"--config={CONFIG}:{data_dir}", f"--workdir={workdir}",
            f"--config.num_train_steps={NUM_STEPS}", f"--config.eval_every_steps={NUM_STEPS}",
            "--config.thresholds.tune=False", f"--coordinator_address=127.0.0.1:{port}",
            # A cache per process and per test: the later runs skip compilation, and the two
            # processes always compile (or load) alike. With one shared cache, one process could
            # load what the other was still compiling and wait for it past gloo's 30 s deadline.
            "--num_processes=2", f"--process_id={i}", f"--jax_cache_dir={cache_dir}/{i}"]),
      env=_env(2), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]


def _finish(procs):
  outputs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-3000:]
  return outputs


def test_sigterm_to_one_of_two_processes_stops_both_at_one_step_and_the_rerun_is_bitwise(
    tmp_path, data_dir):
  """Process 1 alone gets SIGTERM once training runs; the preemption sync point stops both processes
  after the same step (one checkpoint, both iterator positions equal), both exit 0, and rerunning
  the command ends bitwise where an uninterrupted two-process run ends, with the same losses."""
  workdir = str(tmp_path / "terminated")
  cache_dir = str(tmp_path / "xla-cache")
  procs = _start(workdir, data_dir, cache_dir)
  metrics = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + 300
  while time.time() < deadline and not (os.path.exists(metrics) and os.path.getsize(metrics)):
    time.sleep(0.05)
  procs[1].send_signal(signal.SIGTERM)
  outputs = _finish(procs)
  stopped = [line for line in outputs[0].splitlines() if line.startswith("preempted (SIGTERM)")]
  assert stopped, outputs[0][-3000:]
  step = int(stopped[0].split("at step ")[1].split(";")[0])
  assert 1 <= step < NUM_STEPS
  iterator_dir = os.path.join(workdir, "checkpoints", str(step), "data_iter")
  states = [json.load(open(os.path.join(iterator_dir, f"process_{i}-of-2.json"))) for i in range(2)]
  assert states[0] == states[1]  # each process's position counts the global batches consumed

  outputs = _finish(_start(workdir, data_dir, cache_dir))
  assert f"at step {step}" in outputs[0] and "resumed from" in outputs[0]
  reference = str(tmp_path / "reference")
  _finish(_start(reference, data_dir, cache_dir))
  # Arrays saved by 2 processes do not restore onto this process's 8 devices; every checkpoint
  # stores a checksum of each array's bytes.
  resumed, uninterrupted = (
      checkpointing.Checkpointer(os.path.join(d, "checkpoints"), read_only=True)
      .restore_meta(NUM_STEPS)[checkpointing.CHECKSUMS_KEY] for d in (workdir, reference))
  assert resumed and resumed == uninterrupted
  assert _losses(workdir) == _losses(reference)
