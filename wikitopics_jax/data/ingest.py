r"""WIT TSV files + a labels table + images -> a dataset directory of ArrayRecord shards (`manifest`).

Inputs:
  labels        one or more labels tables (`labels_table`: ``id, title, url, labels``; JSON, JSON
                Lines, CSV or Parquet) with label names of one taxonomy version. They define which
                images exist; an unknown label name is an InputError naming file, row and label.
  wit_tsv       optional WIT TSV shards (`wit`, plain or .gz, 17 or 18 columns): they give each image
                its texts (below) and its mime type (from the first row, in file order, that shows
                it). Malformed rows are counted and reported, never fatal.
  image_dirs    directories in the Commons hash layout ``<h>/<hh>/<File>`` (decoded file name): a
                copy of the originals, or thumbnails fetched by `thumbnails.fetch` (same layout).
                Searched in order.
  kaggle_pixels optional pixel files of the Kaggle variant (base64 image bytes per image URL).
                The bytes of labelled images are staged under the work directory first (first file
                wins for an image found in several), then read like an image directory.

What is kept, as in the thesis: images whose file extension is in `extensions` and (if a WIT row
gives one) whose mime type is in `mime_types`, that have at least one label (unless
`keep_unlabelled`), whose bytes are found and decode (`image_decoding`). Every dropped image is
counted under one reason in the manifest's ``info["counts"]["filtered"]`` and in the log.

Duplicates: the same image (same Commons file, whatever the URL spelling) on many pages or in many
table rows is one example: labels are unioned, id/url from the first table row.

Texts (`records`): every WIT row showing an image adds one context (page title, section title,
reference description), in file then row order, exact repeats skipped, at most
`IngestSettings.max_text_contexts` (later ones are counted as dropped). The attribution description
(Commons) and alt text are per image: the first non-empty value of each, in the same order.
``page_title``/``caption`` keep their old meaning (first row's title and preferred caption). Each
field is cut to MAX_TEXT_CHARS. The manifest's ``info["text_fields"]`` counts the written examples
having each field.

Splits: by hashing the image's stable id, its Commons path ``<h>/<hh>/<File>`` (SHA-256 -> a number
in [0, 1) -> the split whose cumulative fraction range holds it). An image keeps its split when the
dataset grows or other images are filtered; a changed fraction moves only the images in between.
Within a split, an image's shard is another hash of the same id; records in a shard are in id order.

Work units, resumability, determinism: one unit per output shard (plus one per WIT file and per
Kaggle pixel file for the preparatory passes, cached under ``<out_dir>/.ingest/``). A unit writes a
temporary file and renames it into place, then writes its summary (the mark of a finished unit), so
a crash leaves finished units and temporary files only; a rerun with the same inputs and settings
cleans the temporaries and does only the unfinished units ("same inputs": same paths and sizes, and
the same SHA-256 for labels tables or modification time for WIT and pixel files). The output depends only on the inputs
and settings (not on `num_workers`, not on interruptions): a killed and resumed run writes shards
byte-identical to an uninterrupted one. The manifest is written last; a finished dataset is
returned as is by a rerun with the same inputs and settings. Units run in worker processes started
with 'forkserver' (or 'spawn'), never 'fork': the caller may have imported JAX.

Image encoding in the records: "raw" (HWC uint8 pixels) by default. Measured for 64x64 RGB crops of
photographs (scikit-learn's two sample photos, 400 random crops resized by `image_decoding`),
bytes per record and mean decode time per record (`records.decode_record`, one core of the 2-core
development machine, under load from other jobs, so the times are +-50%):
  raw          12,417 B   7-16 us   exact
  png           7,825 B   420-590 us   exact
  jpeg (q=95)   3,000 B   240-370 us   lossy: PSNR 35 dB, mean absolute error 3.1 levels
PNG saves little on photos and decodes 40x slower than raw. JPEG is 4x smaller but lossy (mostly
its 4:2:0 chroma subsampling at this size) and costs ~0.3 ms of CPU per image per epoch, i.e. a few
host cores to feed one accelerator at 10k images/s. Raw needs no decoding at all and keeps the
pixels exact; 3.1M images at 64x64 are 38 GB, which fits any training machine's disk, so "raw" is
the default. Choose "jpeg" (quality 95) when disk or I/O is the bottleneck (e.g. 128 px or more).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import io
import json
import math
import multiprocessing
import os
import shutil
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import msgpack
import numpy as np
import PIL
from array_record.python.array_record_module import ArrayRecordWriter
from PIL import Image

from wikitopics_jax.data import image_decoding
from wikitopics_jax.data import labels_table
from wikitopics_jax.data import manifest as manifest_lib
from wikitopics_jax import progress as progress_lib
from wikitopics_jax.data import records
from wikitopics_jax import taxonomy as taxonomy_lib
from wikitopics_jax.data import wit
from wikitopics_jax import files
from wikitopics_jax.errors import InputError

# Bump when the same inputs and settings would give other bytes: it is part of the resume check.
INGEST_VERSION = 2  # 2: text contexts, attribution description and alt text.
WORK_DIR = ".ingest"
# The thesis's later split: 700k train, 75k val, 75k threshold, 150k test.
DEFAULT_SPLITS = (("train", 0.7), ("val", 0.075), ("threshold", 0.075), ("test", 0.15))
DEFAULT_EXTENSIONS = ("jpg", "jpeg")  # The thesis kept only JPEG files.
DEFAULT_MIME_TYPES = ("image/jpeg",)
IMAGE_ENCODINGS = ("raw", "png", "jpeg")
JPEG_QUALITY = 95
# Text fields are metadata here: long Commons descriptions are cut to keep records small.
MAX_TEXT_CHARS = 2000
# Kept in the manifest per kind of message (all are counted).
MAX_EXAMPLE_MESSAGES = 50


@dataclasses.dataclass(frozen=True)
class IngestSettings:
  """Everything besides the inputs that determines the output bytes (recorded in the manifest).

  taxonomy: shipped version name or taxonomy JSON path; the labels tables use its names.
  image_size, resize, max_pixels, min_side: see `image_decoding.DecodeSettings`.
  image_encoding: "raw", "png" or "jpeg" (quality 95); see the module docstring.
  splits: (name, fraction) pairs summing to 1.
  extensions: file extensions kept (lower case, no dot); empty = all.
  mime_types: WIT mime types kept (when a WIT row gives one); empty = all.
  languages: WIT rows of these wiki languages give the texts; empty = all languages.
  keep_unlabelled: keep images without any label (all-zero label vectors; e.g. human annotations
    saying "none of these topics"), instead of dropping them as the thesis did.
  examples_per_shard: target records per shard file (before images are rejected).
  max_text_contexts: (page title, section title, caption) contexts kept per image, from the first
    WIT rows showing it. 8 keeps all of almost every image (most appear on one or two pages) while
    a few icons shown on thousands of pages cannot bloat their records.
  """
  taxonomy: str = "v1.3"
  image_size: int = 64
  resize: str = "squash"
  image_encoding: str = "raw"
  splits: tuple[tuple[str, float], ...] = DEFAULT_SPLITS
  extensions: tuple[str, ...] = DEFAULT_EXTENSIONS
  mime_types: tuple[str, ...] = DEFAULT_MIME_TYPES
  languages: tuple[str, ...] = ()
  keep_unlabelled: bool = False
  examples_per_shard: int = 10_000
  max_pixels: int = image_decoding.DecodeSettings.max_pixels
  min_side: int = 1
  max_text_contexts: int = 8

  def decode_settings(self) -> image_decoding.DecodeSettings:
    return image_decoding.DecodeSettings(size=self.image_size, resize=self.resize,
                                         max_pixels=self.max_pixels, min_side=self.min_side)

  def to_json(self) -> dict[str, Any]:
    data = dataclasses.asdict(self)
    data["splits"] = [[name, fraction] for name, fraction in self.splits]
    return data


def parse_splits(text: str) -> tuple[tuple[str, float], ...]:
  """"train:0.7,val:0.1,test:0.2" -> (("train", 0.7), ...) (for command lines)."""
  pairs = []
  for item in text.split(","):
    name, sep, fraction = item.strip().partition(":")
    try:
      pairs.append((name.strip(), float(fraction)))
    except ValueError:
      raise InputError(f"splits {text!r}: expected name:fraction pairs separated by commas") from None
    if not sep:
      raise InputError(f"splits {text!r}: {item!r} has no ':fraction'")
  return tuple(pairs)


def _check_settings(s: IngestSettings) -> None:
  where = "ingest"
  s.decode_settings()  # Checks size, resize, max_pixels, min_side.
  if s.image_encoding not in IMAGE_ENCODINGS:
    raise InputError(f"{where}: image_encoding {s.image_encoding!r} is not one of {IMAGE_ENCODINGS}")
  manifest_lib.check_split_names([name for name, _ in s.splits], where)
  fractions = [f for _, f in s.splits]
  if any(not f > 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
    raise InputError(f"{where}: split fractions must be positive and sum to 1, got {list(s.splits)}")
  if not isinstance(s.examples_per_shard, int) or s.examples_per_shard < 1:
    raise InputError(f"{where}: examples_per_shard must be a positive integer, got "
                     f"{s.examples_per_shard!r}")
  if not isinstance(s.max_text_contexts, int) or s.max_text_contexts < 0:
    raise InputError(f"{where}: max_text_contexts must be a non-negative integer, got "
                     f"{s.max_text_contexts!r}")


def _hash_unit_interval(salt: str, key: str) -> float:
  digest = hashlib.sha256(f"{salt}:{key}".encode("utf-8")).digest()
  return int.from_bytes(digest[:8], "big") / 2.0**64


def split_of(key: str, splits: Sequence[tuple[str, float]]) -> str:
  """The split of the image with stable id `key` (its Commons path); see the module docstring."""
  u = _hash_unit_interval("split", key)
  total = sum(f for _, f in splits)
  upper = 0.0
  for name, fraction in splits:
    upper += fraction / total
    if u < upper:
      return name
  return splits[-1][0]


def shard_of(key: str, num_shards: int) -> int:
  return int(_hash_unit_interval("shard", key) * num_shards)


def shard_file_name(split: str, index: int, num_shards: int) -> str:
  return f"{split}-{index:05d}-of-{num_shards:05d}.array_record"


# ----------------------------------------------------------------------------------------- helpers


def _log(message: str) -> None:
  print(f"ingest: {message}", file=sys.stderr, flush=True)


def _write_json_atomic(path: str, data: Any) -> None:
  with files.atomic_open(path) as f:
    json.dump(data, f, indent=1, ensure_ascii=False, sort_keys=True)


def _read_json(path: str) -> Any:
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _input_identity(paths: Sequence[str], *, by_content: bool) -> list[dict[str, Any]]:
  """What makes a rerun "the same inputs": path, size and either the SHA-256 (labels tables: cheap,
  and regenerated tables keep their identity) or the modification time (multi-GB WIT files)."""
  identity = []
  for path in paths:
    if not os.path.isfile(path):
      raise InputError(f"ingest: input file {path!r} not found")
    stat = os.stat(path)
    entry = {"path": os.path.abspath(path), "bytes": stat.st_size}
    if by_content:
      entry["sha256"] = files.sha256(path)
    else:
      entry["mtime_ns"] = stat.st_mtime_ns
    identity.append(entry)
  return identity


def _run_units(function: Callable[[Any], dict], tasks: Sequence[Any], num_workers: int,
               progress: progress_lib.Progress, items_of: Callable[[dict], int]) -> Iterator[dict]:
  """Runs `function` over `tasks` (in this process if num_workers == 1), yielding results as they
  finish (any order)."""
  if num_workers == 1 or len(tasks) <= 1:
    for task in tasks:
      result = function(task)
      progress.advance(items_of(result))
      yield result
    return
  methods = multiprocessing.get_all_start_methods()
  context = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
  with context.Pool(min(num_workers, len(tasks))) as pool:
    for result in pool.imap_unordered(function, tasks):
      progress.advance(items_of(result))
      yield result


def _available_cpus() -> int:
  if hasattr(os, "sched_getaffinity"):
    return len(os.sched_getaffinity(0))
  return os.cpu_count() or 1


def _remove_temporaries(directory: str) -> None:
  """Deletes what a killed run left half-written: files named ``*.tmp-<pid>``."""
  for root, _, files in os.walk(directory):
    for name in files:
      if ".tmp-" in name:
        os.remove(os.path.join(root, name))


# ---------------------------------------------------------------------------------- WIT text pass


def _new_texts(row: wit.WitRow) -> dict[str, Any]:
  """The texts of an image first seen in `row` (contexts are added by `_add_texts`)."""
  return {"page_title": row.page_title[:MAX_TEXT_CHARS], "caption": row.caption[:MAX_TEXT_CHARS],
          "mime_type": row.mime_type, "where": row.where, "contexts": [],
          "contexts_dropped": 0, "attribution_description": "", "alt_text": ""}


def _add_texts(texts: dict[str, Any], contexts: Sequence[Sequence[str]], contexts_dropped: int,
               attribution: str, alt_text: str, max_contexts: int) -> None:
  """Appends new contexts up to the cap (repeats skipped, the others counted as dropped); keeps the
  first non-empty attribution description and alt text."""
  for context in contexts:
    context = list(context)
    if not any(context) or context in texts["contexts"]:
      continue
    if len(texts["contexts"]) < max_contexts:
      texts["contexts"].append(context)
    else:
      texts["contexts_dropped"] += 1
  texts["contexts_dropped"] += contexts_dropped
  texts["attribution_description"] = texts["attribution_description"] or attribution
  texts["alt_text"] = texts["alt_text"] or alt_text


def _wit_text_unit(task: dict) -> dict:
  """One WIT file -> a cache of {image path: texts (`_new_texts`)} and its read statistics."""
  if os.path.exists(task["summary"]):
    return _read_json(task["summary"])
  stats = wit.ReadStats()
  first: dict[str, dict[str, Any]] = {}
  bad_urls = 0
  bad_url_messages: list[str] = []
  languages = set(task["languages"])
  for row in wit.iter_rows(task["path"], stats):
    if languages and row.get("language") not in languages:
      continue
    try:
      key = wit.parse_image_url(row.image_url).relative_path
    except InputError as e:
      bad_urls += 1
      if len(bad_url_messages) < MAX_EXAMPLE_MESSAGES:
        bad_url_messages.append(f"{row.where}: {e}")
      continue
    if key not in first:
      first[key] = _new_texts(row)
    context = [row.page_title[:MAX_TEXT_CHARS], row.section_title[:MAX_TEXT_CHARS],
               row.reference_description[:MAX_TEXT_CHARS]]
    _add_texts(first[key], [context], 0, row.attribution_description[:MAX_TEXT_CHARS],
               row.alt_text[:MAX_TEXT_CHARS], task["max_contexts"])
  tmp = f"{task['cache']}.tmp-{os.getpid()}"
  with open(tmp, "wb") as f:
    msgpack.pack(first, f, use_bin_type=True)
  os.replace(tmp, task["cache"])
  summary = {"path": task["path"], "sha256": files.sha256(task["path"]), "stats": stats.to_json(),
             "images": len(first), "bad_image_urls": bad_urls, "bad_url_messages": bad_url_messages}
  _write_json_atomic(task["summary"], summary)
  return summary


# ----------------------------------------------------------------------------- Kaggle pixel pass


def _kaggle_stage_unit(task: dict) -> dict:
  """One Kaggle pixel file -> the bytes of its labelled images as files under task["dir"]."""
  if os.path.exists(task["summary"]):
    return _read_json(task["summary"])
  with open(task["wanted_keys"], encoding="utf-8") as f:
    wanted = set(f.read().split("\n"))
  stats = wit.ReadStats()
  staged: list[str] = []
  staged_set: set[str] = set()
  bad_urls = 0
  for _, url, image in wit.iter_kaggle_pixels(task["path"], stats):
    try:
      key = wit.parse_image_url(url).relative_path
    except InputError:
      bad_urls += 1
      continue
    if key not in wanted or key in staged_set:
      continue
    path = os.path.join(task["dir"], key)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
      f.write(image)
    os.replace(tmp, path)
    staged.append(key)
    staged_set.add(key)
  summary = {"path": task["path"], "sha256": files.sha256(task["path"]), "stats": stats.to_json(),
             "staged": staged, "bad_image_urls": bad_urls}
  _write_json_atomic(task["summary"], summary)
  return summary


# ------------------------------------------------------------------------------------ shard pass


def _encode_image(pixels: np.ndarray, encoding: str) -> np.ndarray | bytes:
  if encoding == "raw":
    return pixels
  buf = io.BytesIO()
  if encoding == "jpeg":
    Image.fromarray(pixels).save(buf, format="JPEG", quality=JPEG_QUALITY)
  else:
    Image.fromarray(pixels).save(buf, format="PNG")
  return buf.getvalue()


def _read_image(candidate: dict, image_dirs: Sequence[str]) -> tuple[bytes | None, str, str]:
  """(bytes or None, reason, detail): looks in the staged path, then the image directories."""
  paths = [candidate["staged"]] if candidate["staged"] else []
  paths += [os.path.join(d, candidate["key"]) for d in image_dirs]
  for path in paths:
    try:
      with open(path, "rb") as f:
        return f.read(), "", ""
    except FileNotFoundError:
      continue
    except OSError as e:
      return None, "image_unreadable", f"{path}: {type(e).__name__}: {e}"
  return None, "image_missing", f"not in {list(image_dirs)}" if image_dirs else "no image source"


def _shard_unit(task: dict) -> dict:
  """Writes one output shard (temp file, then rename) and its summary; skips a finished one."""
  if os.path.exists(task["summary"]):
    return _read_json(task["summary"])
  tax = taxonomy_lib.Taxonomy.from_json(task["taxonomy"])
  decode_settings = image_decoding.DecodeSettings(**task["decode_settings"])
  encoding = task["image_encoding"]
  final = os.path.join(task["out_dir"], task["file"])
  tmp = f"{final}.tmp-{os.getpid()}"
  writer = ArrayRecordWriter(tmp, "group_size:1")
  filtered: collections.Counter = collections.Counter()
  examples: dict[str, list[str]] = collections.defaultdict(list)
  flat_counts = np.zeros(tax.num_labels, np.int64)
  hier_counts = np.zeros(tax.num_labels, np.int64)
  text_counts: collections.Counter = collections.Counter()
  written = 0
  try:
    for candidate in task["candidates"]:
      data, reason, detail = _read_image(candidate, task["image_dirs"])
      if data is not None:
        decoded = image_decoding.decode_image(data, decode_settings)
        if isinstance(decoded, image_decoding.Rejection):
          reason, detail = f"undecodable_{decoded.reason}", decoded.detail
      if reason:
        filtered[reason] += 1
        if len(examples[reason]) < MAX_EXAMPLE_MESSAGES:
          examples[reason].append(f"{candidate['where']}: {candidate['key']}: {detail}")
        continue
      flat = np.zeros(tax.num_labels, np.uint8)
      flat[candidate["labels"]] = 1
      hier = tax.close(flat)
      texts = candidate["texts"]
      optional = {k: texts[k] for k in ("attribution_description", "alt_text") if texts[k]}
      writer.write(records.encode_example(
          example_id=candidate["id"], image=_encode_image(decoded, encoding),
          labels=flat, labels_hier=hier, image_encoding=encoding,
          url=candidate["url"], page_title=candidate["page_title"], caption=candidate["caption"],
          contexts=texts["contexts"], **optional))
      _count_texts(text_counts, texts)
      flat_counts += flat
      hier_counts += hier
      written += 1
  finally:
    writer.close()
  if written:
    os.replace(tmp, final)
  else:
    os.remove(tmp)  # No file for an empty shard (Grain cannot open an empty list of files).
  summary = {"file": task["file"] if written else None, "num_examples": written,
             "candidates": len(task["candidates"]), "label_counts": flat_counts.tolist(),
             "label_counts_hier": hier_counts.tolist(), "filtered": dict(sorted(filtered.items())),
             "text_counts": dict(sorted(text_counts.items())),
             "examples": dict(sorted(examples.items()))}
  _write_json_atomic(task["summary"], summary)
  return summary


def _count_texts(counts: collections.Counter, texts: Mapping[str, Any]) -> None:
  """Adds one example's texts to the per-field counts of the manifest's ``text_fields``."""
  contexts = texts["contexts"]
  for i, field in enumerate(records.CONTEXT_FIELDS):
    counts[field] += any(c[i] for c in contexts)
  for field in ("attribution_description", "alt_text"):
    counts[field] += bool(texts[field])
  counts["any"] += bool(contexts or texts["attribution_description"] or texts["alt_text"])
  counts["contexts"] += len(contexts)
  counts["contexts_dropped"] += texts["contexts_dropped"]
  counts["images_with_dropped_contexts"] += texts["contexts_dropped"] > 0


# ---------------------------------------------------------------------------------------- driver


@dataclasses.dataclass
class _Image:
  key: str
  image_id: str
  url: str
  where: str
  labels: set[str]
  page_title: str = ""
  caption: str = ""
  mime_type: str = ""
  in_wit: bool = False
  staged: str = ""
  # contexts, contexts_dropped, attribution_description, alt_text: see `_add_texts`.
  texts: dict[str, Any] = dataclasses.field(default_factory=lambda: {
      "contexts": [], "contexts_dropped": 0, "attribution_description": "", "alt_text": ""})


def run_ingest(out_dir: str, *, labels: Sequence[str], wit_tsv: Sequence[str] = (),
               image_dirs: Sequence[str] = (), kaggle_pixels: Sequence[str] = (),
               settings: IngestSettings = IngestSettings(), num_workers: int | None = None,
               progress: bool = True, extra_info: Mapping[str, Any] | None = None,
               keep_work_files: bool = False) -> manifest_lib.Manifest:
  """Builds (or resumes, or returns the finished) dataset in `out_dir`; see the module docstring.

  Args:
    out_dir: dataset directory; created if missing. Must be empty or hold an ingest of the same
      inputs and settings (finished: returned as is; unfinished: resumed).
    labels: labels table files (`labels_table` formats).
    wit_tsv: WIT TSV files (texts and mime types).
    image_dirs: image directories in the Commons layout, searched in order.
    kaggle_pixels: Kaggle pixel files (base64 images).
    settings: see IngestSettings.
    num_workers: worker processes; None -> the available CPUs. Does not change the output.
    progress: progress lines with ETA on stderr.
    extra_info: merged into the manifest's ``info`` (e.g. "human_labelled_splits").
    keep_work_files: keep ``<out_dir>/.ingest`` (caches and per-unit summaries) after success.
  """
  _check_settings(settings)
  if not labels:
    raise InputError("ingest: at least one labels table is needed (it says which images exist "
                     "and their topics)")
  for d in image_dirs:
    if not os.path.isdir(d):
      raise InputError(f"ingest: image directory {d!r} not found")
  tax = taxonomy_lib.load(settings.taxonomy)
  num_workers = num_workers or _available_cpus()
  if num_workers < 1:
    raise InputError(f"ingest: num_workers must be positive, got {num_workers}")
  out_dir = os.path.abspath(out_dir)
  run = {
      "ingest_version": INGEST_VERSION,
      "settings": settings.to_json(),
      "taxonomy": tax.to_json(),
      "labels": _input_identity(labels, by_content=True),
      "wit_tsv": _input_identity(wit_tsv, by_content=False),
      "kaggle_pixels": _input_identity(kaggle_pixels, by_content=False),
      "image_dirs": [os.path.abspath(d) for d in image_dirs],
      "extra_info": dict(extra_info or {}),
  }
  finished = _finished_dataset(out_dir, run)
  if finished is not None:
    _log(f"{out_dir}: already ingested with these inputs and settings")
    return finished
  work = os.path.join(out_dir, WORK_DIR)
  os.makedirs(work, exist_ok=True)
  run_path = os.path.join(work, "run.json")
  if os.path.exists(run_path):
    if _read_json(run_path) != json.loads(json.dumps(run)):
      raise InputError(f"ingest: {out_dir!r} holds an unfinished ingest of other inputs or settings "
                       f"({run_path}); delete the directory or choose another out_dir")
    _log(f"{out_dir}: resuming an unfinished ingest")
  else:
    leftovers = [n for n in os.listdir(out_dir) if n != WORK_DIR]
    if leftovers:
      raise InputError(f"ingest: out_dir {out_dir!r} is not empty ({sorted(leftovers)[:5]}) and "
                       f"holds no ingest; refusing to write into it")
    _write_json_atomic(run_path, run)
  _remove_temporaries(out_dir)

  counts: dict[str, Any] = {}
  filtered: collections.Counter = collections.Counter()
  examples: dict[str, list[str]] = collections.defaultdict(list)

  def note(reason: str, message: str) -> None:
    filtered[reason] += 1
    if len(examples[reason]) < MAX_EXAMPLE_MESSAGES:
      examples[reason].append(message)

  images = _read_labels(labels, tax, counts, note)
  wit_info = _join_wit_texts(wit_tsv, images, work, settings, num_workers, progress, counts)
  kaggle_info = _stage_kaggle_pixels(kaggle_pixels, images, work, num_workers, progress)
  kept = _filter_images(images, settings, note)
  counts["candidates"] = len(kept)

  tasks, split_shards = _plan_shards(kept, tax, settings, out_dir, work, image_dirs)
  bar = progress_lib.Progress("ingest", "images", sum(len(t["candidates"]) for t in tasks),
                             enabled=progress)
  for _ in _run_units(_shard_unit, tasks, num_workers, bar, lambda s: s["candidates"]):
    pass
  # Read back in plan order (results arrive in any order).
  summaries = [_read_json(t["summary"]) for t in tasks]

  splits_info = {}
  for name, _ in settings.splits:
    mine = [s for t, s in zip(tasks, summaries) if t["split"] == name]
    splits_info[name] = manifest_lib.SplitInfo(
        files=[s["file"] for s in mine if s["file"]],
        num_examples=sum(s["num_examples"] for s in mine),
        label_counts=np.sum([s["label_counts"] for s in mine] or [np.zeros(tax.num_labels)],
                            axis=0).astype(int).tolist(),
        label_counts_hier=np.sum([s["label_counts_hier"] for s in mine]
                                 or [np.zeros(tax.num_labels)], axis=0).astype(int).tolist())
  for s in summaries:
    for reason, n in s["filtered"].items():
      filtered[reason] += n
    for reason, messages in s["examples"].items():
      examples[reason].extend(messages[:MAX_EXAMPLE_MESSAGES - len(examples[reason])])
  counts["examples"] = sum(s.num_examples for s in splits_info.values())
  text_counts = collections.Counter()
  for s in summaries:
    text_counts.update(s["text_counts"])
  counts["filtered"] = dict(sorted(filtered.items()))
  info = {
      "generator": __name__,
      "run": run,
      "settings": settings.to_json(),
      "inputs": {
          "labels": run["labels"],
          "wit_tsv": wit_info.pop("files"),
          "kaggle_pixels": kaggle_info.pop("files"),
          "image_dirs": run["image_dirs"],
      },
      "counts": counts,
      "wit": wit_info,
      manifest_lib.TEXT_FIELDS_KEY: manifest_lib.text_fields_info(
          fields=[*records.CONTEXT_FIELDS, "attribution_description", "alt_text"],
          counts=text_counts, examples=counts["examples"],
          max_contexts=settings.max_text_contexts),
      "kaggle_pixels": kaggle_info,
      "filtered_examples": dict(sorted(examples.items())),
      "label_statistics": _label_statistics(tax, splits_info),
      "split_hashing": "sha256('split:' + Commons path <h>/<hh>/<File>) -> [0, 1) -> split",
      "num_shards": split_shards,
      "versions": {"pillow": PIL.__version__, "numpy": np.__version__},
      **(extra_info or {}),
  }
  manifest = manifest_lib.Manifest(
      taxonomy=tax, image_shape=(settings.image_size, settings.image_size, 3),
      image_encoding=settings.image_encoding, splits=splits_info, info=info)
  manifest_lib.write(out_dir, manifest)
  _log_summary(out_dir, counts, splits_info)
  for name, split in splits_info.items():
    if split.num_examples == 0:
      _log(f"warning: split {name!r} is empty")
  if not keep_work_files:
    shutil.rmtree(work, ignore_errors=True)
  return manifest_lib.read(out_dir)


def _finished_dataset(out_dir: str, run: dict) -> manifest_lib.Manifest | None:
  if not os.path.exists(os.path.join(out_dir, manifest_lib.MANIFEST_NAME)):
    return None
  existing = manifest_lib.read(out_dir)
  if existing.info.get("run") != json.loads(json.dumps(run)):
    raise InputError(f"ingest: {out_dir!r} holds a dataset made from other inputs or settings; "
                     f"delete it or choose another out_dir")
  return existing


def _read_labels(paths: Sequence[str], tax: taxonomy_lib.Taxonomy, counts: dict,
                 note: Callable[[str, str], None]) -> dict[str, _Image]:
  """Labels tables -> {Commons path: image}, duplicates merged; unknown labels raise."""
  images: dict[str, _Image] = {}
  unknown = labels_table.UnknownLabels()
  rows = duplicates = 0
  for path in paths:
    for row in labels_table.check_labels(labels_table.iter_rows(path), tax, unknown):
      rows += 1
      try:
        file = wit.parse_image_url(row.url) if row.url else wit.file_from_title(row.title)
      except InputError as e:
        note("bad_image_url", f"{row.where}: {e}")
        continue
      key = file.relative_path
      if key in images:
        duplicates += 1
        images[key].labels.update(row.labels)
        continue
      images[key] = _Image(key=key, image_id=row.image_id or key, url=file.url(), where=row.where,
                           labels=set(row.labels))
  unknown.raise_if_any(tax)
  counts.update(label_rows=rows, duplicate_label_rows=duplicates, labelled_images=len(images))
  return images


def _join_wit_texts(paths: Sequence[str], images: dict[str, _Image], work: str,
                    settings: IngestSettings, num_workers: int, progress: bool,
                    counts: dict) -> dict:
  """Fills each image's texts and mime type from its WIT rows (file order); returns WIT info."""
  if not paths:
    return {"files": []}
  tasks = []
  for i, path in enumerate(paths):
    tag = f"wit-{i:05d}"
    tasks.append({"path": os.path.abspath(path), "languages": list(settings.languages),
                  "max_contexts": settings.max_text_contexts,
                  "cache": os.path.join(work, f"{tag}.msgpack"),
                  "summary": os.path.join(work, f"{tag}.json")})
  bar = progress_lib.Progress("ingest", "WIT files", len(tasks), enabled=progress)
  for _ in _run_units(_wit_text_unit, tasks, num_workers, bar, lambda s: 1):
    pass
  stats = wit.ReadStats()
  files, bad_url_messages = [], []
  bad_urls = 0
  for task in tasks:  # File order decides which row is "first".
    summary = _read_json(task["summary"])
    file_stats = wit.ReadStats(rows=summary["stats"]["rows"], malformed=summary["stats"]["malformed"],
                               reasons=collections.Counter(summary["stats"]["reasons"]),
                               messages=summary["stats"]["messages"])
    stats.merge(file_stats)
    bad_urls += summary["bad_image_urls"]
    bad_url_messages.extend(summary["bad_url_messages"][:MAX_EXAMPLE_MESSAGES - len(bad_url_messages)])
    files.append({"path": task["path"], "sha256": summary["sha256"], "rows": file_stats.rows,
                  "malformed": file_stats.malformed})
    with open(task["cache"], "rb") as f:
      first = msgpack.unpack(f, raw=False)
    unlabelled = 0
    for key, texts in first.items():
      image = images.get(key)
      if image is None:
        unlabelled += 1
        continue
      if not image.in_wit:
        image.in_wit = True
        image.page_title, image.caption = texts["page_title"], texts["caption"]
        image.mime_type = texts["mime_type"]
      _add_texts(image.texts, texts["contexts"], texts["contexts_dropped"],
                 texts["attribution_description"], texts["alt_text"], settings.max_text_contexts)
    files[-1]["images_without_labels"] = unlabelled
  counts["labelled_images_in_wit"] = sum(image.in_wit for image in images.values())
  for message in stats.messages[:10]:
    _log(f"malformed WIT row: {message}")
  if stats.malformed:
    _log(f"{stats.malformed} malformed WIT rows skipped ({dict(stats.reasons)})")
  return {"files": files, "read": stats.to_json(), "bad_image_urls": bad_urls,
          "bad_image_url_examples": bad_url_messages}


def _stage_kaggle_pixels(paths: Sequence[str], images: dict[str, _Image], work: str,
                         num_workers: int, progress: bool) -> dict:
  if not paths:
    return {"files": []}
  wanted = os.path.join(work, "labelled_keys.txt")
  if not os.path.exists(wanted):
    tmp = f"{wanted}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
      f.write("\n".join(sorted(images)))
    os.replace(tmp, wanted)
  tasks = []
  for i, path in enumerate(paths):
    tag = f"kaggle-{i:05d}"
    tasks.append({"path": os.path.abspath(path), "wanted_keys": wanted,
                  "dir": os.path.join(work, tag), "summary": os.path.join(work, f"{tag}.json")})
  bar = progress_lib.Progress("ingest", "Kaggle pixel files", len(tasks), enabled=progress)
  for _ in _run_units(_kaggle_stage_unit, tasks, num_workers, bar, lambda s: 1):
    pass
  stats = wit.ReadStats()
  files = []
  staged = 0
  for task in tasks:  # File order decides which copy of an image is used.
    summary = _read_json(task["summary"])
    stats.merge(wit.ReadStats(rows=summary["stats"]["rows"], malformed=summary["stats"]["malformed"],
                              reasons=collections.Counter(summary["stats"]["reasons"]),
                              messages=summary["stats"]["messages"]))
    files.append({"path": task["path"], "sha256": summary["sha256"],
                  "rows": summary["stats"]["rows"], "malformed": summary["stats"]["malformed"]})
    for key in summary["staged"]:
      image = images[key]
      if not image.staged:
        image.staged = os.path.join(task["dir"], key)
        staged += 1
  if stats.malformed:
    _log(f"{stats.malformed} malformed Kaggle pixel rows skipped ({dict(stats.reasons)})")
  return {"files": files, "read": stats.to_json(), "images_with_pixels": staged}


def _filter_images(images: dict[str, _Image], settings: IngestSettings,
                   note: Callable[[str, str], None]) -> list[_Image]:
  extensions = {e.lower().lstrip(".") for e in settings.extensions}
  mime_types = {m.lower() for m in settings.mime_types}
  kept = []
  for key in sorted(images):
    image = images[key]
    extension = key.rpartition(".")[2].lower() if "." in key.rpartition("/")[2] else ""
    if extensions and extension not in extensions:
      note("extension", f"{image.where}: {key}: extension {extension!r} not in {sorted(extensions)}")
    elif mime_types and image.mime_type and image.mime_type.lower() not in mime_types:
      note("mime_type", f"{image.where}: {key}: mime type {image.mime_type!r} not in "
           f"{sorted(mime_types)}")
    elif not image.labels and not settings.keep_unlabelled:
      note("no_label", f"{image.where}: {key}: no label")
    else:
      kept.append(image)
  return kept


def _plan_shards(kept: Sequence[_Image], tax: taxonomy_lib.Taxonomy, settings: IngestSettings,
                 out_dir: str, work: str, image_dirs: Sequence[str]
                 ) -> tuple[list[dict], dict[str, int]]:
  by_split: dict[str, list[_Image]] = {name: [] for name, _ in settings.splits}
  for image in kept:
    by_split[split_of(image.key, settings.splits)].append(image)
  tasks, split_shards = [], {}
  for name, members in by_split.items():
    num_shards = max(1, math.ceil(len(members) / settings.examples_per_shard))
    split_shards[name] = num_shards
    shards: list[list[_Image]] = [[] for _ in range(num_shards)]
    for image in members:  # Already in key order.
      shards[shard_of(image.key, num_shards)].append(image)
    for index, shard in enumerate(shards):
      file = shard_file_name(name, index, num_shards)
      tasks.append({
          "split": name, "file": file, "out_dir": out_dir,
          "summary": os.path.join(work, f"{file}.json"),
          "taxonomy": tax.to_json(), "image_encoding": settings.image_encoding,
          "decode_settings": dataclasses.asdict(settings.decode_settings()),
          "image_dirs": [os.path.abspath(d) for d in image_dirs],
          "candidates": [{"key": i.key, "id": i.image_id, "url": i.url, "where": i.where,
                          "labels": sorted(tax.index[l] for l in i.labels),
                          "page_title": i.page_title, "caption": i.caption, "staged": i.staged,
                          "texts": i.texts}
                         for i in shard],
      })
  return tasks, split_shards


def _label_statistics(tax: taxonomy_lib.Taxonomy,
                      splits: Mapping[str, manifest_lib.SplitInfo]) -> dict[str, dict[str, Any]]:
  total = sum(s.num_examples for s in splits.values())
  stats = {}
  for i, label in enumerate(tax.labels):
    flat = sum(s.label_counts[i] for s in splits.values())
    hier = sum(s.label_counts_hier[i] for s in splits.values())
    stats[label] = {"flat": flat, "hierarchical": hier,
                    "flat_fraction": round(flat / total, 6) if total else 0.0,
                    "hierarchical_fraction": round(hier / total, 6) if total else 0.0}
  return stats


def _log_summary(out_dir: str, counts: Mapping[str, Any],
                 splits: Mapping[str, manifest_lib.SplitInfo]) -> None:
  _log(f"{out_dir}: {counts['examples']:,} examples from {counts['labelled_images']:,} labelled "
       f"images ({counts['label_rows']:,} table rows, {counts['duplicate_label_rows']:,} duplicates "
       f"merged)")
  for reason, n in counts["filtered"].items():
    _log(f"  dropped {n:,}: {reason}")
  _log("  splits: " + ", ".join(f"{name} {s.num_examples:,}" for name, s in splits.items()))
