"""The `augment` recipes on the accelerator: batched, jit-compilable JAX on (B, H, W, C) uint8 batches.

Same recipes, ranges, border modes and bilinear convention as the NumPy transforms of `augment`
(`NaiveAugment`: nearest-edge borders; `DuplicateAugment`: reflect-101 borders, holes filled with 0,
only where `is_duplicate`), split the same way into sampling parameters and applying them, so a test
can drive both implementations with identical parameters. Each stage rounds back to uint8 as the
host path does, so the batch keeps the pipeline's contract: uint8 pixels, normalised in the step
(`pipeline.normalize_images`).

Randomness: example i of the global stream gets `fold_in(key(seed), i)`, split once per stage; its
images depend on (seed, i, its pixels) only, not on its place in the batch, the batch's other
examples, or the number of processes or devices. The draws are not those of the host path (JAX vs
NumPy generators): the same seed gives a different, equally distributed, augmentation.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from wikitopics_jax.data import augment

Params = dict[str, jax.Array]
Stage = augment.NaiveAugment | augment.DuplicateAugment


def example_keys(seed: int, indices: jax.Array) -> jax.Array:
  """(B,) global example indices -> (B,) typed PRNG keys, one per example."""
  base = jax.random.key(seed)
  return jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.asarray(indices).astype(jnp.uint32))


def _uniform(key, low: float, high: float) -> jax.Array:
  return jax.random.uniform(key, (), jnp.float32, low, high)


def naive_params(keys: jax.Array, recipe: augment.NaiveAugment) -> Params:
  """Per-example parameters of `recipe`, keys as `NaiveAugment.sample` returns them (batched)."""
  def one(key):
    k = jax.random.split(key, 5)
    flip = jax.random.uniform(k[0]) < 0.5
    return {"flip": flip & recipe.horizontal_flip,
            "angle": _uniform(k[1], -recipe.rotation_deg, recipe.rotation_deg),
            "scale": _uniform(k[2], 1.0 - recipe.zoom, 1.0 + recipe.zoom),
            "shift_y": _uniform(k[3], -recipe.shift, recipe.shift),
            "shift_x": _uniform(k[4], -recipe.shift, recipe.shift)}
  return jax.vmap(one)(keys)


def duplicate_params(keys: jax.Array, recipe: augment.DuplicateAugment,
                     image_shape: Sequence[int]) -> Params:
  """Per-example parameters of `recipe`, keys as `DuplicateAugment.sample` returns them (batched);
  holes: (B, max_holes, 4) int32 rows (top, left, height, width), the first `num_holes` count."""
  height, width = image_shape[:2]
  max_size = recipe.max_hole_size(tuple(image_shape))
  def one(key):
    k = jax.random.split(key, 10)
    draws = jax.random.uniform(k[0], (5,))
    transpose = draws[0] < recipe.p_transpose
    # The holes are placed on the transposed image, as on the host.
    side_h, side_w = jnp.where(transpose, width, height), jnp.where(transpose, height, width)
    hole_h = jax.random.randint(k[6], (recipe.max_holes,), 1, max_size + 1)
    hole_w = jax.random.randint(k[7], (recipe.max_holes,), 1, max_size + 1)
    top = jax.random.randint(k[8], (recipe.max_holes,), 0, jnp.maximum(1, side_h - hole_h + 1))
    left = jax.random.randint(k[9], (recipe.max_holes,), 0, jnp.maximum(1, side_w - hole_w + 1))
    return {"transpose": transpose, "hflip": draws[1] < recipe.p_horizontal_flip,
            "vflip": draws[2] < recipe.p_vertical_flip,
            "shift_scale_rotate": draws[3] < recipe.p_shift_scale_rotate,
            "angle": _uniform(k[1], -recipe.rotate_limit_deg, recipe.rotate_limit_deg),
            "scale": 1.0 + _uniform(k[2], -recipe.scale_limit, recipe.scale_limit),
            "shift_y": _uniform(k[3], -recipe.shift_limit, recipe.shift_limit),
            "shift_x": _uniform(k[4], -recipe.shift_limit, recipe.shift_limit),
            "dropout": draws[4] < recipe.p_coarse_dropout,
            "num_holes": jax.random.randint(k[5], (), 1, recipe.max_holes + 1),
            "holes": jnp.stack([top, left, hole_h, hole_w], axis=-1).astype(jnp.int32)}
  return jax.vmap(one)(keys)


def _source_coords(params: Params, height: int, width: int) -> tuple[jax.Array, jax.Array]:
  """`augment.affine`'s inverse map, batched: (B, H, W) source rows and columns."""
  centre_y, centre_x = (height - 1) / 2.0, (width - 1) / 2.0
  out_y = jnp.arange(height, dtype=jnp.float32)[None, :, None]
  out_x = jnp.arange(width, dtype=jnp.float32)[None, None, :]
  per_example = lambda name: jnp.asarray(params[name], jnp.float32)[:, None, None]
  y = out_y - centre_y - per_example("shift_y") * height
  x = out_x - centre_x - per_example("shift_x") * width
  theta = per_example("angle") * (math.pi / 180.0)
  cos, sin, scale = jnp.cos(theta), jnp.sin(theta), per_example("scale")
  return (sin * x + cos * y) / scale + centre_y, (cos * x - sin * y) / scale + centre_x


def _border_index(index: jax.Array, size: int, border: str) -> jax.Array:
  if border == "reflect" and size > 1:  # OpenCV's BORDER_REFLECT_101, as in `augment`.
    period = 2 * (size - 1)
    index = jnp.mod(index, period)
    return jnp.where(index >= size, period - index, index)
  return jnp.clip(index, 0, size - 1)


IndexMap = Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]


def _bilinear(images: jax.Array, src_y: jax.Array, src_x: jax.Array, border: str, fill: float,
              index_map: IndexMap | None = None) -> jax.Array:
  """Samples float (B, H, W, C) images at (B, H, W) positions. `index_map` takes the border-resolved
  integer (row, column) of the frame the positions are in to the stored image's (flips, transpose):
  exact integer maps, so a flip followed by a resampling costs one gather."""
  if border not in augment.BORDER_MODES:
    raise ValueError(f"border {border!r} is not one of {augment.BORDER_MODES}")
  batch, height, width, channels = images.shape
  y0, x0 = jnp.floor(src_y), jnp.floor(src_x)
  wy, wx = (src_y - y0)[..., None], (src_x - x0)[..., None]
  y0, x0 = y0.astype(jnp.int32), x0.astype(jnp.int32)
  flat = images.reshape(batch, height * width, channels)
  result = jnp.zeros(src_y.shape + (channels,), jnp.float32)
  for dy, weight_y in ((0, 1 - wy), (1, wy)):
    for dx, weight_x in ((0, 1 - wx), (1, wx)):
      yy, xx = y0 + dy, x0 + dx
      row, col = _border_index(yy, height, border), _border_index(xx, width, border)
      if index_map is not None:
        row, col = index_map(row, col)
      flat_index = (row * width + col).reshape(batch, -1, 1)
      values = jnp.take_along_axis(flat, flat_index, axis=1).reshape(result.shape)
      if border == "constant":
        outside = (yy < 0) | (yy >= height) | (xx < 0) | (xx >= width)
        values = jnp.where(outside[..., None], jnp.float32(fill), values)
      result = result + weight_y * weight_x * values
  return result


def affine(images: jax.Array, params: Params, *, border: str = "nearest",
           fill: float = 0.0) -> jax.Array:
  """`augment.affine` on a float (B, H, W, C) batch, per-example `angle`, `scale`, `shift_y`,
  `shift_x` (each (B,)); unrounded float32."""
  src_y, src_x = _source_coords(params, images.shape[1], images.shape[2])
  return _bilinear(images.astype(jnp.float32), src_y, src_x, border, fill)


def _flag(params: Params, name: str) -> jax.Array:
  return jnp.asarray(params[name], bool)[:, None, None]


def apply_naive(images: jax.Array, params: Params) -> jax.Array:
  """`NaiveAugment.apply`, batched: (B, H, W, C) -> unrounded float32 pixels, same scale."""
  _, height, width, _ = images.shape
  src_y, src_x = _source_coords(params, height, width)
  flip = _flag(params, "flip")
  # Flip first, then the affine map: the affine frame's column c is the stored column W-1-c.
  index_map = lambda row, col: (row, jnp.where(flip, width - 1 - col, col))
  return _bilinear(images.astype(jnp.float32), src_y, src_x, "nearest", 0.0, index_map)


def apply_duplicate(images: jax.Array, params: Params) -> jax.Array:
  """`DuplicateAugment.apply`, batched, on every example (the caller selects the copies):
  (B, H, W, C) -> unrounded float32 pixels, same scale."""
  _, height, width, _ = images.shape
  if height != width:
    raise ValueError(f"transpose keeps the batch's shape only for square images, not {height}x{width}")
  transpose, hflip, vflip = (_flag(params, k) for k in ("transpose", "hflip", "vflip"))
  ssr = _flag(params, "shift_scale_rotate")
  src_y, src_x = _source_coords(params, height, width)
  out_y = jnp.arange(height, dtype=jnp.float32)[None, :, None]
  out_x = jnp.arange(width, dtype=jnp.float32)[None, None, :]
  src_y, src_x = jnp.where(ssr, src_y, out_y), jnp.where(ssr, src_x, out_x)

  def index_map(row, col):
    # Undo, last first: vertical flip, horizontal flip, transpose.
    row = jnp.where(vflip, height - 1 - row, row)
    col = jnp.where(hflip, width - 1 - col, col)
    return jnp.where(transpose, col, row), jnp.where(transpose, row, col)

  out = _bilinear(images.astype(jnp.float32), src_y, src_x, "reflect", 0.0, index_map)
  holes = params["holes"][:, :, None, None, :]  # (B, max_holes, 1, 1, 4)
  rows = jnp.arange(height)[None, None, :, None]
  cols = jnp.arange(width)[None, None, None, :]
  active = jnp.arange(holes.shape[1])[None, :] < jnp.asarray(params["num_holes"])[:, None]
  in_hole = ((rows >= holes[..., 0]) & (rows < holes[..., 0] + holes[..., 2])
             & (cols >= holes[..., 1]) & (cols < holes[..., 1] + holes[..., 3])
             & active[:, :, None, None])
  blank = in_hole.any(axis=1) & _flag(params, "dropout")
  return jnp.where(blank[..., None], 0.0, out)


def to_uint8(pixels: jax.Array) -> jax.Array:
  """Rounds half to even and clips, as `augment` does for uint8 images."""
  return jnp.clip(jnp.round(pixels), 0, 255).astype(jnp.uint8)


def augment_batch(images: jax.Array, indices: jax.Array, is_duplicate: jax.Array, *, seed: int,
                  stages: tuple[Stage, ...]) -> jax.Array:
  """Applies `stages` in order (as the host pipeline applies its list) to a uint8 (B, H, W, C) batch.

  indices: (B,) global example positions (what seeds the host path); is_duplicate: (B,) bool, which
  examples `DuplicateAugment` stages transform. Returns uint8 (B, H, W, C). Jittable with `seed`
  and `stages` static (the recipes are frozen dataclasses, so hashable).
  """
  if images.dtype != jnp.uint8:
    raise ValueError(f"expected a uint8 batch, got {images.dtype}")
  if not stages:
    return images
  keys = jax.vmap(lambda key: jax.random.split(key, len(stages)))(example_keys(seed, indices))
  for position, stage in enumerate(stages):
    stage_keys = keys[:, position]
    if isinstance(stage, augment.NaiveAugment):
      images = to_uint8(apply_naive(images, naive_params(stage_keys, stage)))
    elif isinstance(stage, augment.DuplicateAugment):
      copies = to_uint8(apply_duplicate(images, duplicate_params(stage_keys, stage, images.shape[1:])))
      images = jnp.where(jnp.asarray(is_duplicate, bool)[:, None, None, None], copies, images)
    else:
      raise TypeError(f"no device version of {type(stage).__name__}")
  return images


def from_augmentations(augmentations: Sequence[Stage], seed: int
                       ) -> Callable[[jax.Array, jax.Array, jax.Array], jax.Array] | None:
  """`trainer.augmentations_for(config)`'s list -> `(images, indices, is_duplicate) -> images` to
  call inside the jitted train step, or None when there is nothing to do."""
  stages = tuple(augmentations)
  for stage in stages:
    if not isinstance(stage, (augment.NaiveAugment, augment.DuplicateAugment)):
      raise TypeError(f"no device version of {type(stage).__name__}")
  if not stages:
    return None
  return functools.partial(augment_batch, seed=seed, stages=stages)
