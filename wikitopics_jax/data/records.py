"""One example <-> one ArrayRecord record (msgpack map).

Fields: ``id`` (str), ``image`` (bytes), ``image_encoding`` ("raw" = HWC uint8 pixels with ``shape``;
"png"/"jpeg" = an encoded file), ``labels`` (flat multi-hot, uint8 bytes), ``labels_hier`` (closed
multi-hot, uint8 bytes), and optional text fields, each absent when unknown:

* ``url``, ``page_title``, ``caption``: strings (the first WIT row's page title and preferred caption;
  the only text of records written before the multimodal fields).
* ``contexts``: list of ``[page_title, section_title, reference_description]``, one per page the
  image appears on (in input order, capped by the writer).
* ``attribution_description`` (the Commons description) and ``alt_text``: strings, once per image.

Records without any of these still decode; `example_text` joins whatever a record has.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import msgpack
import numpy as np
from PIL import Image

from wikitopics_jax.errors import InputError

TEXT_FIELDS = ("url", "page_title", "caption", "attribution_description", "alt_text")
CONTEXTS = "contexts"
# The parts of one context, in order.
CONTEXT_FIELDS = ("page_title", "section_title", "reference_description")
# Joins the parts of `example_text`. A field may itself hold newlines (WIT text spans lines), so a
# consumer that needs the parts apart should read the record's fields, not split on this.
TEXT_SEPARATOR = "\n"


def encode_example(*, example_id: str, image: np.ndarray | bytes, labels: np.ndarray,
                   labels_hier: np.ndarray, image_encoding: str = "raw",
                   contexts: Sequence[Sequence[str]] | None = None, **text: str) -> bytes:
  """One record; `contexts` are (page_title, section_title, reference_description) triples and
  `text` the string fields of TEXT_FIELDS (see the module docstring)."""
  record: dict[str, Any] = {"id": example_id, "image_encoding": image_encoding}
  if image_encoding == "raw":
    pixels = np.ascontiguousarray(image, dtype=np.uint8)
    if pixels.ndim != 3:
      raise ValueError(f"raw image of {example_id!r} must be HWC, got shape {pixels.shape}")
    record["image"] = pixels.tobytes()
    record["shape"] = list(pixels.shape)
  elif image_encoding in ("png", "jpeg"):
    if isinstance(image, np.ndarray):
      buf = io.BytesIO()
      Image.fromarray(image).save(buf, format=image_encoding.upper())
      image = buf.getvalue()
    record["image"] = bytes(image)
  else:
    raise ValueError(f"unknown image_encoding {image_encoding!r}")
  record["labels"] = np.asarray(labels, np.uint8).tobytes()
  record["labels_hier"] = np.asarray(labels_hier, np.uint8).tobytes()
  for key, value in text.items():
    if key not in TEXT_FIELDS:
      raise ValueError(f"unknown text field {key!r}; valid: {TEXT_FIELDS}")
    record[key] = str(value)
  if contexts:
    record[CONTEXTS] = [_context(c, example_id) for c in contexts]
  return msgpack.packb(record, use_bin_type=True)


def decode_record(data: bytes, *, where: str = "record") -> dict[str, Any]:
  """Bytes -> dict with ``image`` as HWC uint8 array and label arrays as uint8."""
  try:
    record = msgpack.unpackb(data, raw=False)
    encoding = record["image_encoding"]
    if encoding == "raw":
      image = np.frombuffer(record["image"], np.uint8).reshape(record["shape"])
    else:
      image = np.asarray(Image.open(io.BytesIO(record["image"])).convert("RGB"))
    return {
        "id": record["id"],
        "image": image,
        "labels": np.frombuffer(record["labels"], np.uint8),
        "labels_hier": np.frombuffer(record["labels_hier"], np.uint8),
        **{k: record[k] for k in TEXT_FIELDS if k in record},
        **({CONTEXTS: [tuple(c) for c in record[CONTEXTS]]} if CONTEXTS in record else {}),
    }
  except (KeyError, ValueError, TypeError, OSError, msgpack.UnpackException) as e:
    raise InputError(f"{where}: undecodable example ({type(e).__name__}: {e})") from None


def _context(context: Sequence[str], example_id: str) -> list[str]:
  if len(context) != 3:
    raise ValueError(f"text context of {example_id!r} must be (page_title, section_title, "
                     f"reference_description), got {context!r}")
  return [str(part) for part in context]


def example_text(record: dict[str, Any]) -> str:
  """All text of a (raw or decoded) record in one string, parts joined by TEXT_SEPARATOR, empty
  parts skipped, in this order: for each context, its page title, section title and reference
  description; then the attribution description; then the alt text. A record without contexts
  (written before them) gives its ``page_title`` then ``caption``; one without text gives ""."""
  contexts = record.get(CONTEXTS)
  if contexts:
    parts = [part for context in contexts for part in context]
    parts += [record.get("attribution_description", ""), record.get("alt_text", "")]
  else:
    parts = [record.get("page_title", ""), record.get("caption", "")]
  return TEXT_SEPARATOR.join(part for part in parts if part)


def decode_into(data: bytes, image_out: np.ndarray, labels_out: np.ndarray, *,
                label_key: str = "labels", where: str = "record",
                text: bool = False) -> str | None:
  """Decodes one record straight into a row of a batch: ``image_out`` (HWC uint8) and ``labels_out``
  (uint8) get the image and ``label_key``. A raw image is one copy out of the record's bytes, with no
  example dict in between; PNG/JPEG go through PIL. The row's shapes are the manifest's, so a record
  that differs is an InputError, as is an undecodable one. With `text`, returns `example_text` of
  the record (from the same unpacking), else None."""
  try:
    record = msgpack.unpackb(data, raw=False)
    if record["image_encoding"] == "raw":
      shape = tuple(record["shape"])
      pixels = np.frombuffer(record["image"], np.uint8)
    else:
      pixels = np.asarray(Image.open(io.BytesIO(record["image"])).convert("RGB"))
      shape = pixels.shape
    labels = np.frombuffer(record[label_key], np.uint8)
    example_id = record["id"]
  except (KeyError, ValueError, TypeError, OSError, msgpack.UnpackException) as e:
    raise InputError(f"{where}: undecodable example ({type(e).__name__}: {e})") from None
  if shape != image_out.shape or pixels.size != image_out.size:
    raise InputError(f"{where}: example {example_id!r} has image shape {shape}, the manifest says "
                     f"{image_out.shape}")
  if labels.shape != labels_out.shape:
    raise InputError(f"{where}: example {example_id!r} has {labels.size} {label_key}, the manifest's "
                     f"taxonomy has {labels_out.size}")
  image_out[...] = pixels.reshape(shape)
  labels_out[...] = labels
  return example_text(record) if text else None
