"""WIT TSV reading (real rows from the TFDS fixtures, incl. a real malformed file) and Commons URLs."""

from __future__ import annotations

import base64
import gzip
import os

import pytest

from wikitopics_jax.data import wit
from wikitopics_jax.errors import InputError

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "wit_sample")


def test_reads_real_wit_rows_with_multiline_quoted_fields():
  stats = wit.ReadStats()
  rows = list(wit.iter_rows(os.path.join(FIXTURES, "train-00000-of-00009.tsv"), stats))
  assert [r.line for r in rows] == [2, 4, 5]  # The first row's text spans lines 2-3.
  assert stats.rows == 3 and stats.malformed == 0
  first = rows[0]
  assert first.image_url == "https://upload.wikimedia.org/wikipedia/commons/0/04/MGS_logo.JPG"
  assert first.page_title == "Hoz y martillo"
  assert first.mime_type == "image/jpeg"
  assert "\n" in first.get("context_page_description")
  assert first.get("context_page_description").endswith("Unión Soviética.")
  # No reference caption there: the Commons description is the caption.
  assert first.caption == "Galego: Logo do Movemento Galego ao Socialismo"
  assert set(first.fields) == set(wit.WIT_COLUMNS)
  assert rows[2].page_title == "Украинская гривна"


def test_real_rows_text_fields():
  rows = list(wit.iter_rows(os.path.join(FIXTURES, "train-00000-of-00009.tsv")))
  assert [r.section_title for r in rows] == ["Emblemas", "", "Изъятые из обращения монеты"]
  # These pages show no caption under the image; Commons still describes every one.
  assert [r.reference_description for r in rows] == ["", "", ""]
  assert rows[1].attribution_description == "English: Lesser bulldog bat (Noctilio albiventris)"
  assert [r.alt_text for r in rows] == ["", "", ""]


def test_real_malformed_file_is_reported_with_file_and_line():
  path = os.path.join(FIXTURES, "test-00000-of-00005.tsv")
  stats = wit.ReadStats()
  assert list(wit.iter_rows(path, stats)) == []
  assert stats.malformed == 1 and stats.rows == 0
  assert stats.reasons == {"unterminated_quote": 1}
  assert stats.messages == [f"{path}:2: unterminated quoted field (the file ends inside it)"]


def test_kaggle_variant_has_the_extra_column():
  rows = list(wit.iter_rows(os.path.join(FIXTURES, "kaggle", "train-00000-of-00005.tsv")))
  assert len(rows) == 2
  assert rows[0].get(wit.KAGGLE_EXTRA_COLUMN) == "Republic P-43 Lancer [SEP] "
  assert rows[0].image_url.startswith("http://upload.wikimedia.org/")
  test_rows = list(wit.iter_rows(os.path.join(FIXTURES, "kaggle", "test.tsv")))
  assert test_rows[0].fields == {
      "id": "78150",
      "image_url": "http://upload.wikimedia.org/wikipedia/commons/9/99/"
                   "Dodge_Challenger_SRT8_va_orange-r.jpg"}


def _row(url: str, text: str = "x") -> str:
  fields = ["en", "https://en.wikipedia.org/wiki/P", url, "P", "", "P", text, "", "", "image/jpeg",
            "10", "10", "true", "true", "false", "ctx", "sec"]
  return "\t".join(fields)


def test_gzip_bad_rows_are_counted_and_reading_goes_on(tmp_path):
  header = "\t".join(wit.WIT_COLUMNS)
  good = "https://upload.wikimedia.org/wikipedia/commons/a/ab/A.jpg"
  lines = [header, _row(good), "too\tfew\tfields", _row(good, '"multi\nline"'),
           _row(good).encode("utf-8").decode() + "\tone too many", _row(good, "ok")]
  data = ("\n".join(lines) + "\n").encode("utf-8")
  data = data.replace(b"ok", b"o\xffk")  # Not UTF-8.
  data += (_row(good, "last") + "\n").encode()
  path = str(tmp_path / "wit.tsv.gz")
  with gzip.open(path, "wb") as f:
    f.write(data)
  stats = wit.ReadStats()
  rows = list(wit.iter_rows(path, stats))
  assert [r.line for r in rows] == [2, 4, 8]
  assert rows[1].get("caption_reference_description") == "multi\nline"
  assert stats.rows == 3 and stats.malformed == 3
  assert stats.reasons == {"wrong_field_count": 2, "invalid_utf8": 1}
  assert stats.messages[0] == f"{path}:3: expected 17 tab-separated fields, got 3"
  assert stats.messages[1] == f"{path}:6: expected 17 tab-separated fields, got 18"
  assert stats.messages[2] == f"{path}:7: bytes that are not valid UTF-8"


def test_truncated_gzip_is_reported_not_raised(tmp_path):
  header = "\t".join(wit.WIT_COLUMNS)
  url = "https://upload.wikimedia.org/wikipedia/commons/a/ab/A.jpg"
  text = "\n".join([header] + [_row(url, f"caption {i} " * 20) for i in range(2000)]) + "\n"
  blob = gzip.compress(text.encode(), compresslevel=1)
  path = str(tmp_path / "cut.tsv.gz")
  with open(path, "wb") as f:
    f.write(blob[:len(blob) // 2])
  stats = wit.ReadStats()
  rows = list(wit.iter_rows(path, stats))
  assert 0 < len(rows) < 2000
  assert stats.reasons == {"unreadable_stream": 1}
  assert stats.messages[0].startswith(f"{path}:")


def test_runaway_quote_is_stopped_by_the_field_limit(tmp_path, monkeypatch):
  monkeypatch.setattr(wit, "MAX_TEXT_FIELD_CHARS", 1000)
  header = "\t".join(wit.WIT_COLUMNS)
  url = "https://upload.wikimedia.org/wikipedia/commons/a/ab/A.jpg"
  lines = [header, _row(url, '"never closed')] + [_row(url, "y" * 50) for _ in range(100)]
  path = tmp_path / "runaway.tsv"
  path.write_text("\n".join(lines) + "\n")
  stats = wit.ReadStats()
  list(wit.iter_rows(str(path), stats))
  assert stats.reasons["field_too_long"] == 1
  assert stats.messages[0].startswith(f"{path}:2: a field longer than 1000 characters")


def test_file_without_header_is_an_input_error(tmp_path):
  path = tmp_path / "noheader.tsv"
  path.write_text(_row("https://upload.wikimedia.org/wikipedia/commons/a/ab/A.jpg") + "\n")
  with pytest.raises(InputError, match=r"noheader.tsv:1: no header row"):
    list(wit.iter_rows(str(path)))
  empty = tmp_path / "empty.tsv"
  empty.write_text("")
  with pytest.raises(InputError, match="empty file"):
    list(wit.iter_rows(str(empty)))


def test_kaggle_pixel_rows(tmp_path):
  url = "http://upload.wikimedia.org/wikipedia/commons/c/c4/Republic_P-43_Lancer.jpg"
  lines = [f"{url}\t{base64.b64encode(b'abc').decode()}\thttp://meta",
           f"{url}\tnot base64!\thttp://meta",
           "only\ttwo"]
  path = tmp_path / "train_image_pixels_part-00000.csv"
  path.write_text("\n".join(lines) + "\n")
  stats = wit.ReadStats()
  assert list(wit.iter_kaggle_pixels(str(path), stats)) == [(1, url, b"abc")]
  assert stats.reasons == {"invalid_base64": 1, "wrong_field_count": 1}


def test_commons_paths_and_thumbnail_urls():
  url = "https://upload.wikimedia.org/wikipedia/commons/c/c5/Homemade_minestrone.jpg"
  assert wit.commons_path(url) == "c/c5/Homemade_minestrone.jpg"
  assert wit.thumbnail_url(url, 64) == ("https://upload.wikimedia.org/wikipedia/commons/thumb/c/c5/"
                                        "Homemade_minestrone.jpg/64px-Homemade_minestrone.jpg")
  # Percent-encoded names: decoded on disk, kept encoded in URLs; http and thumbnails parse the same.
  encoded = ("https://upload.wikimedia.org/wikipedia/commons/7/75/"
             "0_Dr%C3%A9hance_-_Ch%C3%A2teau_de_Walzin_%281%29.jpg")
  f = wit.parse_image_url(encoded)
  assert f.relative_path == "7/75/0_Dréhance_-_Château_de_Walzin_(1).jpg"
  assert f.url() == encoded
  assert wit.parse_image_url(encoded.replace("https", "http")) == f
  assert wit.parse_image_url(f.thumbnail_url(128)) == f
  assert f.thumbnail_url(128, base_url="http://127.0.0.1:8000/w/") == (
      "http://127.0.0.1:8000/w/commons/thumb/7/75/0_Dr%C3%A9hance_-_Ch%C3%A2teau_de_Walzin_%281%29.jpg/"
      "128px-0_Dr%C3%A9hance_-_Ch%C3%A2teau_de_Walzin_%281%29.jpg")
  # The hash directory is md5 of the name.
  assert wit.file_from_title("File:0 Dréhance - Château de Walzin (1).jpg") == f
  assert wit.hash_dir_of("Abrazo_del_Estrecho_B&N.jpg") == "5/52"
  # Formats Wikimedia renders to another type, and long names.
  svg = wit.parse_image_url("https://upload.wikimedia.org/wikipedia/commons/a/ab/Map.svg")
  assert svg.thumbnail_url(64).endswith("/a/ab/Map.svg/64px-Map.svg.png")
  tif = wit.parse_image_url("https://upload.wikimedia.org/wikipedia/commons/a/ab/Scan.TIF")
  assert tif.thumbnail_url(64).endswith("/Scan.TIF/lossy-page1-64px-Scan.TIF.jpg")
  long_name = "L" * 170 + ".jpg"
  assert wit.file_from_title(long_name).thumbnail_url(64).endswith("/64px-thumbnail.jpg")
  # Local files of a language wiki keep their project in the layout.
  en = wit.parse_image_url("https://upload.wikimedia.org/wikipedia/en/a/ab/Poster.jpg")
  assert en.relative_path == "en/a/ab/Poster.jpg"


@pytest.mark.parametrize("url", [
    "https://example.org/x.jpg",
    "https://upload.wikimedia.org/wikipedia/commons/c/zz/X.jpg",
    "https://upload.wikimedia.org/wikipedia/commons/c/c5/..",
    "https://upload.wikimedia.org/wikipedia/commons/c/c5/a%2Fb.jpg",
    "https://upload.wikimedia.org/wikipedia/commons/c/c5/%FF.jpg",
    "ftp://upload.wikimedia.org/wikipedia/commons/c/c5/X.jpg",
])
def test_bad_image_urls_are_input_errors(url):
  with pytest.raises(InputError, match="image URL"):
    wit.parse_image_url(url)
