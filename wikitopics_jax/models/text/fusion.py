"""Image+text fusion heads: late fusion of pooled features and a label-query cross-attention head.

`LateFusion`: pooled image features (B, Di) and text features (B, Dt) -> logits (B, num_labels).
  "concat" concatenates the two (each LayerNorm-ed first: MiniLM's unit-norm embeddings and an
  EfficientNet's pooled activations differ in scale by orders of magnitude) into an optional hidden
  layer, then a linear readout. "gated" is a gated multimodal unit (Arevalo et al., 2017):
  h = z * tanh(W_i x_i) + (1 - z) * tanh(W_t x_t) with a learned per-feature gate
  z = sigmoid(W_z [x_i; x_t]), then a linear readout.

`ModalityDropout`: in training, drops a modality's feature of an example with probability `rate`,
  replacing it by a learned "missing" vector (or zeros). Examples that have no text to begin with
  (`has_text` False) get the same replacement, so at evaluation an image without text is seen exactly
  as training saw a dropped text. The draws come from an nnx RNG stream ("dropout" unless told), so
  they are reproducible from the Rngs seed; at eval (`model.eval()`) nothing is dropped.

`LabelQueryHead` (ML-Decoder / Query2Label style): one learned query per label cross-attends over the
  image patch tokens (B, P, Di) and the text tokens (B, T, Dt), both projected to a common width and
  tagged with a learned modality embedding; padded or absent text tokens are masked out of the keys.
  1-2 decoder layers without self-attention (ML-Decoder drops it: the queries need not talk to each
  other, and it costs O(num_labels^2)), post-LayerNorm residual blocks as in ML-Decoder, then a
  per-label linear readout (ML-Decoder's group fully-connected with one label per group).

All logits are float32; `dtype` is the compute dtype of the matmuls (float32 when None).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

FUSIONS = ("concat", "gated")
MISSING = ("learned", "zeros")


class ModalityDropout(nnx.Module):
  """Per-example modality dropout: (x (B, D), present (B,) bool) -> (x', kept (B,) bool).

  kept = present & not dropped (dropped with probability `rate`, in training only); x' is x where kept
  and the "missing" vector elsewhere. `keep` alone gives the kept mask (for token-level masking).
  """

  def __init__(self, dim: int, rate: float, *, missing: str = "learned",
               rng_collection: str = "dropout", deterministic: bool = False,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    if not 0.0 <= rate < 1.0:
      raise ValueError(f"modality dropout rate {rate} not in [0, 1)")
    if missing not in MISSING:
      raise ValueError(f"missing={missing!r}: expected one of {MISSING}")
    self.rate = rate
    self.deterministic = deterministic  # Set by model.train() / model.eval().
    self.rngs = rngs[rng_collection].fork()
    # Zero-initialised, so training starts from the "zeros" behaviour and learns away from it.
    self.missing = nnx.Param(jnp.zeros((dim,), param_dtype)) if missing == "learned" else None

  def keep(self, present: jax.Array) -> jax.Array:
    present = jnp.asarray(present, bool)
    if self.deterministic or self.rate == 0.0:
      return present
    dropped = jax.random.bernoulli(self.rngs(), self.rate, present.shape)
    return present & ~dropped

  def fill(self, x: jax.Array, kept: jax.Array) -> jax.Array:
    missing = (jnp.zeros(x.shape[-1:], x.dtype) if self.missing is None
               else self.missing[...].astype(x.dtype))
    return jnp.where(kept[:, None], x, missing[None, :])

  def __call__(self, x: jax.Array, present: jax.Array) -> tuple[jax.Array, jax.Array]:
    kept = self.keep(present)
    return self.fill(x, kept), kept


class LateFusion(nnx.Module):
  """(image (B, Di), text (B, Dt), has_text (B,) bool) -> logits (B, num_labels) float32.

  `has_text` None means every example has text. Image dropout only hits examples whose text
  survived, so no example loses both modalities.
  """

  def __init__(self, image_dim: int, text_dim: int, num_labels: int, *, fusion: str = "concat",
               hidden_dim: int | None = 512, text_dropout: float = 0.0,
               image_dropout: float = 0.0, missing: str = "learned", dropout_rate: float = 0.0,
               dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
    if fusion not in FUSIONS:
      raise ValueError(f"fusion={fusion!r}: expected one of {FUSIONS}")
    if fusion == "gated" and not hidden_dim:
      raise ValueError("gated fusion needs a hidden_dim (the width of the gated unit)")
    self.fusion = fusion
    self.dtype = dtype or jnp.float32
    common = dict(dtype=self.dtype, param_dtype=param_dtype, rngs=rngs)
    self.image_norm = nnx.LayerNorm(image_dim, dtype=jnp.float32, param_dtype=param_dtype,
                                    rngs=rngs)
    self.text_norm = nnx.LayerNorm(text_dim, dtype=jnp.float32, param_dtype=param_dtype,
                                   rngs=rngs)
    self.text_dropout = ModalityDropout(text_dim, text_dropout, missing=missing,
                                        param_dtype=param_dtype, rngs=rngs)
    self.image_dropout = ModalityDropout(image_dim, image_dropout, missing=missing,
                                         param_dtype=param_dtype, rngs=rngs)
    if fusion == "gated":
      self.image_proj = nnx.Linear(image_dim, hidden_dim, **common)
      self.text_proj = nnx.Linear(text_dim, hidden_dim, **common)
      self.gate = nnx.Linear(image_dim + text_dim, hidden_dim, **common)
      self.hidden = None
      width = hidden_dim
    else:
      self.hidden = nnx.Linear(image_dim + text_dim, hidden_dim, **common) if hidden_dim else None
      width = hidden_dim or image_dim + text_dim
    self.dropout = nnx.Dropout(dropout_rate, rngs=rngs)
    self.readout = nnx.Linear(width, num_labels, **common)

  def fuse(self, image: jax.Array, text: jax.Array, has_text: jax.Array | None = None,
           has_image: jax.Array | None = None) -> jax.Array:
    """The fused feature before the readout: (B, hidden_dim), or (B, Di + Dt) for plain concat.

    has_text / has_image: (B,) bool, None = present for every example. An absent modality gets
    the same fill as a dropped one.
    """
    ones = jnp.ones(image.shape[:1], bool)
    has_text = ones if has_text is None else jnp.asarray(has_text, bool)
    has_image = ones if has_image is None else jnp.asarray(has_image, bool)
    image = self.image_norm(image.astype(jnp.float32))
    text = self.text_norm(text.astype(jnp.float32))
    text_kept, image_kept = kept_modalities(self.text_dropout, self.image_dropout, has_text,
                                            has_image)
    text = self.text_dropout.fill(text, text_kept)
    image = self.image_dropout.fill(image, image_kept)
    image, text = image.astype(self.dtype), text.astype(self.dtype)
    joint = jnp.concatenate([image, text], axis=-1)
    if self.fusion == "gated":
      z = jax.nn.sigmoid(self.gate(joint))
      return z * jnp.tanh(self.image_proj(image)) + (1 - z) * jnp.tanh(self.text_proj(text))
    return jax.nn.relu(self.hidden(joint)) if self.hidden is not None else joint

  def __call__(self, image: jax.Array, text: jax.Array, has_text: jax.Array | None = None,
               has_image: jax.Array | None = None) -> jax.Array:
    fused = self.fuse(image, text, has_text, has_image)
    return self.readout(self.dropout(fused)).astype(jnp.float32)


def kept_modalities(text_dropout: ModalityDropout, image_dropout: ModalityDropout,
                    has_text: jax.Array, has_image: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(text kept, image kept) per example: present and not dropped, never dropping the only one.

  Image dropout only hits examples whose text survived, so no example loses both modalities; an
  example with neither keeps nothing (both get their "missing" fill).
  """
  text_kept = text_dropout.keep(has_text) | (has_text & ~has_image)
  image_kept = has_image & (image_dropout.keep(jnp.ones_like(has_image)) | ~text_kept)
  return text_kept, image_kept


class QueryDecoderLayer(nnx.Module):
  """Queries (B, L, W) cross-attend to keys (B, K, W) under a key mask, then a feed-forward block."""

  def __init__(self, width: int, heads: int, ffn_dim: int, *, dropout_rate: float, dtype,
               param_dtype, rngs: nnx.Rngs):
    self.attention = nnx.MultiHeadAttention(
        heads, width, dropout_rate=dropout_rate, deterministic=False, decode=False, dtype=dtype,
        param_dtype=param_dtype, rngs=rngs)
    self.attention_norm = nnx.LayerNorm(width, dtype=jnp.float32, param_dtype=param_dtype,
                                        rngs=rngs)
    self.ffn_in = nnx.Linear(width, ffn_dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.ffn_out = nnx.Linear(ffn_dim, width, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.ffn_norm = nnx.LayerNorm(width, dtype=jnp.float32, param_dtype=param_dtype, rngs=rngs)
    self.dropout = nnx.Dropout(dropout_rate, rngs=rngs)

  def __call__(self, queries: jax.Array, keys: jax.Array, key_mask: jax.Array) -> jax.Array:
    attended = self.attention(queries, keys, keys, mask=key_mask[:, None, None, :])
    x = self.attention_norm(queries + self.dropout(attended)).astype(queries.dtype)
    h = self.ffn_out(self.dropout(jax.nn.relu(self.ffn_in(x))))
    return self.ffn_norm(x + self.dropout(h)).astype(queries.dtype)


class LabelQueryHead(nnx.Module):
  """(image_tokens (B, P, Di), text_tokens (B, T, Dt), text_mask (B, T)) -> logits (B, L) float32.

  `text_mask` False marks padding; an all-False row is an example without text (its image tokens
  alone are attended). `text_dropout` masks out the whole text of an example with that probability in
  training, the token-level counterpart of LateFusion's modality dropout. `image_mask` (B, P) is for
  padded patch sequences; every example must keep at least one key.
  """

  def __init__(self, num_labels: int, image_dim: int, text_dim: int, *, width: int = 256,
               heads: int = 8, layers: int = 1, ffn_dim: int | None = None,
               dropout_rate: float = 0.1, text_dropout: float = 0.0, dtype=None,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    if layers not in (1, 2):
      raise ValueError(f"layers={layers}: the label-query head has 1 or 2 decoder layers")
    if width % heads:
      raise ValueError(f"width {width} is not a multiple of heads {heads}")
    self.dtype = dtype or jnp.float32
    init = nnx.initializers.normal(0.02)
    self.queries = nnx.Param(init(rngs.params(), (num_labels, width), param_dtype))
    self.image_proj = nnx.Linear(image_dim, width, dtype=self.dtype, param_dtype=param_dtype,
                                 rngs=rngs)
    self.text_proj = nnx.Linear(text_dim, width, dtype=self.dtype, param_dtype=param_dtype,
                                rngs=rngs)
    # Tells the shared attention which modality a key came from (there are no positions).
    self.modality = nnx.Param(init(rngs.params(), (2, width), param_dtype))
    self.text_dropout = ModalityDropout(text_dim, text_dropout, missing="zeros", rngs=rngs)
    self.layers = nnx.List([
        QueryDecoderLayer(width, heads, ffn_dim or 4 * width, dropout_rate=dropout_rate,
                          dtype=self.dtype, param_dtype=param_dtype, rngs=rngs)
        for _ in range(layers)])
    self.readout_kernel = nnx.Param(init(rngs.params(), (num_labels, width), param_dtype))
    self.readout_bias = nnx.Param(jnp.zeros((num_labels,), param_dtype))

  def __call__(self, image_tokens: jax.Array, text_tokens: jax.Array,
               text_mask: jax.Array | None = None,
               image_mask: jax.Array | None = None) -> jax.Array:
    batch, patches = image_tokens.shape[:2]
    if text_mask is None:
      text_mask = jnp.ones(text_tokens.shape[:2], bool)
    text_mask = jnp.asarray(text_mask, bool)
    kept = self.text_dropout.keep(jnp.any(text_mask, axis=-1))
    text_mask = text_mask & kept[:, None]
    if image_mask is None:
      image_mask = jnp.ones((batch, patches), bool)
    modality = self.modality[...].astype(self.dtype)
    keys = jnp.concatenate([self.image_proj(image_tokens.astype(self.dtype)) + modality[0],
                            self.text_proj(text_tokens.astype(self.dtype)) + modality[1]], axis=1)
    key_mask = jnp.concatenate([jnp.asarray(image_mask, bool), text_mask], axis=1)
    x = jnp.broadcast_to(self.queries[...].astype(self.dtype),
                         (batch,) + tuple(self.queries.shape))
    for layer in self.layers:
      x = layer(x, keys, key_mask)
    return (jnp.einsum("blw,lw->bl", x.astype(jnp.float32), self.readout_kernel[...])
            + self.readout_bias[...])
