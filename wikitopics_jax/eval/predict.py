"""`wikitopics predict`: a trained model's label probabilities and predicted labels for new images.

Input: a folder of image files (searched recursively; hidden files skipped), or a split of an ingested
dataset directory (whose taxonomy and image size must be the model's).

Text (a multimodal model, config.text.tower != "none"): with a folder, `text_table` is a CSV (or,
by a .tsv/.tab name, tab-separated) file with a header row and the columns
  file      the image's path relative to the folder, as in the output's `id`
  title     the page title (may be empty)
  caption   the caption / reference description (may be empty)
(other columns are ignored). An image's text is its title and caption joined as the training records'
text is (`records.TEXT_SEPARATOR`); an image without a row, or with both cells empty, has no text,
as does every image when no table is given. A row naming a file that is not in the folder, a file
named twice, or a missing column is an InputError naming it. A dataset split brings its records' text.

Folder images are decoded exactly as the dataset ingest decodes them (`image_decoding.decode_image`), the
same way for every file: EXIF orientation applied, any mode converted to RGB (transparent pixels on
white), and by default ("squash") the whole image resized to image_size x image_size without cropping
(aspect ratio not kept, as Keras's `target_size` did in the thesis) with Pillow's antialiasing bicubic
filter; "center_crop" cuts the centre square instead. By default the method is the one the training
data was ingested with (recorded in its manifest). An image already of the model's size is used as
is, so the dataset's own PNG/JPEG files give the dataset's pixels.

Output (process 0 writes it, atomically: a temporary file renamed into place): one row per image with
  id            path relative to the folder, or the record's id
  path | url    the file's absolute path, or the record's URL (None if it has none)
  prob_<label>  the probability of each label, one float32 column per label in taxonomy order
  predicted     the predicted label names: prob >= threshold (saved tuned thresholds by default; those
                tuned on hierarchical labels also add every predicted label's ancestors, as evaluate
                scores them)
  true_labels   (dataset splits only) the record's labels (closed if the model trained on closed ones)
as Parquet (pyarrow), or JSON lines with `jsonl=True` ({"id", "path"|"url", "probabilities": {label: p},
"predicted": [...]}). The Parquet schema metadata ("wikitopics", JSON) holds the checkpoint, the
thresholds with each label's rule (thresholds.json "rules"), whether predictions were closed, and the
unreadable files.

coherent=True makes predictions respect the taxonomy: probabilities pass through C-HMCNN's max
constraint (`hierarchy.make_coherent`: a parent scores at least as high as each child; these are the
probabilities written), then the thresholds apply, then every predicted label's ancestors are added
(per-class thresholds could otherwise drop a parent whose child passed).

A file that cannot be decoded (not an image, truncated, too large) is counted and reported by name
with its reason, in the result and the metadata; it never stops the run. A folder where no file
decodes is an InputError, and nothing is written.
Batches run sharded over all devices of the mesh, padded to a fixed size like evaluation batches.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import math
import os
from collections.abc import Sequence
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from wikitopics_jax.eval import evaluate_job
from wikitopics_jax.eval import evaluation
from wikitopics_jax import hierarchy
from wikitopics_jax.data import image_decoding
from wikitopics_jax.data import manifest as manifest_lib
from wikitopics_jax.data import records
from wikitopics_jax import sharding as sharding_lib
from wikitopics_jax.eval import thresholds as thresholds_lib
from wikitopics_jax import taxonomy as taxonomy_lib
from wikitopics_jax.errors import InputError

PROB_PREFIX = "prob_"
# Threads decoding image files: Pillow releases the GIL while decoding and resizing.
_DECODE_THREADS = 8


def load_image_file(path: str, settings: image_decoding.DecodeSettings) -> np.ndarray:
  """A file -> (size, size, 3) uint8 pixels, decoded as the dataset ingest decodes; raises on a bad file."""
  with open(path, "rb") as f:
    data = f.read()
  pixels = image_decoding.decode_image(data, settings)
  if isinstance(pixels, image_decoding.Rejection):
    raise ValueError(str(pixels))
  return pixels


def list_image_files(images_dir: str) -> list[str]:
  """Every non-hidden regular file below `images_dir`, relative paths, sorted (the same on every host)."""
  if not os.path.isdir(images_dir):
    raise InputError(f"{images_dir}: not a directory")
  found = []
  for root, dirs, files in os.walk(images_dir):
    dirs[:] = sorted(d for d in dirs if not d.startswith("."))
    for name in files:
      if not name.startswith(".") and os.path.isfile(os.path.join(root, name)):
        found.append(os.path.relpath(os.path.join(root, name), images_dir))
  if not found:
    raise InputError(f"{images_dir}: no files")
  return sorted(found)


@dataclasses.dataclass
class PredictionRun:
  """What `predict` wrote and what it could not read."""
  out_path: str
  num_images: int                     # rows written
  failed: list[tuple[str, str]]       # (file relative to the folder, reason), unreadable images
  checkpoint_step: int
  thresholds_source: str
  coherent: bool
  closed: bool = False                # every predicted label's ancestors added


def predict(workdir: str, *, out_path: str, images_dir: str | None = None,
            text_table: str | None = None, data_dir: str | None = None,
            split: str | None = None, checkpoint: str | int = "best", thresholds: str | None = "saved",
            coherent: bool = False, jsonl: bool = False, resize: str | None = None,
            batch_size: int | None = None,
            config_override: ml_collections.ConfigDict | None = None, ema: bool = False) -> PredictionRun:
  """Predicts every image of a folder (images_dir) or of a dataset split (data_dir and split).

  Args:
    workdir: the training workdir (its config, checkpoints, thresholds.json; its dataset's manifest
      gives the taxonomy and the image size).
    out_path: the Parquet (or JSONL) file to write.
    images_dir: a folder of image files (text_table: their text, see the module docstring); or
    data_dir, split: an ingested dataset directory and one of its splits.
    checkpoint: "best", "latest" or a step.
    thresholds: "saved" (the tuned thresholds of this checkpoint, else 0.5), a number, or a file.
    coherent: make the predictions respect the taxonomy (module docstring).
    jsonl: write JSON lines instead of Parquet.
    resize: how folder images are brought to the model's size, "squash" or "center_crop"
      (`image_decoding.RESIZE_METHODS`); None: the method the training data was ingested with (its
      manifest's info["settings"]["resize"]), else "squash".
    batch_size: global batch (default config.eval_batch_size; divisible by the number of devices).
    config_override: the config to use instead of the workdir's config.json.
    ema: predict with the checkpoint's EMA of the parameters (a run with config.ema.decay > 0).
  """
  # Bad requests fail before the model is built.
  if (images_dir is None) == (split is None):
    raise InputError("predict needs either images_dir, or data_dir and split")
  if split is not None and data_dir is None:
    raise InputError("predict: split given without data_dir")
  if resize is not None and resize not in image_decoding.RESIZE_METHODS:
    raise InputError(f"resize={resize!r} is not one of {image_decoding.RESIZE_METHODS}")
  if text_table is not None and images_dir is None:
    raise InputError("predict: text_table goes with images_dir (a split brings its own text)")
  files = list_image_files(images_dir) if images_dir is not None else None
  texts = read_text_table(text_table, files) if text_table is not None else None
  model = evaluate_job.RestoredModel(workdir, config_override=config_override, ema=ema)
  if texts is not None and model.text_tokenizer is None:
    raise InputError(f"predict: text_table={text_table} given, but the model in {workdir} takes no "
                     "text (config.text.tower='none')")
  step = model.resolve_step(checkpoint)
  state = model.restore(step)
  batch_size = batch_size or model.config.eval_batch_size
  truth, failed = None, []
  if images_dir is not None:
    ingested_with = model.manifest.info.get("settings") or {}
    settings = image_decoding.DecodeSettings(size=model.manifest.image_shape[0],
                                             resize=resize or ingested_with.get("resize", "squash"))
    probs, rows, failed = _predict_folder(model, state, images_dir, files, batch_size, settings,
                                          texts)
    if not rows:
      name, reason = failed[0]
      raise InputError(f"{images_dir}: none of its {len(files)} files could be decoded as an image "
                       f"(first: {name}: {reason}); nothing written")
    source = os.path.abspath(images_dir)
  else:
    probs, rows, truth = _predict_split(model, state, data_dir, split, batch_size)
    source = f"{os.path.abspath(data_dir)}:{split}"
  rule = evaluate_job.resolve_thresholds(model.workdir, thresholds, model.label_names, step)
  closed = coherent or rule.close
  probs, predicted = label_predictions(probs, rule.values, model.manifest.taxonomy, coherent=coherent,
                                       close=rule.close)
  run = PredictionRun(out_path=os.path.abspath(out_path), num_images=len(rows), failed=failed,
                      checkpoint_step=step, thresholds_source=rule.source, coherent=coherent,
                      closed=closed)
  if jax.process_index() != 0:
    return run
  label_names = model.label_names
  per_label = np.broadcast_to(np.asarray(rule.values, np.float64), (len(label_names),))
  metadata = {"workdir": model.workdir, "checkpoint_step": step, "source": source,
              "thresholds": rule.source,
              # +inf ("never predict") as None: the metadata stays strict JSON.
              "threshold_values": [float(t) if math.isfinite(t) else None for t in per_label],
              "threshold_rules": None if rule.rules is None else list(rule.rules),
              "coherent": coherent, "closed": closed, "labels": list(label_names),
              "image_size": model.manifest.image_shape[0],
              "weights": "ema" if ema else "raw",
              "failed_files": [{"file": name, "reason": reason} for name, reason in failed]}
  names = [[label_names[j] for j in np.flatnonzero(row)] for row in predicted]
  truth_names = None if truth is None else [[label_names[j] for j in np.flatnonzero(row)] for row in truth]
  writer = _write_jsonl if jsonl else _write_parquet
  writer(run.out_path, rows, probs, names, truth_names, label_names, metadata)
  print(f"{run.out_path}: {run.num_images} images, checkpoint step {step}, thresholds "
        f"{rule.describe()}{', coherent' if coherent else ''}", flush=True)
  if failed:
    print(f"{len(failed)} unreadable files skipped:\n" +
          "\n".join(f"  {name}: {reason}" for name, reason in failed), flush=True)
  return run


def label_predictions(probs: np.ndarray, thresholds, taxonomy, *, coherent: bool, close: bool = False
                      ) -> tuple[np.ndarray, np.ndarray]:
  """(probabilities to report, predicted (N, L) bool): thresholded, or coherent (module docstring).

  close: add every predicted label's ancestors (thresholds.json's close_predictions); coherent does too.
  """
  if coherent:
    probs = np.asarray(hierarchy.make_coherent(probs, taxonomy.ancestor_matrix), np.float32)
  # Per-class thresholds can drop a parent whose child passed.
  predicted = thresholds_lib.apply_thresholds(probs, thresholds,
                                              taxonomy.ancestor_matrix if coherent or close else None)
  return probs, predicted


TEXT_TABLE_COLUMNS = ("file", "title", "caption")


def read_text_table(path: str, files: Sequence[str]) -> list[str | None]:
  """The text of each of `files` (None: no text) from a CSV/TSV table (module docstring)."""
  import csv  # pylint: disable=g-import-not-at-top
  if not os.path.isfile(path):
    raise InputError(f"{path}: text table not found")
  delimiter = "\t" if os.path.splitext(path)[1].lower() in (".tsv", ".tab") else ","
  with open(path, newline="", encoding="utf-8") as f:
    reader = csv.DictReader(f, delimiter=delimiter)
    header = reader.fieldnames or []
    for column in TEXT_TABLE_COLUMNS:
      if column not in header:
        raise InputError(f"{path}: no column {column!r} (columns: {header}; needs "
                         f"{list(TEXT_TABLE_COLUMNS)})")
    position = {name: i for i, name in enumerate(files)}
    texts: list[str | None] = [None] * len(files)
    seen = set()
    for line, row in enumerate(reader, start=2):
      name = os.path.normpath(row["file"] or "")
      if name not in position:
        raise InputError(f"{path} line {line}: file {row['file']!r} is not in the images folder")
      if name in seen:
        raise InputError(f"{path} line {line}: file {row['file']!r} is named twice")
      seen.add(name)
      text = records.TEXT_SEPARATOR.join(p for p in (row["title"], row["caption"]) if p and p.strip())
      texts[position[name]] = text or None
  return texts


# ---------------------------------------------------------------------------------------------------
# Running the model


def _predict_folder(model: evaluate_job.RestoredModel, state, images_dir: str, files: list[str],
                    batch_size: int, settings: image_decoding.DecodeSettings,
                    texts: list[str | None] | None = None
                    ) -> tuple[np.ndarray, list[dict[str, Any]], list[tuple[str, str]]]:
  """Probabilities of every readable file, rows {"id", "path"}, and (file, reason) of unreadable ones.

  texts: per file, its text or None (a multimodal model; None for all when not given)."""
  images_dir = os.path.abspath(images_dir)
  height, width, channels = model.manifest.image_shape
  num_labels = len(model.label_names)
  per_process = sharding_lib.per_process_batch_size(batch_size, model.mesh, key="batch_size")
  share = sharding_lib.process_share()
  mine = list(range(share.index, len(files), share.count))
  # Every process runs the same number of batches (the jitted step is collective over all devices).
  num_batches = max(1, math.ceil(math.ceil(len(files) / share.count) / per_process))
  failed_here: dict[int, str] = {}
  chunks: dict[str, list[np.ndarray]] = {"probs": [], "index": [], "ok": []}

  def load(index: int) -> np.ndarray | None:
    try:
      return load_image_file(os.path.join(images_dir, files[index]), settings)
    except (OSError, ValueError) as e:
      failed_here[index] = str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"
      return None

  with concurrent.futures.ThreadPoolExecutor(_DECODE_THREADS) as pool:
    for b in range(num_batches):
      batch_indices = mine[b * per_process:(b + 1) * per_process]
      local = {"image": np.zeros((per_process, height, width, channels), np.uint8),
               # The eval step also computes a loss; with no labels it is meaningless and unused.
               "labels": np.zeros((per_process, num_labels), np.uint8),
               "index": np.full(per_process, -1, np.int64),  # -1: padding
               "ok": np.zeros(per_process, bool)}
      for row, (i, pixels) in enumerate(zip(batch_indices, pool.map(load, batch_indices))):
        local["index"][row] = i
        if pixels is not None:
          local["image"][row], local["ok"][row] = pixels, True
      inputs = ["image", "labels"]
      if model.text_tokenizer is not None:
        # Tokenised on the host, as the input pipeline does; padding rows have no text.
        ids, mask = model.text_tokenizer(
            [None if texts is None or i < 0 else texts[i] for i in local["index"].tolist()])
        local.update(text_ids=np.asarray(ids, np.int32), text_mask=np.asarray(mask, bool))
        local["has_text"] = local["text_mask"].any(axis=-1)
        local["has_image"] = np.ones(per_process, bool)
        inputs += ["text_ids", "text_mask", "has_text", "has_image"]
      batch = sharding_lib.global_batch(local, model.mesh)
      out = model.eval_step(state, {k: batch[k] for k in inputs})
      gathered = multihost_utils.process_allgather(
          {"probs": out["probs"], "index": batch["index"], "ok": batch["ok"]}, tiled=True)
      for key, value in gathered.items():
        chunks[key].append(np.asarray(value))
  probs, index, ok = (np.concatenate(chunks[k]) for k in ("probs", "index", "ok"))
  real = index >= 0
  good = real & ok
  order = np.argsort(index[good], kind="stable")
  good_index = index[good][order]
  failed_index = np.sort(index[real & ~ok])
  failed = [(files[i], failed_here.get(int(i), "unreadable (reason in another process's log)"))
            for i in failed_index]
  rows = [{"id": files[i], "path": os.path.join(images_dir, files[i])} for i in good_index]
  return probs[good][order].astype(np.float32), rows, failed


def _predict_split(model: evaluate_job.RestoredModel, state, data_dir: str, split: str, batch_size: int
                   ) -> tuple[np.ndarray, list[dict[str, Any]], np.ndarray]:
  """Probabilities of every example of a dataset split, rows {"id", "url"}, and its labels."""
  data_manifest = manifest_lib.read(data_dir)
  data_manifest.split(split, where=data_dir)
  where = f"{data_dir} (predicting with {model.workdir})"
  taxonomy_lib.check_saved({"taxonomy": model.manifest.taxonomy.to_json()}, data_manifest.taxonomy, where=where)
  if tuple(data_manifest.image_shape) != tuple(model.manifest.image_shape):
    raise InputError(f"{where}: images are {tuple(data_manifest.image_shape)}, the model takes "
                     f"{tuple(model.manifest.image_shape)}")
  hierarchical = model.config.data.hierarchical
  predictions = evaluation.predict_split(model.eval_step, state, data_dir=data_dir, split=split,
                                         batch_size=batch_size, hierarchical=hierarchical,
                                         mesh=model.mesh, text_tokenizer=model.text_tokenizer)
  rows = []
  if jax.process_index() == 0:
    source = grain.sources.ArrayRecordDataSource(
        manifest_lib.split_paths(data_dir, data_manifest.split(split)))
    for i in range(len(source)):
      example = records.decode_record(source[i], where=f"{data_dir}:{split}")
      rows.append({"id": example["id"], "url": example.get("url")})
  return predictions["probs"], rows, predictions["labels"]


# ---------------------------------------------------------------------------------------------------
# Writing


def _replace_atomically(out_path: str, write) -> None:
  """write(tmp_path), then rename onto out_path: readers never see a partial file."""
  os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
  tmp = out_path + ".tmp"
  try:
    write(tmp)
    os.replace(tmp, out_path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def _write_parquet(out_path: str, rows: list[dict[str, Any]], probs: np.ndarray,
                   predicted: list[list[str]], truth: list[list[str]] | None,
                   label_names: Sequence[str], metadata: dict[str, Any]) -> None:
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  columns: dict[str, Any] = {key: pa.array([row[key] for row in rows], pa.string()) for key in rows[0]} \
      if rows else {"id": pa.array([], pa.string())}
  for j, name in enumerate(label_names):
    columns[PROB_PREFIX + name] = pa.array(probs[:, j], pa.float32())
  columns["predicted"] = pa.array(predicted, pa.list_(pa.string()))
  if truth is not None:
    columns["true_labels"] = pa.array(truth, pa.list_(pa.string()))
  table = pa.table(columns).replace_schema_metadata({"wikitopics": json.dumps(metadata)})
  _replace_atomically(out_path, lambda tmp: pq.write_table(table, tmp))


def _write_jsonl(out_path: str, rows: list[dict[str, Any]], probs: np.ndarray,
                 predicted: list[list[str]], truth: list[list[str]] | None,
                 label_names: Sequence[str], metadata: dict[str, Any]) -> None:
  del metadata  # Printed by `predict`; JSON lines hold only rows.

  def write(tmp: str) -> None:
    with open(tmp, "w") as f:
      for i, row in enumerate(rows):
        line = {**row, "probabilities": {name: float(p) for name, p in zip(label_names, probs[i])},
                "predicted": predicted[i]}
        if truth is not None:
          line["true_labels"] = truth[i]
        f.write(json.dumps(line) + "\n")

  _replace_atomically(out_path, write)
