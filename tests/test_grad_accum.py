"""Gradient accumulation (config.grad_accum_steps), the device prefetcher, and no device-to-host copies
in the steady state of the training loop."""


import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from tests import datasets
from tests import toy_config
from wikitopics_jax import checkpointing
from wikitopics_jax import losses
from wikitopics_jax.data import pipeline
from wikitopics_jax import sharding
from wikitopics_jax import steps
from wikitopics_jax import task as task_lib
from wikitopics_jax import trainer
from wikitopics_jax.errors import InputError


NUM_LABELS = 5


class Toy(nnx.Module):
  """Pixels -> (optional BatchNorm) -> 2-layer MLP: small enough to compile in seconds."""

  def __init__(self, *, batch_norm: bool, rngs: nnx.Rngs):
    self.input_normalization = None
    self.norm = nnx.BatchNorm(3, momentum=0.5, rngs=rngs) if batch_norm else None
    self.hidden = nnx.Linear(3 * 4 * 4, 16, rngs=rngs)
    self.out = nnx.Linear(16, NUM_LABELS, rngs=rngs)

  def __call__(self, x):
    if self.norm is not None:
      x = self.norm(x)
    return self.out(jax.nn.relu(self.hidden(x.reshape(x.shape[0], -1))))


def _toy_task(batch_norm: bool) -> task_lib.Task:
  model = Toy(batch_norm=batch_norm, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.sgd(0.5, momentum=0.9), wrt=nnx.Param)
  model.train()
  graphdef, state = nnx.split((model, optimizer))
  return task_lib.Task(train_graphdef=graphdef, eval_graphdef=graphdef, state=state,
                       objective=losses.from_config(losses.config("bce"), positives=None,
                                                    num_examples=None,
                                                    ancestor_matrix=np.eye(NUM_LABELS)),
                       schedule=optax.constant_schedule(0.5), num_labels=NUM_LABELS,
                       label_names=tuple("abcde"), num_params=0)


def _batches(num_steps: int, batch_size: int):
  rng = np.random.default_rng(0)
  return [{"image": rng.integers(0, 256, (batch_size, 4, 4, 3), dtype=np.uint8),
           "labels": rng.integers(0, 2, (batch_size, NUM_LABELS), dtype=np.uint8)}
          for _ in range(num_steps)]


def _run(task, batches, mesh, grad_accum_steps):
  replicated = sharding.replicated(mesh)
  state_sharding = jax.tree.map(lambda _: replicated, task.state)
  step = steps.make_train_step(task, state_sharding=state_sharding,
                               batch_sharding=sharding.batch_sharded(mesh),
                               replicated_sharding=replicated, grad_accum_steps=grad_accum_steps)
  state = jax.device_put(task.state, replicated)
  losses_ = []
  for local in batches:
    state, metrics = step(state, sharding.global_batch(local, mesh))
    losses_.append(float(metrics["loss"]))
  return nnx.to_pure_dict(state), losses_


def test_accumulated_steps_equal_the_full_batch_without_batch_statistics():
  """5 SGD steps (sensitive to the gradient scale, unlike Adam) with k = 4 micro-batches of 8 on 8 devices (one row per device) reach the parameters
  of 5 steps on the batch of 32 without accumulation, to float32 rounding."""
  mesh = sharding.make_mesh()
  batches = _batches(5, 32)
  full, full_losses = _run(_toy_task(batch_norm=False), batches, mesh, 1)
  accumulated, accum_losses = _run(_toy_task(batch_norm=False), batches, mesh, 4)
  np.testing.assert_allclose(accum_losses, full_losses, rtol=1e-5)
  flat_full, flat_acc = checkpointing.to_checkpoint_tree(full), checkpointing.to_checkpoint_tree(accumulated)
  assert flat_full.keys() == flat_acc.keys()
  moved = 0
  for key in flat_full:
    np.testing.assert_allclose(np.asarray(flat_acc[key]), np.asarray(flat_full[key]),
                               rtol=1e-5, atol=1e-6, err_msg=key)
    if "hidden" in key and key.endswith("kernel"):
      initial = checkpointing.to_checkpoint_tree(nnx.to_pure_dict(_toy_task(False).state))[key]
      moved += not np.allclose(np.asarray(flat_full[key]), np.asarray(initial))
  assert moved  # the steps changed the parameters: the comparison is not of two initial states


def test_batch_norm_normalises_each_micro_batch_and_updates_its_statistics_once_per_micro_batch():
  """What steps.make_train_step documents: micro-batch j holds rows j, j + k, ... of each device's
  shard; the running mean after one step is the momentum update applied to micro-batch 0, then 1."""
  mesh = sharding.make_mesh(1)
  (batch,) = _batches(1, 8)
  state, _ = _run(_toy_task(batch_norm=True), [batch], mesh, 2)
  pixels = ((batch["image"].astype(np.float32) / 255.0 - np.float32(pipeline.IMAGENET_MEAN))
            / np.float32(pipeline.IMAGENET_STD))
  momentum = 0.5
  expected = np.zeros(3, np.float32)
  for j in range(2):
    expected = momentum * expected + (1 - momentum) * pixels[j::2].mean(axis=(0, 1, 2))
  np.testing.assert_allclose(np.asarray(state[0]["norm"]["mean"]), expected, rtol=1e-5, atol=1e-6)
  # Not what one full-batch update would give: the two behaviours are distinguishable here.
  assert not np.allclose(expected, (1 - momentum) * pixels.mean(axis=(0, 1, 2)), atol=1e-3)


def test_grad_accum_steps_must_divide_the_per_device_batch():
  mesh = sharding.make_mesh()
  sharding.check_grad_accum(32, 4, mesh)
  with pytest.raises(InputError, match=r"^config.grad_accum_steps=3: config.batch_size=32 must be "
                                       r"divisible by grad_accum_steps x the 8 devices"):
    sharding.check_grad_accum(32, 3, mesh)
  with pytest.raises(InputError, match="config.grad_accum_steps=0"):
    sharding.check_grad_accum(32, 0, mesh)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("accum") / "data")
  datasets.make_dataset(d, sizes={"train": 128, "val": 32, "test": 32}, image_size=32)
  return d


def test_device_prefetch_saves_the_position_of_the_last_batch_handed_out(data_dir):
  mesh = sharding.make_mesh()

  def source():
    return iter(pipeline.train_dataset(data_dir, "train", batch_size=32, seed=0, hierarchical=True))

  expected = [next(it) for it in [source()] for _ in range(5)]
  prefetch = sharding.DevicePrefetch(source(), mesh, size=3)
  for i in range(2):
    np.testing.assert_array_equal(np.asarray(next(prefetch)["labels"]), expected[i]["labels"])
  state = prefetch.get_state()  # 2 handed out, 4 read from the source
  resumed = source()
  resumed.set_state(state)
  again = sharding.DevicePrefetch(resumed, mesh, size=2)
  for i in range(2, 5):
    np.testing.assert_array_equal(np.asarray(next(again)["image"]), expected[i]["image"])
  prefetch.set_state(state)  # drops the prefetched batches
  np.testing.assert_array_equal(np.asarray(next(prefetch)["image"]), expected[2]["image"])


def _tiny_config(data_dir, **overrides):
  c = toy_config.get_config(data_dir)
  c.thresholds.tune = False
  c.update_from_flattened_dict(overrides)
  return c


def test_training_with_accumulation_runs_and_a_bad_batch_split_is_one_line(tmp_path, data_dir):
  outcome = trainer.train(_tiny_config(data_dir, num_train_steps=2, grad_accum_steps=2),
                          str(tmp_path / "run"))
  assert outcome == {"preempted": False, "step": 2}
  with pytest.raises(InputError, match="config.grad_accum_steps=3"):
    trainer.train(_tiny_config(data_dir, grad_accum_steps=3), str(tmp_path / "bad"))


@pytest.fixture
def cpu_transfer_guard(monkeypatch):
  """On CPU an array's buffer is host memory and JAX does not enforce the device-to-host transfer
  guard (it does on GPU and TPU). Every fetch of an array's value goes through `ArrayImpl._value`
  (np.asarray, jax.device_get, float, bool): here it checks the guard as an accelerator would."""
  from jax._src import array as array_lib  # pylint: disable=g-import-not-at-top
  from jax._src import config as config_lib  # pylint: disable=g-import-not-at-top
  original = array_lib.ArrayImpl._value  # pylint: disable=protected-access

  def guarded(self):
    if config_lib.transfer_guard_device_to_host.value in ("disallow", "disallow_explicit"):
      raise RuntimeError("Disallowed device-to-host transfer (emulated on CPU)")
    return original.fget(self)

  monkeypatch.setattr(array_lib.ArrayImpl, "_value", property(guarded))


def test_no_device_to_host_copy_between_log_steps(tmp_path, data_dir, cpu_transfer_guard):
  """log_every_steps=4, 8 steps: the loop runs under a transfer guard outside log, evaluation and
  checkpoint work. A fetch added to the per-step path (here in the profiler hook) is an error."""
  del cpu_transfer_guard
  config = _tiny_config(data_dir, num_train_steps=8, log_every_steps=4)
  assert trainer.train(config, str(tmp_path / "quiet")) == {"preempted": False, "step": 8}

  original = trainer._Profiler.after_step  # pylint: disable=protected-access

  def fetch_at_step_2(self, step, outputs):
    if step == 2:
      jax.device_get(outputs)
    return original(self, step, outputs)

  trainer._Profiler.after_step = fetch_at_step_2  # pylint: disable=protected-access
  try:
    with pytest.raises(Exception, match="[Dd]isallowed device-to-host transfer"):
      trainer.train(config, str(tmp_path / "fetching"))
  finally:
    trainer._Profiler.after_step = original  # pylint: disable=protected-access
