r"""The thesis's setup: EfficientNet-B2 at 64x64, thesis head, batch 512, Adam 1e-3, 15 epochs.

Bernat (2023), section 3.2.1: flatten -> Dense(128, relu) -> Dense(31), hierarchical labels, weights of
the epoch with the lowest validation loss. Point data.dir at an ingested WIT dataset:

  wikitopics train --config configs/thesis_b2_64.py --workdir workdir/thesis_b2 \
      --config.data.dir=/path/to/wit_64px --config.data.generate_synthetic=False

Expected runtime: about 15 epochs x 760K images; hours on one GPU (see the README's accelerator
table), impractical on a laptop CPU. On the synthetic data (default here) it runs, slowly, on CPU.
"""

from wikitopics_jax import configlib


@configlib.loss_argument
def get_config(arg=None):
  del arg
  c = configlib.base_config()
  c.data.dir = "data/synthetic-64px"
  c.data.synthetic.image_size = 64
  c.model.name = "efficientnet_b2"
  c.model.head = "thesis"
  c.batch_size = 512
  c.eval_batch_size = 512
  c.num_epochs = 15
  return c
