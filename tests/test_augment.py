"""Augmentation transforms: geometry is right, duplicates only, deterministic given the seed."""

from __future__ import annotations

import grain
import numpy as np
import pytest

from wikitopics_jax.data import augment


def _image(size=9, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def _dataset(n=6, size=16, duplicates=None):
  duplicates = duplicates if duplicates is not None else [i % 2 == 1 for i in range(n)]
  return grain.MapDataset.range(n).map(
      lambda i: {"image": _image(size, seed=i), "labels": np.array([i, 1], np.uint8),
                 "is_duplicate": np.bool_(duplicates[i])})


def test_affine_quarter_turns_shifts_and_identity():
  image = _image()
  assert np.array_equal(augment.affine(image), image)
  assert np.array_equal(augment.affine(image, rotation_deg=90), np.rot90(image))
  assert np.array_equal(augment.affine(image, rotation_deg=-90), np.rot90(image, -1))
  shifted = augment.affine(image, shift=(0, 2 / 9), border="constant")
  assert np.array_equal(shifted[:, 2:], image[:, :-2]) and not shifted[:, :2].any()
  # Zoom 2x: the centre pixel stays, the image grows around it.
  zoomed = augment.affine(image, scale=2.0)
  assert np.array_equal(zoomed[4, 4], image[4, 4])
  # Reflect-101 borders mirror without repeating the edge pixel.
  reflected = augment.affine(image, shift=(0, 2 / 9), border="reflect")
  assert np.array_equal(reflected[:, 0], image[:, 2]) and np.array_equal(reflected[:, 1], image[:, 1])


def test_naive_augment_is_deterministic_and_keeps_labels():
  ds = _dataset().random_map(augment.NaiveAugment(), seed=7)
  first = [ds[i] for i in range(len(ds))]
  again = _dataset().random_map(augment.NaiveAugment(), seed=7)
  other = _dataset().random_map(augment.NaiveAugment(), seed=8)
  for i, element in enumerate(first):
    assert element["image"].shape == (16, 16, 3) and element["image"].dtype == np.uint8
    assert np.array_equal(element["image"], again[i]["image"])
    assert np.array_equal(element["labels"], [i, 1])
  assert any(not np.array_equal(first[i]["image"], other[i]["image"]) for i in range(len(ds)))
  assert any(not np.array_equal(first[i]["image"], _image(16, seed=i)) for i in range(len(ds)))
  # Order of reading does not matter (per-index generators), nor do worker threads.
  assert np.array_equal(ds[3]["image"], first[3]["image"])


def test_naive_augment_with_only_flip():
  flips_only = augment.NaiveAugment(rotation_deg=0, zoom=0, shift=0)
  ds = _dataset(n=20).random_map(flips_only, seed=0)
  flipped = 0
  for i in range(20):
    out, original = ds[i]["image"], _image(16, seed=i)
    assert np.array_equal(out, original) or np.array_equal(out, original[:, ::-1])
    flipped += np.array_equal(out, original[:, ::-1])
  assert 3 <= flipped <= 17


def test_duplicate_augment_touches_only_duplicates():
  ds = _dataset(n=8).random_map(augment.DuplicateAugment(), seed=1)
  changed = [not np.array_equal(ds[i]["image"], _image(16, seed=i)) for i in range(8)]
  assert not any(changed[0::2])  # Originals untouched.
  assert any(changed[1::2])
  for i in range(8):
    assert ds[i]["image"].shape == (16, 16, 3) and ds[i]["image"].dtype == np.uint8


@pytest.mark.parametrize("op,expected", [
    ("p_transpose", lambda x: np.swapaxes(x, 0, 1)),
    ("p_horizontal_flip", lambda x: x[:, ::-1]),
    ("p_vertical_flip", lambda x: x[::-1]),
])
def test_duplicate_augment_single_operations(op, expected):
  off = dict(p_transpose=0.0, p_horizontal_flip=0.0, p_vertical_flip=0.0,
             p_shift_scale_rotate=0.0, p_coarse_dropout=0.0)
  transform = augment.DuplicateAugment(**{**off, op: 1.0})
  element = {"image": _image(), "is_duplicate": True}
  out = transform.random_map(element, np.random.default_rng(0))
  assert np.array_equal(out["image"], expected(element["image"]))


def test_coarse_dropout_blanks_holes():
  image = np.full((64, 64, 3), 200, np.uint8)
  transform = augment.DuplicateAugment(p_transpose=0, p_horizontal_flip=0, p_vertical_flip=0,
                                       p_shift_scale_rotate=0, p_coarse_dropout=1.0)
  out = transform.random_map({"image": image, "is_duplicate": True}, np.random.default_rng(3))
  blank = (out["image"] == 0).all(axis=-1)
  assert 1 <= blank.sum() <= 8 * 8 * 8
  assert set(np.unique(out["image"])) <= {0, 200}


# Device (JAX) versions: same parameters -> same pixels as the NumPy reference; sharding- and
# batch-independent randomness.

def _batch(n=8, size=32, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _example_params(params, i):
  return {k: np.asarray(v)[i] for k, v in params.items()}


def test_numpy_affine_agrees_with_scipy_order_1():
  # Keras's apply_affine_transform is scipy.ndimage.affine_transform(order=1) about the centre;
  # scipy's "mirror" is OpenCV's BORDER_REFLECT_101 (albumentations' reflected borders), and its
  # "grid-constant" blends edge pixels with the fill, as OpenCV's BORDER_CONSTANT and `augment` do.
  from scipy import ndimage  # pylint: disable=import-outside-toplevel
  image = _image(size=12).astype(np.float32)
  angle, scale, shift = 33.0, 1.15, (0.13, -0.21)
  theta = np.radians(angle)
  cos, sin = np.cos(theta), np.sin(theta)
  # augment.affine's inverse map, as (row, column) <- (row, column).
  matrix = np.array([[cos, sin], [-sin, cos]]) / scale
  centre = np.array([5.5, 5.5])
  offset = centre - matrix @ (centre + np.array(shift) * 12)
  for border, mode in (("nearest", "nearest"), ("reflect", "mirror"), ("constant", "grid-constant")):
    expected = np.stack([ndimage.affine_transform(image[..., c], matrix, offset, order=1, mode=mode,
                                                  cval=0.0) for c in range(3)], axis=-1)
    got = augment.affine(image, rotation_deg=angle, scale=scale, shift=shift, border=border)
    np.testing.assert_allclose(got, expected, atol=1e-3, err_msg=border)


@pytest.mark.parametrize("border", augment.BORDER_MODES)
def test_device_affine_matches_numpy(border):
  import jax  # pylint: disable=import-outside-toplevel
  from wikitopics_jax.data import augment_device  # pylint: disable=import-outside-toplevel
  images = _batch()
  rng = np.random.default_rng(1)
  # Large turns and shifts so every example samples outside the image (the border mode matters).
  params = {"angle": rng.uniform(-60, 60, 8), "scale": rng.uniform(0.7, 1.3, 8),
            "shift_y": rng.uniform(-0.3, 0.3, 8), "shift_x": rng.uniform(-0.3, 0.3, 8)}
  fn = jax.jit(lambda x, p: augment_device.affine(x, p, border=border, fill=17.0))
  got = np.asarray(fn(images, {k: v.astype(np.float32) for k, v in params.items()}))
  for i in range(8):
    expected = augment.affine(images[i].astype(np.float32), rotation_deg=params["angle"][i],
                              scale=params["scale"][i],
                              shift=(params["shift_y"][i], params["shift_x"][i]), border=border,
                              fill=17.0)
    np.testing.assert_allclose(got[i] / 255, expected / 255, atol=1e-4, err_msg=f"{border} {i}")


def test_device_naive_matches_numpy_with_same_parameters():
  import jax  # pylint: disable=import-outside-toplevel
  from wikitopics_jax.data import augment_device  # pylint: disable=import-outside-toplevel
  recipe = augment.NaiveAugment()
  images = _batch()
  keys = augment_device.example_keys(3, np.arange(8, dtype=np.uint32))
  params = dict(jax.jit(augment_device.naive_params, static_argnums=1)(keys, recipe))
  params["flip"] = np.arange(8) % 2 == 0  # Both branches, whatever the draws.
  got = np.asarray(jax.jit(augment_device.apply_naive)(images, params))
  for i in range(8):
    p = _example_params(params, i)
    assert abs(p["angle"]) <= 20 and 0.8 <= p["scale"] <= 1.2 and abs(p["shift_x"]) <= 0.1
    expected = recipe.apply(images[i].astype(np.float32), p)
    np.testing.assert_allclose(got[i] / 255, expected / 255, atol=1e-4, err_msg=str(i))
    # And the rounded uint8s (the host path's output) up to a rounding tie.
    assert np.abs(augment_device.to_uint8(got[i]).astype(int)
                  - recipe.apply(images[i], p).astype(int)).max() <= 1


def test_device_duplicate_matches_numpy_with_same_parameters():
  import jax  # pylint: disable=import-outside-toplevel
  from wikitopics_jax.data import augment_device  # pylint: disable=import-outside-toplevel
  recipe = augment.DuplicateAugment()
  images = _batch()
  keys = augment_device.example_keys(4, np.arange(8, dtype=np.uint32))
  params = dict(jax.jit(augment_device.duplicate_params, static_argnums=(1, 2))(
      keys, recipe, images.shape[1:]))
  # Every combination of transpose and flips; resampling and holes on most examples.
  index = np.arange(8)
  params.update(transpose=index % 2 == 1, hflip=index // 2 % 2 == 1, vflip=index // 4 == 1,
                shift_scale_rotate=~np.isin(index, [0, 3]), dropout=index % 3 != 0)
  got = np.asarray(jax.jit(augment_device.apply_duplicate)(images, params))
  for i in range(8):
    p = _example_params(params, i)
    holes = p["holes"][:p["num_holes"]]
    assert 1 <= len(holes) <= 8 and (holes[:, 2:] >= 1).all() and (holes[:, 2:] <= 4).all()
    assert (holes[:, :2] >= 0).all() and (holes[:, :2] + holes[:, 2:] <= 32).all()
    expected = recipe.apply(images[i].astype(np.float32), p)
    np.testing.assert_allclose(got[i] / 255, expected / 255, atol=1e-4, err_msg=str(i))
  assert got.shape == images.shape
  # Example 0 has every operation off; example 3 only transposes and flips, which are exact
  # (integer positions, weights 0 and 1).
  assert np.array_equal(got[0], images[0])
  assert np.array_equal(got[3], images[3].swapaxes(0, 1)[:, ::-1])


def _device_augment(mesh_devices, images, indices, is_duplicate, seed=5):
  import jax  # pylint: disable=import-outside-toplevel
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # pylint: disable=import-outside-toplevel
  from wikitopics_jax.data import augment_device  # pylint: disable=import-outside-toplevel
  fn = augment_device.from_augmentations([augment.NaiveAugment(), augment.DuplicateAugment()], seed)
  sharding = NamedSharding(Mesh(np.array(mesh_devices), ("data",)), P("data"))
  jitted = jax.jit(fn, in_shardings=sharding, out_shardings=sharding)
  args = [jax.device_put(x, sharding) for x in (images, indices, is_duplicate)]
  return np.asarray(jitted(*args))


def test_device_augment_same_on_one_and_eight_devices():
  import jax  # pylint: disable=import-outside-toplevel
  assert len(jax.devices()) == 8
  images, indices = _batch(), np.arange(100, 108, dtype=np.uint32)
  is_duplicate = np.arange(8) % 2 == 1
  one = _device_augment(jax.devices()[:1], images, indices, is_duplicate)
  eight = _device_augment(jax.devices(), images, indices, is_duplicate)
  assert one.dtype == np.uint8 and one.shape == images.shape
  assert np.array_equal(one, eight)
  assert all(not np.array_equal(one[i], images[i]) for i in range(8))


def test_device_augment_depends_on_seed_and_index_only():
  import jax  # pylint: disable=import-outside-toplevel
  images, indices = _batch(), np.arange(100, 108, dtype=np.uint32)
  is_duplicate = np.arange(8) % 2 == 1
  devices = jax.devices()[:1]
  out = _device_augment(devices, images, indices, is_duplicate)
  # Another batch: reordered, with other examples in place of half of these.
  order = np.array([6, 3, 1, 4, 0, 2, 7, 5])
  mixed_images, mixed_indices = images[order].copy(), indices[order].copy()
  mixed_images[4:], mixed_indices[4:] = _batch(seed=9)[4:], np.arange(500, 504, dtype=np.uint32)
  mixed = _device_augment(devices, mixed_images, mixed_indices, is_duplicate[order])
  assert np.array_equal(mixed[:4], out[order[:4]])
  # Only duplicates get the duplicate recipe: with it off the originals come out the same.
  naive_only = _device_augment(devices, images, indices, np.zeros(8, bool))
  assert np.array_equal(naive_only[0::2], out[0::2])
  assert any(not np.array_equal(naive_only[i], out[i]) for i in range(1, 8, 2))
  other_seed = _device_augment(devices, images, indices, is_duplicate, seed=6)
  assert all(not np.array_equal(other_seed[i], out[i]) for i in range(8))
