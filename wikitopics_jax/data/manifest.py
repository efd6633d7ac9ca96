"""The JSON manifest that describes an ArrayRecord dataset directory.

Layout of a dataset directory::

    manifest.json
    train-00000-of-00004.array_record ...
    val-00000-of-00001.array_record ...

The manifest holds the full taxonomy the labels were built with (so a model can never be trained with a
hierarchy matrix in another label order), the image shape and encoding, and per split: its files,
number of examples and per-label positive counts for flat and hierarchical labels.

Datasets whose records hold text (`records`) say so in ``info["text_fields"]`` (`text_fields_info`):
the fields the writer can fill and, per field, how many examples have it. Without that entry a
dataset has no text beyond the legacy ``page_title``/``caption`` (older datasets load unchanged).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from wikitopics_jax import taxonomy as taxonomy_lib
from wikitopics_jax import files
from wikitopics_jax.errors import InputError

MANIFEST_NAME = "manifest.json"
FORMAT = "wikitopics-arrayrecord-v1"
TEXT_FIELDS_KEY = "text_fields"


@dataclasses.dataclass
class SplitInfo:
  files: list[str]
  num_examples: int
  label_counts: list[int]
  label_counts_hier: list[int]

  def positives(self, hierarchical: bool) -> np.ndarray:
    return np.asarray(self.label_counts_hier if hierarchical else self.label_counts, np.int64)

  def negatives(self, hierarchical: bool) -> np.ndarray:
    return self.num_examples - self.positives(hierarchical)


@dataclasses.dataclass
class Manifest:
  taxonomy: taxonomy_lib.Taxonomy
  image_shape: tuple[int, int, int]
  image_encoding: str
  splits: dict[str, SplitInfo]
  info: dict[str, Any] = dataclasses.field(default_factory=dict)

  def split(self, name: str, *, where: str = "") -> SplitInfo:
    if name not in self.splits:
      raise InputError(f"{where or 'dataset'}: no split {name!r}; available: {sorted(self.splits)}")
    return self.splits[name]

  @property
  def text_fields(self) -> dict[str, Any]:
    """``info["text_fields"]`` (see `text_fields_info`); {} for a dataset without text."""
    return self.info.get(TEXT_FIELDS_KEY, {})

  def to_json(self) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "taxonomy": self.taxonomy.to_json(),
        "image_shape": list(self.image_shape),
        "image_encoding": self.image_encoding,
        "splits": {k: dataclasses.asdict(v) for k, v in self.splits.items()},
        "info": self.info,
    }


def text_fields_info(*, fields: Sequence[str], counts: Mapping[str, int], examples: int,
                     **extra: Any) -> dict[str, Any]:
  """The manifest's record of text: ``fields`` (what the records may hold, in `records.example_text`
  order), ``examples_with`` (field -> examples having it non-empty, over all splits; "any": examples
  with any text), ``examples`` (all examples), then other counts (e.g. contexts) and `extra`."""
  return {
      "fields": list(fields),
      "examples": int(examples),
      "examples_with": {f: int(counts.get(f, 0)) for f in [*fields, "any"]},
      **{k: int(v) for k, v in sorted(counts.items()) if k not in fields and k != "any"},
      **extra,
  }


def check_split_names(names: Sequence[str], where: str) -> None:
  """Split names name files: distinct, non-empty, letters, digits, '_' or '-'."""
  names = list(names)
  if not names or len(set(names)) != len(names):
    raise InputError(f"{where}: splits need distinct names, got {names}")
  bad = [n for n in names if not n or not all(c.isalnum() or c in "_-" for c in n)]
  if bad:
    raise InputError(f"{where}: split names must be letters, digits, '_' or '-' (they name files), "
                     f"got {bad}")


def write(data_dir: str, manifest: Manifest) -> str:
  """Atomic write: a reader sees the old manifest or the new one, never half of one."""
  path = os.path.join(data_dir, MANIFEST_NAME)
  with files.atomic_open(path) as f:
    json.dump(manifest.to_json(), f, indent=1)
  return path


def read(data_dir: str) -> Manifest:
  path = os.path.join(data_dir, MANIFEST_NAME)
  if not os.path.exists(path):
    raise InputError(f"{path}: no dataset manifest (is {data_dir!r} a wikitopics dataset directory?)")
  try:
    with open(path) as f:
      data = json.load(f)
  except json.JSONDecodeError as e:
    raise InputError(f"{path}: not valid JSON ({e})") from None
  if data.get("format") != FORMAT:
    raise InputError(f"{path}: format {data.get('format')!r} is not {FORMAT!r}")
  try:
    tax = taxonomy_lib.Taxonomy.from_json(data["taxonomy"], source=path)
    splits = {name: SplitInfo(**s) for name, s in data["splits"].items()}
    manifest = Manifest(taxonomy=tax, image_shape=tuple(data["image_shape"]),
                        image_encoding=data["image_encoding"], splits=splits, info=data.get("info", {}))
  except (KeyError, TypeError) as e:
    raise InputError(f"{path}: malformed manifest ({type(e).__name__}: {e})") from None
  for name, split in splits.items():
    for f in split.files:
      if not os.path.exists(os.path.join(data_dir, f)):
        raise InputError(f"{path}: split {name!r} lists missing file {f!r}")
    if len(split.label_counts) != tax.num_labels:
      raise InputError(f"{path}: split {name!r} has {len(split.label_counts)} label counts for "
                       f"{tax.num_labels} labels")
  return manifest


def split_paths(data_dir: str, split: SplitInfo) -> list[str]:
  return [os.path.join(data_dir, f) for f in split.files]
