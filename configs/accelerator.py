r"""Accelerator settings: bf16 compute, accelerator batch sizes, augmentation on the device.

  wikitopics train --config configs/accelerator.py:b0_64 --workdir workdir/b0_64
  wikitopics train --config configs/accelerator.py:b2_64 --workdir workdir/b2_64 \
      --config.data.dir=/path/to/wit_64px --config.data.generate_synthetic=False

The argument picks one setting (see `SETTINGS`): EfficientNet-B0 or B2 at 64x64 (the thesis's image
size), or B0 at 224x224 (ImageNet's). Parameters and BatchNorm statistics stay float32; convolutions
and activations run in bfloat16. The global batch is split over all devices of all hosts, so it must
divide by the device count (and by config.grad_accum_steps x the device count). Data defaults to the
synthetic set at the setting's image size (`launch/accelerator_check.sh` runs each for a few hundred
steps). Expected runtime: minutes per epoch of the synthetic data on one modern GPU; not measured here
(no accelerator was available when this was written; docs/benchmarks.md).
"""

from wikitopics_jax import configlib

# name: (model, image size, global batch size, synthetic images)
SETTINGS = {
    "b0_64": ("efficientnet_b0", 64, 1024, 50_000),
    "b2_64": ("efficientnet_b2", 64, 512, 50_000),
    "b0_224": ("efficientnet_b0", 224, 256, 8_192),
}


@configlib.loss_argument
def get_config(arg=None):
  if arg not in SETTINGS:
    raise ValueError(f"configs/accelerator.py:{arg}: valid settings: {sorted(SETTINGS)}")
  model, image_size, batch_size, num_images = SETTINGS[arg]
  c = configlib.base_config()
  c.data.dir = f"data/synthetic-{image_size}px-{num_images}"
  c.data.synthetic.image_size = image_size
  c.data.synthetic.num_images = num_images
  c.data.augment = "naive"
  c.data.augment_on = "device"
  # Two worker processes decode while the main process feeds the device.
  c.data.worker_count = 2
  c.model.name = model
  c.model.image_size = image_size
  c.model.head = "gap" if image_size == 224 else "thesis"
  c.model.dtype = "bfloat16"
  c.batch_size = batch_size
  c.eval_batch_size = batch_size
  c.num_epochs = 15
  c.log_every_steps = 50
  return c
