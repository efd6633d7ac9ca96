"""Image augmentation as Grain random transforms (numpy only), deterministic given the seed.

Two augmentations of the thesis (section 4.2.3):

* `NaiveAugment`: every training image gets a random zoom, rotation, shift and horizontal flip, the
  Keras ImageDataGenerator recipe. The ranges are Keras-style parameters (rotation in degrees, zoom
  and shift as fractions); the defaults are common values, not the thesis's (not recorded in our
  notes). Pixels uncovered by the transform repeat the nearest edge pixel (Keras's default).
* `DuplicateAugment`: only for the copies added by oversampling (`resampling.Resampled.is_duplicate`,
  carried in the element as ``is_duplicate``): each of Transpose, HorizontalFlip, VerticalFlip,
  ShiftScaleRotate and CoarseDropout is applied with its own probability, the albumentations
  pipeline the thesis used, with albumentations' default ranges (shift 0.0625, scale 0.1, rotation 45
  degrees with reflected borders; up to 8 holes of up to 1/8 of the side, filled with 0). A copy
  then differs from its original, which is the point of label-dependent augmentation: rare labels
  get more, and more varied, examples; originals stay untouched.

Both are `grain.transforms.RandomMap`s: Grain hands each element its own `np.random.Generator`
derived from the dataset's seed and the element's index, so ``ds.random_map(NaiveAugment(),
seed=s)`` gives the same images for the same seed, whatever the worker count. Elements are dicts
with an HWC uint8 ``"image"``; other keys (labels) pass through unchanged.

Geometry: one affine map about the image centre, applied by inverse mapping with bilinear
interpolation, so zoom, rotation and shift resample the image once.

Each transform's `sample` (the draws) and `apply` (the pixels) are separate methods, so the device
version (`augment_device`) can be checked against this one with identical parameters.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import grain
import numpy as np

BORDER_MODES = ("nearest", "reflect", "constant")


def affine(image: np.ndarray, *, rotation_deg: float = 0.0, scale: float = 1.0,
           shift: tuple[float, float] = (0.0, 0.0), border: str = "nearest",
           fill: float = 0.0) -> np.ndarray:
  """Rotates (counter-clockwise, degrees), scales (>1 zooms in) and shifts ((dy, dx) in fractions of
  the height and width) an HWC image about its centre; bilinear; same shape and dtype."""
  if border not in BORDER_MODES:
    raise ValueError(f"border {border!r} is not one of {BORDER_MODES}")
  height, width = image.shape[:2]
  centre_y, centre_x = (height - 1) / 2.0, (width - 1) / 2.0
  out_y, out_x = np.meshgrid(np.arange(height, dtype=np.float64),
                             np.arange(width, dtype=np.float64), indexing="ij")
  # Inverse map: output pixel -> source position.
  y = out_y - centre_y - shift[0] * height
  x = out_x - centre_x - shift[1] * width
  theta = math.radians(rotation_deg)
  cos, sin = math.cos(theta), math.sin(theta)
  # Image rows grow downwards, so a counter-clockwise turn on screen is clockwise in (x, y).
  src_x = (cos * x - sin * y) / scale + centre_x
  src_y = (sin * x + cos * y) / scale + centre_y
  return _bilinear(image, src_y, src_x, border, fill)


def _border_index(index: np.ndarray, size: int, border: str) -> np.ndarray:
  if border == "reflect" and size > 1:  # OpenCV's BORDER_REFLECT_101: ...2 1 | 0 1 2 ... n-1 | n-2...
    period = 2 * (size - 1)
    index = np.mod(index, period)
    return np.where(index >= size, period - index, index)
  return np.clip(index, 0, size - 1)


def _bilinear(image: np.ndarray, src_y: np.ndarray, src_x: np.ndarray, border: str,
              fill: float) -> np.ndarray:
  height, width = image.shape[:2]
  y0, x0 = np.floor(src_y).astype(np.int64), np.floor(src_x).astype(np.int64)
  wy, wx = (src_y - y0)[..., None], (src_x - x0)[..., None]
  pixels = image.astype(np.float32)
  if pixels.ndim == 2:
    pixels = pixels[..., None]
  result = np.zeros(src_y.shape + (pixels.shape[2],), np.float32)
  for dy, weight_y in ((0, 1 - wy), (1, wy)):
    for dx, weight_x in ((0, 1 - wx), (1, wx)):
      yy, xx = y0 + dy, x0 + dx
      values = pixels[_border_index(yy, height, border), _border_index(xx, width, border)]
      if border == "constant":
        outside = (yy < 0) | (yy >= height) | (xx < 0) | (xx >= width)
        values = np.where(outside[..., None], np.float32(fill), values)
      result += weight_y * weight_x * values
  result = result.reshape(image.shape) if image.ndim == 2 else result
  if np.issubdtype(image.dtype, np.integer):
    info = np.iinfo(image.dtype)
    return np.clip(np.rint(result), info.min, info.max).astype(image.dtype)
  return result.astype(image.dtype)


def coarse_dropout(image: np.ndarray, rng: np.random.Generator, *, max_holes: int,
                   max_size: int, fill: int = 0) -> np.ndarray:
  """Blanks 1..max_holes rectangles of 1..max_size pixels per side."""
  out = image.copy()
  height, width = image.shape[:2]
  for _ in range(int(rng.integers(1, max_holes + 1))):
    hole_h = int(rng.integers(1, max_size + 1))
    hole_w = int(rng.integers(1, max_size + 1))
    top = int(rng.integers(0, max(1, height - hole_h + 1)))
    left = int(rng.integers(0, max(1, width - hole_w + 1)))
    out[top:top + hole_h, left:left + hole_w] = fill
  return out


def _with_image(element: Any, image: np.ndarray) -> Any:
  return {**element, "image": image}


@dataclasses.dataclass(frozen=True)
class NaiveAugment(grain.transforms.RandomMap):
  """The thesis's naive augmentation: random zoom, rotation, shift, horizontal flip (every image).

  rotation_deg: rotation drawn from [-r, r]; zoom: scale from [1 - z, 1 + z]; shift: fraction of
  the side, from [-s, s] per axis; horizontal_flip: flip with probability 0.5.
  """
  rotation_deg: float = 20.0
  zoom: float = 0.2
  shift: float = 0.1
  horizontal_flip: bool = True

  def sample(self, rng: np.random.Generator) -> dict[str, Any]:
    """Draws this image's parameters (what `apply` takes), in the order `random_map` always drew."""
    flip = bool(self.horizontal_flip and rng.random() < 0.5)
    angle = rng.uniform(-self.rotation_deg, self.rotation_deg)
    scale = rng.uniform(1.0 - self.zoom, 1.0 + self.zoom)
    shift = (rng.uniform(-self.shift, self.shift), rng.uniform(-self.shift, self.shift))
    return {"flip": flip, "angle": angle, "scale": scale, "shift_y": shift[0], "shift_x": shift[1]}

  def apply(self, image: np.ndarray, params: dict[str, Any]) -> np.ndarray:
    """The augmentation with given parameters (`sample`'s keys); a float image stays unrounded."""
    if params["flip"]:
      image = image[:, ::-1]
    angle, scale = float(params["angle"]), float(params["scale"])
    shift = (float(params["shift_y"]), float(params["shift_x"]))
    if angle == 0 and scale == 1 and shift == (0.0, 0.0):
      return np.ascontiguousarray(image)
    return affine(image, rotation_deg=angle, scale=scale, shift=shift, border="nearest")

  def random_map(self, element, rng: np.random.Generator):
    return _with_image(element, self.apply(element["image"], self.sample(rng)))


@dataclasses.dataclass(frozen=True)
class DuplicateAugment(grain.transforms.RandomMap):
  """Label-dependent augmentation: transforms only elements whose `flag_key` is true (the copies
  added by oversampling); each operation is applied with its probability `p_*`."""
  flag_key: str = "is_duplicate"
  p_transpose: float = 0.5
  p_horizontal_flip: float = 0.5
  p_vertical_flip: float = 0.5
  p_shift_scale_rotate: float = 0.5
  shift_limit: float = 0.0625
  scale_limit: float = 0.1
  rotate_limit_deg: float = 45.0
  p_coarse_dropout: float = 0.5
  max_holes: int = 8
  max_hole_fraction: float = 0.125

  def max_hole_size(self, image_shape: tuple[int, ...]) -> int:
    return max(1, int(round(self.max_hole_fraction * min(image_shape[:2]))))

  def sample(self, rng: np.random.Generator, image_shape: tuple[int, ...]) -> dict[str, Any]:
    """Draws a copy's parameters (what `apply` takes), in the order `random_map` always drew.

    holes: (max_holes, 4) int64 rows (top, left, height, width); only the first `num_holes` count.
    """
    # Draw every decision, applied or not, so one operation's outcome never shifts another's.
    draws = rng.random(5)
    angle = rng.uniform(-self.rotate_limit_deg, self.rotate_limit_deg)
    scale = 1.0 + rng.uniform(-self.scale_limit, self.scale_limit)
    shift = (rng.uniform(-self.shift_limit, self.shift_limit),
             rng.uniform(-self.shift_limit, self.shift_limit))
    dropout_rng = np.random.default_rng(rng.integers(2**63))
    params = {"transpose": draws[0] < self.p_transpose, "hflip": draws[1] < self.p_horizontal_flip,
              "vflip": draws[2] < self.p_vertical_flip,
              "shift_scale_rotate": draws[3] < self.p_shift_scale_rotate,
              "angle": angle, "scale": scale, "shift_y": shift[0], "shift_x": shift[1],
              "dropout": draws[4] < self.p_coarse_dropout, "num_holes": 0,
              "holes": np.zeros((self.max_holes, 4), np.int64)}
    if params["dropout"]:
      # Same draws as `coarse_dropout`; a transpose swaps the sides the hole corners range over.
      height, width = image_shape[:2]
      if params["transpose"]:
        height, width = width, height
      max_size = self.max_hole_size(image_shape)
      params["num_holes"] = int(dropout_rng.integers(1, self.max_holes + 1))
      for k in range(params["num_holes"]):
        hole_h = int(dropout_rng.integers(1, max_size + 1))
        hole_w = int(dropout_rng.integers(1, max_size + 1))
        top = int(dropout_rng.integers(0, max(1, height - hole_h + 1)))
        left = int(dropout_rng.integers(0, max(1, width - hole_w + 1)))
        params["holes"][k] = (top, left, hole_h, hole_w)
    return params

  def apply(self, image: np.ndarray, params: dict[str, Any]) -> np.ndarray:
    """The augmentation with given parameters (`sample`'s keys); a float image stays unrounded."""
    if params["transpose"]:
      image = np.swapaxes(image, 0, 1)
    if params["hflip"]:
      image = image[:, ::-1]
    if params["vflip"]:
      image = image[::-1]
    if params["shift_scale_rotate"]:
      image = affine(image, rotation_deg=float(params["angle"]), scale=float(params["scale"]),
                     shift=(float(params["shift_y"]), float(params["shift_x"])), border="reflect")
    if params["dropout"]:
      image = image.copy()
      for top, left, hole_h, hole_w in params["holes"][:int(params["num_holes"])]:
        image[top:top + hole_h, left:left + hole_w] = 0
    return np.ascontiguousarray(image)

  def random_map(self, element, rng: np.random.Generator):
    if not bool(np.asarray(element.get(self.flag_key, False))):
      return element
    image = element["image"]
    return _with_image(element, self.apply(image, self.sample(rng, image.shape)))
