"""Suite `losses`: forward + backward time of every registered loss, and of MCLoss on a big DAG.

Ours: `jax.jit(jax.value_and_grad(objective))` on float32 logits. Baselines: every loss written
literally in NumPy with a hand-written backward pass (`numpy_losses`). A run
repeats the call to last about 0.25 s and the figure is the time per call. Each row also records how
far the NumPy result is from ours (a check that both compute the same thing).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from wikitopics_jax import losses
from wikitopics_jax.data import synthetic
from wikitopics_jax import taxonomy as taxonomy_lib
from wikitopics_jax.bench import numpy_losses
from wikitopics_jax.bench import runner

SUITE = "losses"
# Gene Ontology's biological-process branch has ~30,000 terms; 4,000 is the size often trained on.
BIG_DAG_LABELS = 4000
MAX_CALLS_PER_RUN = 1000


def random_dag(num_labels: int, *, seed: int, num_roots: int = 3, second_parent_rate: float = 0.3
               ) -> np.ndarray:
  """R (descendant matrix, reflexive and transitive) of a random GO-like DAG.

  Labels after the first `num_roots` each get a parent drawn uniformly among the earlier labels
  (expected depth ~ ln L, like a random recursive tree), and a second distinct earlier parent with
  probability `second_parent_rate`.
  """
  rng = np.random.default_rng(seed)
  children: list[list[int]] = [[] for _ in range(num_labels)]
  for label in range(num_roots, num_labels):
    parents = {int(rng.integers(label))}
    if label > 1 and rng.random() < second_parent_rate:
      parents.add(int(rng.integers(label)))
    for parent in parents:
      children[parent].append(label)
  r = np.eye(num_labels, dtype=bool)
  for label in reversed(range(num_labels)):  # Children come after parents: close bottom-up.
    for child in children[label]:
      r[label] |= r[child]
  return r


def close_labels(flat: np.ndarray, r: np.ndarray) -> np.ndarray:
  """y_i = 1 iff some descendant of i (or i) is positive."""
  return (flat.astype(np.float32) @ r.T.astype(np.float32)) > 0


def calls_per_run(fn, target_seconds: float) -> int:
  """How many calls of `fn` (compiled already) take about `target_seconds`; at least 1."""
  start = time.perf_counter()
  fn()
  once = max(time.perf_counter() - start, 1e-9)
  return max(1, min(MAX_CALLS_PER_RUN, round(target_seconds / once)))


def _time_and_compare(measured: str, objective, z: np.ndarray, y: np.ndarray, *, repeats: int,
                      run_seconds: float, numpy_fn=None, numpy_rows: int | None = None,
                      note: str = "", ctx: runner.Context) -> runner.Row:
  """Times ours on (z, y), and numpy_fn on the first `numpy_rows` examples scaled up to all of them.

  A run repeats the call to last about `run_seconds` (calls of a few microseconds cannot be timed one
  by one); the figure is per call. The first calls (compilation, calibration) are the warm-up.
  """
  value_and_grad = jax.jit(jax.value_and_grad(objective))
  z_device, y_device = jnp.asarray(z), jnp.asarray(y)

  def ours_once():
    jax.block_until_ready(value_and_grad(z_device, y_device))

  ours_once()  # Compiles.
  calls = calls_per_run(ours_once, run_seconds)

  def ours():
    for _ in range(calls):
      out = value_and_grad(z_device, y_device)
    jax.block_until_ready(out)

  candidates = [runner.Candidate("ours", ours, work=calls, warmup=lambda: None)]
  numpy_rows = numpy_rows or z.shape[0]
  z_part, y_part = z[:numpy_rows], y[:numpy_rows]
  if numpy_fn is not None:
    numpy_calls = calls_per_run(lambda: numpy_fn(z_part, y_part), run_seconds)

    def baseline():
      for _ in range(numpy_calls):
        numpy_fn(z_part, y_part)

    candidates.append(runner.Candidate("numpy", baseline, work=numpy_calls, warmup=lambda: None))
  stats = runner.measure_alternating(candidates, repeats=repeats, unit="ms",
                                     on_failure=lambda c, why: ctx.skip(SUITE, c.name, why))
  extra = {"batch": z.shape[0], "labels": z.shape[1], "calls_per_run": calls}
  row = runner.Row(SUITE, measured, "jit(value_and_grad), float32", "ms", stats["ours"][0],
                   note=note, extra=extra)
  if "numpy" in stats:
    loss, grad = value_and_grad(jnp.asarray(z_part), jnp.asarray(y_part))
    ref_loss, ref_grad = numpy_fn(z_part, y_part)
    extra.update(numpy_calls_per_run=numpy_calls, numpy_rows=numpy_rows, loss=float(loss),
                 loss_abs_diff=abs(float(loss) - ref_loss),
                 grad_max_abs_diff=float(np.max(np.abs(np.asarray(grad) - ref_grad))),
                 grad_max_abs=float(np.max(np.abs(ref_grad))))
    numpy_stats = stats["numpy"][0]
    if numpy_rows < z.shape[0]:
      # Examples are independent and processed in fixed-size blocks: time is linear in the batch.
      numpy_stats = numpy_stats.scaled(z.shape[0] / numpy_rows, extrapolated=True)
      row.note = (row.note + "; " if row.note else "") + (
          f"NumPy timed on {numpy_rows} of {z.shape[0]} examples, extrapolated linearly")
    row.baseline, row.baseline_stats = "literal NumPy, analytic backward, float32", numpy_stats
  return row


@runner.SUITES.register(SUITE)
def run(ctx: runner.Context) -> list[runner.Row]:
  batch = 64 if ctx.tiny else 512
  repeats = 2 if ctx.tiny else 7
  run_seconds = 0.02 if ctx.tiny else 0.25
  rng = np.random.default_rng(0)
  tax = taxonomy_lib.load("v1.3")
  # Labels with WIT's frequencies (synthetic.py's table, floored so every label occurs).
  freqs = np.array([synthetic.WIT_FLAT_COUNTS.get(l, 0) / synthetic.WIT_SAMPLE_SIZE
                    for l in tax.labels])
  freqs = np.maximum(freqs, 0.01)
  flat = (rng.random((batch, tax.num_labels)) < freqs).astype(np.float32)
  z = (2 * rng.standard_normal((batch, tax.num_labels))).astype(np.float32)
  positives = np.maximum(np.round(freqs * synthetic.WIT_SAMPLE_SIZE), 1)
  rows = []
  for name in losses.names():
    objective = losses.from_config(losses.config(name), positives=positives,
                                   num_examples=synthetic.WIT_SAMPLE_SIZE,
                                   ancestor_matrix=tax.ancestor_matrix)
    y = tax.close(flat).astype(np.float32) if objective.hierarchical else flat
    numpy_fn = numpy_losses.value_and_grad_fn(name, objective.params)
    if name == "chmcnn":
      r = tax.ancestor_matrix.astype(bool)
      numpy_fn = lambda z, y, r=r: numpy_losses.mcloss_value_and_grad(z, y, r)  # noqa: E731
    rows.append(_time_and_compare(
        f"loss {name}, forward+backward, batch {batch} x {tax.num_labels} labels", objective, z, y,
        repeats=repeats, run_seconds=run_seconds, numpy_fn=numpy_fn, ctx=ctx))

  num_labels = 300 if ctx.tiny else BIG_DAG_LABELS
  r = random_dag(num_labels, seed=0)
  flat = np.zeros((batch, num_labels), bool)
  for row in range(batch):
    flat[row, rng.choice(num_labels, size=5, replace=False)] = True
  y = close_labels(flat, r).astype(np.float32)
  z = (2 * rng.standard_normal((batch, num_labels))).astype(np.float32)
  objective = losses.build("chmcnn", ancestor_matrix=r.astype(np.float32))
  block = numpy_losses.mcm_rows_per_block(num_labels)
  rows.append(_time_and_compare(
      f"MCLoss forward+backward, batch {batch} x {num_labels} labels (random DAG, "
      f"nnz(R) = {int(r.sum()):,})", objective, z, y, repeats=2 if ctx.tiny else 3,
      run_seconds=run_seconds, numpy_rows=16 if ctx.tiny else 32,
      numpy_fn=lambda z, y: numpy_losses.mcloss_value_and_grad(z, y, r),
      note=(f"NumPy's (B, L, L) broadcast is {batch * num_labels**2 * 4 / 2**30:.2g} GiB in "
            f"float32: computed {block} examples at a time"),
      ctx=ctx))
  return rows
