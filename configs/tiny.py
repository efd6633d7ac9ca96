r"""A tiny model on an existing dataset: for tests, smoke runs and multi-host rehearsals.

  wikitopics train --config configs/tiny.py:/path/to/dataset --workdir /tmp/tiny

The argument is the dataset directory (no synthetic generation). Expected runtime: under a minute on
2 CPU cores for the tests' 128-image datasets, most of it compilation.
"""

from wikitopics_jax import configlib


@configlib.loss_argument
def get_config(arg=None):
  c = configlib.base_config()
  c.data.dir = arg or "data/synthetic-32px"
  c.data.generate_synthetic = False
  c.model.name = "efficientnet_tiny"
  c.model.head = "gap"
  c.batch_size = 32
  c.eval_batch_size = 32
  c.num_epochs = 2
  c.log_every_steps = 1
  c.checkpoint.keep_latest = 1
  return c
