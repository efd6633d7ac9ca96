"""Small, fully known ingest inputs for tests: images in the Commons layout, a labels table, WIT rows."""

from __future__ import annotations

import dataclasses
import gzip
import io
import json
import os

from PIL import Image

from wikitopics_jax.data import wit

LEAVES = ("Animals", "Architecture", "Art", "Food", "Maps & Flags", "People", "Plants", "Sports")


def colour_of(index: int) -> tuple[int, int, int]:
  return (index * 5 % 256, 100, (200 - index * 3) % 256)


def jpeg_bytes(index: int, size: tuple[int, int] = (40, 30)) -> bytes:
  buf = io.BytesIO()
  Image.new("RGB", size, colour_of(index)).save(buf, format="JPEG", quality=95)
  return buf.getvalue()


@dataclasses.dataclass
class Inputs:
  labels: str
  image_dir: str
  wit_tsv: str
  rows: list[dict]
  # Expected drops by reason.
  expected_filtered: dict[str, int]
  expected_examples: int


def wit_row(url: str, *, page_title: str, caption: str, mime_type: str = "image/jpeg",
            language: str = "en", section_title: str = "", attribution: str = "",
            alt_text: str = "") -> str:
  values = {c: "" for c in wit.WIT_COLUMNS}
  values.update(language=language, page_url=f"https://{language}.wikipedia.org/wiki/{page_title}",
                image_url=url, page_title=page_title, caption_reference_description=caption,
                section_title=section_title, caption_attribution_description=attribution,
                caption_alt_text_description=alt_text, mime_type=mime_type, is_main_image="true")
  return "\t".join(_quote(values[c]) for c in wit.WIT_COLUMNS)


def _quote(field: str) -> str:
  if any(c in field for c in '\t\n"'):
    return '"' + field.replace('"', '""') + '"'
  return field


def make_inputs(root: str, num_images: int = 40) -> Inputs:
  """`num_images` labelled JPEGs plus one of each way to be dropped (see expected_filtered)."""
  image_dir = os.path.join(root, "images")
  rows, wit_lines = [], ["\t".join(wit.WIT_COLUMNS)]

  def add_image(name: str, data: bytes | None, labels: list[str], image_id: str) -> wit.CommonsFile:
    file = wit.file_from_title(name)
    if data is not None:
      path = os.path.join(image_dir, file.relative_path)
      os.makedirs(os.path.dirname(path), exist_ok=True)
      with open(path, "wb") as f:
        f.write(data)
    rows.append({"id": image_id, "title": f"File:{name.replace('_', ' ')}", "url": file.url(),
                 "labels": labels})
    return file

  for i in range(num_images):
    file = add_image(f"Img_{i:03d}.jpg", jpeg_bytes(i), [LEAVES[i % len(LEAVES)]], str(1000 + i))
    if i % 3 == 0:  # Some images appear on pages: texts from the first row.
      wit_lines.append(wit_row(file.url().replace("https:", "http:"), page_title=f"Page {i}",
                               caption=f"Caption {i}\nsecond line"))
      wit_lines.append(wit_row(file.url(), page_title=f"Later page {i}", caption="later"))
  # A duplicate table row of image 0: its labels are unioned.
  rows.append({**rows[0], "id": "dup", "labels": ["History"]})
  add_image("No_label.jpg", jpeg_bytes(1), [], "2001")
  add_image("Drawing.png", b"irrelevant", ["Art"], "2002")
  add_image("Missing.jpg", None, ["Art"], "2003")
  add_image("Error_page.jpg", b"<!DOCTYPE html><html>Too many requests</html>", ["Art"], "2004")
  add_image("Cut.jpg", jpeg_bytes(7, (64, 64))[:300], ["Art"], "2005")
  gif = add_image("Really_a_gif.jpg", jpeg_bytes(8), ["Art"], "2006")
  wit_lines.append(wit_row(gif.url(), page_title="Gif page", caption="", mime_type="image/gif"))
  wit_lines.append("too\tfew\tfields")

  labels = os.path.join(root, "labels.jsonl")
  with open(labels, "w", encoding="utf-8") as f:
    for row in rows:
      f.write(json.dumps(row) + "\n")
  wit_tsv = os.path.join(root, "wit.tsv.gz")
  with gzip.open(wit_tsv, "wt", encoding="utf-8", newline="") as f:
    f.write("\n".join(wit_lines) + "\n")
  return Inputs(labels=labels, image_dir=image_dir, wit_tsv=wit_tsv, rows=rows,
                expected_filtered={"extension": 1, "mime_type": 1, "no_label": 1,
                                   "image_missing": 1, "undecodable_html": 1,
                                   "undecodable_truncated": 1},
                expected_examples=num_images)
