r"""Image + text on the embedded synthetic dataset (its per-image titles and captions), on 2 CPU cores.

  wikitopics train --config configs/multimodal.py:fusion_bag --workdir workdir/mm_fusion_bag
  wikitopics evaluate --workdir workdir/mm_fusion_bag      # fused / image-only / text-only / half text

The argument picks the row of docs/multimodal.md's table:
  image_only     today's image model (config.text.tower = "none")
  bag_only       a text-only model: bag of n-grams, no image backbone (config.text.image = False)
  fusion_bag     image + bag of n-grams, late fusion (concatenation), modality dropout
  fusion_minilm  image + frozen all-MiniLM-L6-v2 (max_length 32), late fusion (concatenation)
  label_query    image + bag of n-grams, label queries cross-attending over image and text tokens
All rows: 4,000 synthetic 32x32 images (data/synthetic-32px-text), the demo's width/depth-halved B0,
4 epochs of Adam 1e-3 on hierarchical labels, batch 128. At 32x32 the B0 feature map is 1x1, so the
label-query head sees one image token next to the text's n-gram tokens.
"""

from wikitopics_jax import configlib
from wikitopics_jax.errors import InputError

ROWS = ("image_only", "bag_only", "fusion_bag", "fusion_minilm", "label_query")


@configlib.loss_argument
def get_config(arg=None):
  row = arg or "fusion_bag"
  if row not in ROWS:
    raise InputError(f"configs/multimodal.py:{row}: the argument must be one of {list(ROWS)}")
  c = configlib.base_config()
  c.data.dir = "data/synthetic-32px-text"
  c.data.synthetic.num_images = 4000
  c.data.synthetic.image_size = 32
  c.model.name = "efficientnet_b0"
  c.model.width_multiplier = 0.5
  c.model.depth_multiplier = 0.5
  c.model.head = "thesis"  # Only the image-only row uses it; the fusion heads replace it.
  c.batch_size = 128
  c.eval_batch_size = 256
  c.num_epochs = 4
  c.log_every_steps = 10
  c.thresholds.tune = False  # The table compares at threshold 0.5; saves a pass per run.
  c.text.bag.num_buckets = 1 << 16
  c.text.bag.dim = 64
  c.text.bag.max_ids = 64
  c.text.hidden_dim = 128
  if row == "bag_only":
    c.text.tower = "bag"
    c.text.image = False
  elif row == "fusion_bag":
    c.text.tower = "bag"
    c.text.fusion = "concat"
    c.text.modality_dropout.text = 0.2
    c.text.modality_dropout.image = 0.1
  elif row == "fusion_minilm":
    c.text.tower = "minilm"
    c.text.minilm.max_length = 32
    c.text.minilm.trainable = False
    c.text.fusion = "concat"
    c.text.modality_dropout.text = 0.2
    c.text.modality_dropout.image = 0.1
  elif row == "label_query":
    c.text.tower = "bag"
    c.text.fusion = "label_query"
    c.text.label_query.width = 64
    c.text.label_query.heads = 4
    c.text.modality_dropout.text = 0.2
    c.text.modality_dropout.image = 0.1
  return c
