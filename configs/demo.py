r"""The demo: train and evaluate on the embedded synthetic dataset, on a laptop CPU.

  wikitopics train --config configs/demo.py --workdir workdir/demo
  wikitopics train --config configs/demo.py:loss=focal --workdir workdir/focal --config.loss.gamma=3

Generates 20,000 synthetic 32x32 images with WIT's long-tailed label distribution (about 10 s, reused
afterwards), trains a width/depth-halved EfficientNet-B0 with the thesis head for 15 epochs (the thesis's count) with Adam
1e-3 on hierarchical labels, keeps the checkpoint with the lowest validation loss and evaluates it on
the test split. Expected runtime: about 5 minutes on 2 CPU cores (see README for the measured figure).
"""

from wikitopics_jax import configlib


@configlib.loss_argument
def get_config(arg=None):
  del arg
  c = configlib.base_config()
  c.data.dir = "data/synthetic-32px"
  c.data.synthetic.num_images = 20000
  c.data.synthetic.image_size = 32
  # A width/depth-halved B0: learns the synthetic signatures in minutes on 2 cores (XLA's CPU
  # backend is slow on depthwise convolutions; see the README's benchmark).
  c.model.name = "efficientnet_b0"
  c.model.width_multiplier = 0.5
  c.model.depth_multiplier = 0.5
  c.model.head = "thesis"
  c.batch_size = 128
  c.eval_batch_size = 256
  c.num_epochs = 15
  c.log_every_steps = 50
  return c
