"""The multimodal topic classifier: an EfficientNet image backbone, a text tower and a fusion head.

Built by `models.create_model` when `config.text.tower != "none"` (`create_multimodal`); the
`config.text` keys (all in `default_text_config()`):
  tower             "none" (the image-only EfficientNet, unchanged), "bag" (`text/bag.py`, trained from
                    scratch) or "minilm" (`text/minilm.py`, pretrained all-MiniLM-L6-v2).
  image             True: image + text; False: a text-only model (no image backbone: the text feature
                    -> LayerNorm -> Dense(hidden_dim) + ReLU -> Dense(num_labels); `fusion` unused).
  fusion            "concat" or "gated" (`LateFusion` of the globally average-pooled feature map and the
                    pooled text feature) or "label_query" (`LabelQueryHead` over the feature map's h*w
                    patch tokens and the text's token states: MiniLM's last hidden states, or the bag's
                    n-gram embeddings).
  hidden_dim        width of the late-fusion hidden layer / gated unit (and of the text-only head).
  modality_dropout  {"text": p, "image": p}: per-example modality dropout in training (ModalityDropout).
  bag               {num_buckets, dim, max_ids, min_n, max_n, word_ngrams}: `BagTokenizer`/`BagOfNgrams`.
  minilm            {max_length, trainable}: the tokenizer's length; trainable False freezes the
                    encoder (no gradients, no optimiser state, no dropout).
  label_query       {width, heads, layers}: the `LabelQueryHead`'s.

The call: `model(images, text_ids=, text_mask=, has_text=, has_image=)` -> float32 logits
(B, num_labels). `has_text` / `has_image` (B,) bool remove a modality per example (None = present;
an all-False `text_mask` row also means no text). A removed modality is handled exactly as one dropped
by modality dropout in training: late fusion puts the learned "missing" vector in its place, the
label-query head masks its tokens out of the attention keys. Modality dropout never removes the only
modality an example has. An example with neither (no text, has_image False) gets both "missing"
vectors (late fusion) or attends to zeroed image tokens (label query): a constant prediction.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from wikitopics_jax.errors import InputError
from wikitopics_jax.models import efficientnet
from wikitopics_jax.models.text import bag as bag_lib
from wikitopics_jax.models.text import fusion as fusion_lib

TOWERS = ("none", "bag", "minilm")
FUSIONS = ("concat", "gated", "label_query")
# The batch keys a multimodal model takes besides the image (the pipeline's tokenisation makes the
# first three; evaluation adds has_image to blank the image).
TEXT_INPUTS = ("text_ids", "text_mask", "has_text", "has_image")


def default_text_config() -> ml_collections.ConfigDict:
  """Every config.text key with its default: no text (today's image-only model)."""
  return ml_collections.ConfigDict({
      "tower": "none",
      "image": True,
      "fusion": "concat",
      "hidden_dim": 256,
      "modality_dropout": {"text": 0.0, "image": 0.0},
      "bag": {"num_buckets": 1 << 18, "dim": 64, "max_ids": 128, "min_n": 3, "max_n": 6,
              "word_ngrams": 2},
      "minilm": {"max_length": 64, "trainable": False},
      "label_query": {"width": 128, "heads": 4, "layers": 1},
  })


def is_multimodal(config: ml_collections.ConfigDict) -> bool:
  """Whether the config builds this model (configs saved before config.text existed do not)."""
  text = config.get("text")
  return text is not None and text.get("tower", "none") != "none"


def checked_text_config(text_cfg: ml_collections.ConfigDict | dict | None) -> ml_collections.ConfigDict:
  """config.text over the defaults, every key and value validated (one-line errors name `text.<key>`)."""
  cfg = default_text_config()
  given = {} if text_cfg is None else (text_cfg.to_dict() if hasattr(text_cfg, "to_dict")
                                       else dict(text_cfg))

  def merge(node: ml_collections.ConfigDict, values: dict, prefix: str) -> None:
    for key, value in values.items():
      if key not in node:
        raise InputError(f"unknown config key text.{prefix}{key}; valid keys: {sorted(node.keys())}")
      if isinstance(node[key], ml_collections.ConfigDict):
        if not isinstance(value, dict):
          raise InputError(f"text.{prefix}{key}={value!r}: must be a dict of {sorted(node[key].keys())}")
        merge(node[key], value, f"{prefix}{key}.")
      else:
        with node.ignore_type():
          node[key] = value

  merge(cfg, given, "")

  def fail(key: str, value: Any, why: str):
    raise InputError(f"config.text.{key}={value!r}: {why}")

  if cfg.tower not in TOWERS:
    fail("tower", cfg.tower, f"must be one of {list(TOWERS)}")
  if cfg.fusion not in FUSIONS:
    fail("fusion", cfg.fusion, f"must be one of {list(FUSIONS)}")
  if not isinstance(cfg.image, bool):
    fail("image", cfg.image, "must be True (image + text) or False (text only)")
  for modality in ("text", "image"):
    p = cfg.modality_dropout[modality]
    if not (isinstance(p, (int, float)) and 0 <= p < 1):
      fail(f"modality_dropout.{modality}", p, "must be in [0, 1)")
  positive = [("hidden_dim", cfg.hidden_dim), ("bag.num_buckets", cfg.bag.num_buckets),
              ("bag.dim", cfg.bag.dim), ("bag.max_ids", cfg.bag.max_ids),
              ("minilm.max_length", cfg.minilm.max_length), ("label_query.width", cfg.label_query.width),
              ("label_query.heads", cfg.label_query.heads)]
  for key, value in positive:
    if not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
      fail(key, value, "must be a positive int")
  if cfg.bag.word_ngrams not in (1, 2):
    fail("bag.word_ngrams", cfg.bag.word_ngrams, "must be 1 (words) or 2 (words and bigrams)")
  if cfg.bag.min_n != 0 and not (isinstance(cfg.bag.min_n, int) and isinstance(cfg.bag.max_n, int)
                                 and 2 <= cfg.bag.min_n <= cfg.bag.max_n):
    fail("bag.min_n", cfg.bag.min_n, f"needs 2 <= min_n <= max_n (max_n={cfg.bag.max_n}) or 0 (off)")
  if not isinstance(cfg.minilm.trainable, bool):
    fail("minilm.trainable", cfg.minilm.trainable, "must be True or False")
  if not 1 <= cfg.minilm.max_length <= 512:
    fail("minilm.max_length", cfg.minilm.max_length, "must be in [1, 512] (MiniLM's positions)")
  if cfg.label_query.layers not in (1, 2):
    fail("label_query.layers", cfg.label_query.layers, "must be 1 or 2")
  if cfg.label_query.width % cfg.label_query.heads:
    fail("label_query.width", cfg.label_query.width,
         f"must be a multiple of label_query.heads={cfg.label_query.heads}")
  return cfg


def text_tokenizer(config: ml_collections.ConfigDict):
  """The host-side tokenizer of the config's text tower (texts -> ids, mask), or None (no text).

  One per distinct tower setting and process (the bag tokenizer's word cache then carries over from
  training to evaluation).
  """
  if not is_multimodal(config):
    return None
  cfg = checked_text_config(config.text)
  if cfg.tower == "bag":
    return _bag_tokenizer(cfg.bag.num_buckets, cfg.bag.max_ids, cfg.bag.min_n, cfg.bag.max_n,
                          cfg.bag.word_ngrams)
  from wikitopics_jax.models.text import minilm  # pylint: disable=g-import-not-at-top
  return minilm.default_tokenizer(cfg.minilm.max_length)


@functools.lru_cache(maxsize=8)
def _bag_tokenizer(num_buckets: int, max_ids: int, min_n: int, max_n: int,
                   word_ngrams: int) -> bag_lib.BagTokenizer:
  return bag_lib.BagTokenizer(num_buckets, max_ids, min_n=min_n, max_n=max_n,
                              word_ngrams=word_ngrams)


class TextOnlyHead(nnx.Module):
  """Text feature (B, Dt) -> LayerNorm -> Dense(hidden) + ReLU -> Dense(num_labels), float32 logits."""

  def __init__(self, text_dim: int, hidden_dim: int, num_labels: int, *, rngs: nnx.Rngs):
    self.norm = nnx.LayerNorm(text_dim, rngs=rngs)
    self.hidden = nnx.Linear(text_dim, hidden_dim, rngs=rngs)
    self.readout = nnx.Linear(hidden_dim, num_labels, rngs=rngs)

  def __call__(self, text: jax.Array) -> jax.Array:
    return self.readout(jax.nn.relu(self.hidden(self.norm(text.astype(jnp.float32))))
                        ).astype(jnp.float32)


class MultimodalClassifier(nnx.Module):
  """EfficientNet features + a text tower + a fusion head (module docstring); float32 logits."""

  def __init__(self, image: efficientnet.EfficientNet | None, text_cfg: ml_collections.ConfigDict, *,
               num_labels: int, rngs: nnx.Rngs):
    self.tower = text_cfg.tower
    self.fusion = text_cfg.fusion
    self.text_trainable = text_cfg.tower == "bag" or bool(text_cfg.minilm.trainable)
    self.image = image
    if text_cfg.tower == "bag":
      self.text = bag_lib.BagOfNgrams(text_cfg.bag.num_buckets, text_cfg.bag.dim, rngs=rngs)
      text_dim = text_cfg.bag.dim
    else:
      from wikitopics_jax.models.text import minilm  # pylint: disable=g-import-not-at-top
      # A frozen encoder runs as in inference (no dropout), as sentence-transformers embeds.
      self.text = minilm.pretrained_minilm(dropout_rate=0.1 if self.text_trainable else 0.0)
      text_dim = self.text.config.hidden
    drop = text_cfg.modality_dropout
    if image is None:
      self.head = TextOnlyHead(text_dim, text_cfg.hidden_dim, num_labels, rngs=rngs)
      return
    image_dim = image.architecture.top_filters
    if text_cfg.fusion == "label_query":
      lq = text_cfg.label_query
      # The head's own text dropout stays off: the model drops both modalities itself
      # (`fusion.kept_modalities`).
      self.head = fusion_lib.LabelQueryHead(num_labels, image_dim, text_dim, width=lq.width,
                                            heads=lq.heads, layers=lq.layers, text_dropout=0.0,
                                            rngs=rngs)
      self.text_dropout = fusion_lib.ModalityDropout(text_dim, float(drop.text), missing="zeros",
                                                     rngs=rngs)
      self.image_dropout = fusion_lib.ModalityDropout(image_dim, float(drop.image), missing="zeros",
                                                      rngs=rngs)
    else:
      self.head = fusion_lib.LateFusion(image_dim, text_dim, num_labels, fusion=text_cfg.fusion,
                                        hidden_dim=text_cfg.hidden_dim,
                                        text_dropout=float(drop.text),
                                        image_dropout=float(drop.image), rngs=rngs)

  @property
  def input_normalization(self) -> str | None:
    """The image backbone's (set by a pretrained init); read by the train/eval steps."""
    return None if self.image is None else self.image.input_normalization

  def _text_inputs(self, batch: int, text_ids, text_mask, has_text):
    if text_ids is None:
      # No text at all: one padded position, so shapes stay static.
      text_ids = jnp.zeros((batch, 1), jnp.int32)
      text_mask = jnp.zeros((batch, 1), bool)
    text_mask = jnp.ones(text_ids.shape, bool) if text_mask is None else jnp.asarray(text_mask, bool)
    present = jnp.any(text_mask, axis=-1)
    if has_text is not None:
      present = present & jnp.asarray(has_text, bool)
    return text_ids, text_mask, present

  def _text_tokens(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
    if self.tower == "bag":
      tokens = self.text.embed(ids).astype(jnp.float32)
    else:
      tokens = self.text.tokens(ids, mask)
    return tokens if self.text_trainable else jax.lax.stop_gradient(tokens)

  def _text_feature(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
    feature = self.text(ids, mask)
    return feature if self.text_trainable else jax.lax.stop_gradient(feature)

  def __call__(self, images: jax.Array, text_ids: jax.Array | None = None,
               text_mask: jax.Array | None = None, has_text: jax.Array | None = None,
               has_image: jax.Array | None = None) -> jax.Array:
    batch = images.shape[0]
    text_ids, text_mask, has_text = self._text_inputs(batch, text_ids, text_mask, has_text)
    if self.image is None:
      # Text only: an example without text gets the tower's zeros (LayerNorm then makes them
      # a learned constant, the head's bias).
      text = self._text_feature(text_ids, text_mask)
      return self.head(jnp.where(has_text[:, None], text, 0.0))
    has_image = (jnp.ones((batch,), bool) if has_image is None else jnp.asarray(has_image, bool))
    feature_map = self.image.features(images)
    if self.fusion == "label_query":
      text_kept, image_kept = fusion_lib.kept_modalities(self.text_dropout, self.image_dropout,
                                                         has_text, has_image)
      tokens = feature_map.reshape(batch, -1, feature_map.shape[-1])
      # A removed image's tokens are zeroed (no gradient into the backbone) and masked out, unless
      # the example has nothing else to attend to.
      tokens = jnp.where(image_kept[:, None, None], tokens, 0)
      image_mask = jnp.broadcast_to((image_kept | ~text_kept)[:, None], tokens.shape[:2])
      return self.head(tokens, self._text_tokens(text_ids, text_mask),
                       text_mask & text_kept[:, None], image_mask)
    pooled = jnp.mean(feature_map.astype(jnp.float32), axis=(1, 2))
    return self.head(pooled, self._text_feature(text_ids, text_mask), has_text, has_image)

  def set_trainable_layers(self, num_layers: int | None) -> Any:
    """The image backbone's last `num_layers` layers (None = all), the fusion head and the text
    tower (unless MiniLM is frozen) train; returns the NNX filter of the trainable Params."""
    image_filter = nnx.Param
    if self.image is not None:
      image_filter = self.image.set_trainable_layers(num_layers)

    def selected(path: tuple, value: Any) -> bool:
      if not isinstance(value, nnx.Param):
        return False
      if path and path[0] == "image":
        return image_filter is nnx.Param or image_filter(tuple(path[1:]), value)
      if path and path[0] == "text":
        return self.text_trainable
      return True

    return selected


def create_multimodal(image_builder, text_cfg: ml_collections.ConfigDict, *, num_labels: int,
                      rngs: nnx.Rngs) -> MultimodalClassifier:
  """`image_builder()` -> the EfficientNet backbone (its classifier head is removed here), or None
  when text_cfg.image is False; text_cfg checked by `checked_text_config`."""
  image = None
  if text_cfg.image:
    image = image_builder()
    # Only the feature map is used: the image classifier head would be dead parameters.
    del image.head
  return MultimodalClassifier(image, text_cfg, num_labels=num_labels, rngs=rngs)

