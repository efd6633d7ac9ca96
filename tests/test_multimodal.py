"""The multimodal classifier: config, model, train step on 8 devices, evaluation by modality, predict."""

import csv
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordWriter
from flax import nnx
from PIL import Image

from tests import test_training
from wikitopics_jax import configlib
from wikitopics_jax import models
from wikitopics_jax import sharding
from wikitopics_jax import steps
from wikitopics_jax import task as task_lib
from wikitopics_jax import taxonomy as taxonomy_lib
from wikitopics_jax import trainer
from wikitopics_jax.data import manifest as manifest_lib
from wikitopics_jax.data import pipeline
from wikitopics_jax.data import records
from wikitopics_jax.errors import InputError
from wikitopics_jax.eval import evaluate_job
from wikitopics_jax.eval import predict as predict_lib
from wikitopics_jax.eval import report
from wikitopics_jax.models import multimodal

BAG = {"tower": "bag", "fusion": "concat", "hidden_dim": 16,
       "bag": {"num_buckets": 512, "dim": 8, "max_ids": 16}}


def _write_text_dataset(data_dir, sizes, *, image_size=32, seed=0):
  """Like tests/datasets.py, plus text: each example's caption names its labels (2/3 of examples;
  the rest have none), so a text tower learns them in a few steps."""
  tax = taxonomy_lib.load("v1.3")
  rng = np.random.default_rng(seed)
  os.makedirs(data_dir, exist_ok=True)
  leaves = [tax.index[l] for l in tax.leaves]
  splits, next_id = {}, 0
  for split, n in sizes.items():
    flat = np.zeros((n, tax.num_labels), np.uint8)
    for i in range(n):
      flat[i, rng.choice(leaves, size=rng.integers(1, 3), replace=False)] = 1
    hier = tax.close(flat)
    name = f"{split}-00000-of-00001.array_record"
    writer = ArrayRecordWriter(os.path.join(data_dir, name), "group_size:1")
    for i in range(n):
      image = rng.integers(0, 255, (image_size, image_size, 3)).astype(np.uint8)
      text = {}
      if i % 3:
        words = " ".join(f"word{j}" for j in np.flatnonzero(flat[i]))
        text = {"page_title": f"page {next_id}", "caption": f"about {words}"}
      writer.write(records.encode_example(example_id=f"ex{next_id:05d}", image=image, labels=flat[i],
                                          labels_hier=hier[i], **text))
      next_id += 1
    writer.close()
    splits[split] = manifest_lib.SplitInfo(files=[name], num_examples=n,
                                           label_counts=flat.sum(0).tolist(),
                                           label_counts_hier=hier.sum(0).tolist())
  manifest_lib.write(data_dir, manifest_lib.Manifest(
      taxonomy=tax, image_shape=(image_size, image_size, 3), image_encoding="raw", splits=splits,
      info={"generator": "tests/test_multimodal.py", "seed": seed}))


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("mm") / "data")
  _write_text_dataset(d, {"train": 64, "val": 32, "test": 32})
  return d


# One block per stage: the image tower's depth does not matter to these tests, its compile time does.
DEPTH = 0.1


def _config(data_dir, **text):
  c = test_training.tiny_config(data_dir, num_epochs=1)
  c.model.depth_multiplier = DEPTH
  c.text.update_from_flattened_dict(_flatten(text))
  return c


def _flatten(d, prefix=""):
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def _tiny_image_cfg():
  cfg = models.default_model_config()
  cfg.update(name="efficientnet_tiny", head="gap", image_size=32, depth_multiplier=DEPTH)
  return cfg


def test_text_none_builds_todays_model():
  rngs = lambda: nnx.Rngs(params=0, dropout=1)
  plain = models.create_model(_tiny_image_cfg(), num_labels=5, rngs=rngs())
  none = models.create_model(_tiny_image_cfg(), num_labels=5, rngs=rngs(),
                             text_cfg=configlib.base_config().text)
  assert type(none) is type(plain)
  shapes = lambda m: {"/".join(map(str, p)): (type(v).__name__, tuple(v.shape))
                      for p, v in nnx.to_flat_state(nnx.state(m))}
  assert shapes(none) == shapes(plain)
  for a, b in zip(jax.tree.leaves(nnx.state(plain, nnx.Param)), jax.tree.leaves(nnx.state(none, nnx.Param))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert configlib.base_config().text.tower == "none"
  assert not multimodal.is_multimodal(ml_collections.ConfigDict({"model": {}}))  # saved before text


@pytest.mark.parametrize("text, message", [
    ({"tower": "bert"}, "config.text.tower='bert': must be one of ['none', 'bag', 'minilm']"),
    ({"tower": "bag", "fusion": "sum"}, "config.text.fusion='sum': must be one of"),
    ({"tower": "bag", "modality_dropout": {"text": 1.5}}, "config.text.modality_dropout.text=1.5"),
    ({"tower": "bag", "colour": 1}, "unknown config key text.colour"),
])
def test_config_errors_are_one_line(text, message):
  with pytest.raises(InputError) as info:
    multimodal.checked_text_config(text)
  assert message in str(info.value)
  assert "\n" not in str(info.value)


def test_configlib_check_validates_the_text_section():
  c = configlib.base_config()
  c.text.tower = "bag"
  c.text.bag.dim = 0
  with pytest.raises(InputError, match=r"^config.text.bag.dim=0: must be a positive int$"):
    configlib.check(c)


def _numpy_layer_norm(x, scale, bias, eps=1e-6):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * scale + bias


# One compiled forward pass per input shape: eager NNX dispatches (and compiles) every op on its own.
@nnx.jit
def _forward(model, images, ids, mask, has_image):
  return model(images, text_ids=ids, text_mask=mask, has_image=has_image)


def test_has_image_false_equals_a_dropped_image():
  text_cfg = multimodal.checked_text_config({**BAG, "modality_dropout": {"image": 0.5}})
  model = models.create_model(_tiny_image_cfg(), num_labels=5, rngs=nnx.Rngs(params=0, dropout=1),
                              text_cfg=text_cfg)
  head = model.head
  # A non-zero "missing" image vector, so that replacing the image is visible in the logits.
  head.image_dropout.missing[...] = jnp.linspace(-1.0, 1.0, head.image_dropout.missing.shape[0])
  model.eval()
  ids, mask = multimodal.text_tokenizer(ml_collections.ConfigDict({"text": BAG}))(
      ["word1 about", None, "page 3", "word7"])
  images = jax.random.normal(jax.random.key(0), (4, 32, 32, 3))
  no_image = np.zeros(4, bool)
  logits = np.asarray(_forward(model, images, ids, mask, no_image))
  other = np.asarray(_forward(model, images * 3 + 1, ids, mask, no_image))
  np.testing.assert_array_equal(logits, other)  # the pixels no longer matter
  # NumPy reference: LateFusion of the missing image vector and the (LayerNorm-ed) text feature.
  table = np.asarray(model.text.embed.embedding[...])
  m = mask.astype(np.float32)
  text = (m[..., None] * table[ids]).sum(1) / np.maximum(m.sum(1, keepdims=True), 1)
  text = _numpy_layer_norm(text, np.asarray(head.text_norm.scale[...]), np.asarray(head.text_norm.bias[...]))
  # Row 1 has no text: the text's missing vector (zeros at init) replaces it.
  text[~mask.any(1)] = np.asarray(head.text_dropout.missing[...])
  missing_image = np.asarray(head.image_dropout.missing[...])
  image = np.broadcast_to(missing_image, (4, missing_image.shape[0]))
  joint = np.concatenate([image, text], axis=1)
  hidden = np.maximum(joint @ np.asarray(head.hidden.kernel[...]) + np.asarray(head.hidden.bias[...]), 0)
  expected = hidden @ np.asarray(head.readout.kernel[...]) + np.asarray(head.readout.bias[...])
  np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)
  with_image = np.asarray(_forward(model, images, ids, mask, np.ones(4, bool)))
  assert np.abs(with_image - logits).max() > 1e-4


def test_label_query_without_image_ignores_the_pixels():
  text_cfg = multimodal.checked_text_config({**BAG, "fusion": "label_query",
                                             "label_query": {"width": 16, "heads": 2}})
  model = models.create_model(_tiny_image_cfg(), num_labels=5, rngs=nnx.Rngs(params=0, dropout=1),
                              text_cfg=text_cfg)
  model.eval()
  ids, mask = multimodal.text_tokenizer(ml_collections.ConfigDict({"text": BAG}))(["word1", "page 2"])
  images = jax.random.normal(jax.random.key(0), (2, 64, 64, 3))
  off = np.zeros(2, bool)
  a = np.asarray(_forward(model, images, ids, mask, off))
  b = np.asarray(_forward(model, -images, ids, mask, off))
  np.testing.assert_array_equal(a, b)
  c = np.asarray(_forward(model, -images, ids, mask, np.ones(2, bool)))
  assert np.abs(a - c).max() > 1e-5


def test_multimodal_train_step_on_8_devices_reduces_the_loss(data_dir):
  config = _config(data_dir, **BAG, modality_dropout={"text": 0.2, "image": 0.2})
  config.grad_accum_steps = 2  # the micro-batches carry the text inputs too
  manifest = manifest_lib.read(data_dir)
  task = task_lib.build(config, manifest, total_steps=10)
  mesh = sharding.make_mesh()
  assert mesh.devices.size == 8
  placement = sharding.Placement(mesh, task.state)
  step = steps.make_train_step(task, state_sharding=placement.state, batch_sharding=placement.batch,
                               replicated_sharding=placement.replicated, grad_accum_steps=2)
  local = next(iter(pipeline.train_dataset(data_dir, "train", batch_size=32, seed=0, hierarchical=True,
                                           text_tokenizer=multimodal.text_tokenizer(config))))
  assert local["text_ids"].shape == (32, 16) and local["has_text"].dtype == bool
  assert 0 < local["has_text"].sum() < 32
  batch = sharding.global_batch(local, mesh)
  state = sharding.put_replicated(task.state, placement.replicated)
  losses = []
  for _ in range(6):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  assert all(np.isfinite(losses))
  assert losses[-1] < losses[0]


@pytest.fixture(scope="session")
def workdir(tmp_path_factory, data_dir):
  w = str(tmp_path_factory.mktemp("mm_run") / "run")
  config = _config(data_dir, **BAG)
  config.thresholds.tune = False
  trainer.train_and_evaluate(config, w)
  return w


def test_evaluate_and_report_show_each_modality(workdir, tmp_path):
  result = evaluate_job.evaluate(workdir, checkpoint="best", split="test")
  modalities = result["modalities"]
  assert list(modalities) == ["fused", "image_only", "text_only", "fused_half_text"]
  assert modalities["fused"]["macro_ap"] == pytest.approx(result["macro_ap"], abs=1e-9)
  # Different inputs, different predictions.
  assert modalities["image_only"]["macro_ap"] != modalities["text_only"]["macro_ap"]
  per_label = modalities["text_only"]["per_label_ap"]
  assert set(per_label) == {row["name"] for row in result["per_label"]}
  md = open(evaluate_job.eval_path(workdir, "test", result["checkpoint_step"], "_t0.5.md")).read()
  assert "## Modalities" in md and "AP image_only" in md
  page = open(report.build_report(workdir, out_dir=str(tmp_path / "report"), images_per_label=2,
                                  num_missing=2)).read()
  section = page[page.index("<h3>Modalities</h3>"):]
  assert "<th>AP text_only</th>" in section
  assert f"<td>{modalities['text_only']['macro_ap']:.3f}</td>" in section


def test_predict_with_a_text_table(workdir, tmp_path):
  images_dir = tmp_path / "images"
  images_dir.mkdir()
  rng = np.random.default_rng(1)
  for name in ("a.png", "b.png", "c.png"):
    Image.fromarray(rng.integers(0, 255, (32, 32, 3)).astype(np.uint8)).save(images_dir / name)
  table = tmp_path / "text.csv"
  with open(table, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["file", "title", "caption", "extra"])
    w.writerow(["a.png", "page", "about word3 word9", "x"])
    w.writerow(["b.png", "", "", ""])
  with_text = predict_lib.predict(workdir, out_path=str(tmp_path / "t.jsonl"), images_dir=str(images_dir),
                                  text_table=str(table), jsonl=True)
  without = predict_lib.predict(workdir, out_path=str(tmp_path / "n.jsonl"), images_dir=str(images_dir),
                                jsonl=True)
  assert with_text.num_images == without.num_images == 3
  rows = lambda p: {r["id"]: r["probabilities"] for r in map(json.loads, open(p))}
  t, n = rows(with_text.out_path), rows(without.out_path)
  # Only a.png has text; b.png's empty cells and c.png's missing row are "no text".
  assert max(abs(t["a.png"][k] - n["a.png"][k]) for k in t["a.png"]) > 1e-6
  for name in ("b.png", "c.png"):
    assert t[name] == pytest.approx(n[name], abs=1e-6)
  bad = tmp_path / "bad.tsv"
  bad.write_text("file\ttitle\na.png\tx\n")
  with pytest.raises(InputError, match=r"no column 'caption'") as info:
    predict_lib.predict(workdir, out_path=str(tmp_path / "x.jsonl"), images_dir=str(images_dir),
                        text_table=str(bad), jsonl=True)
  assert "\n" not in str(info.value)
  bad.write_text("file\ttitle\tcaption\nzz.png\tx\ty\n")
  with pytest.raises(InputError, match=r"file 'zz.png' is not in the images folder"):
    predict_lib.predict(workdir, out_path=str(tmp_path / "x.jsonl"), images_dir=str(images_dir),
                        text_table=str(bad), jsonl=True)


def test_pipeline_tokenises_each_records_text(data_dir):
  tokenizer = multimodal.text_tokenizer(ml_collections.ConfigDict({"text": BAG}))
  ds, _ = pipeline.eval_dataset(data_dir, "val", batch_size=40, hierarchical=True,
                                text_tokenizer=tokenizer)
  batch = next(iter(ds))
  assert "text" not in batch
  # Reference: the records read back one by one, their fields joined by hand.
  texts = []
  for r in test_training.datasets.read_split(data_dir, "val"):
    parts = [r.get("page_title", ""), r.get("caption", "")]
    texts.append("\n".join(p for p in parts if p) or None)
  texts += [None] * (40 - len(texts))  # eval padding
  ids, mask = tokenizer(texts)
  np.testing.assert_array_equal(batch["text_ids"], ids)
  np.testing.assert_array_equal(batch["text_mask"], mask)
  np.testing.assert_array_equal(batch["has_text"], [t is not None for t in texts])
  plain, _ = pipeline.eval_dataset(data_dir, "val", batch_size=40, hierarchical=True)
  assert set(next(iter(plain))) == {"image", "index", "labels", "mask"}
