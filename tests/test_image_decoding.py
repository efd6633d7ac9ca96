"""Every kind of image input is converted correctly or rejected with a reason; nothing crashes."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from wikitopics_jax.data import image_decoding
from wikitopics_jax.data.image_decoding import DecodeSettings
from wikitopics_jax.data.image_decoding import Rejection
from wikitopics_jax.errors import InputError

SETTINGS = DecodeSettings(size=16)


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
  buf = io.BytesIO()
  image.save(buf, format=fmt, **kwargs)
  return buf.getvalue()


def _halves(width=64, height=48, left=(200, 30, 30), right=(30, 30, 200)) -> Image.Image:
  """Left half one colour, right half another: shows flips and rotations."""
  pixels = np.zeros((height, width, 3), np.uint8)
  pixels[:, :width // 2] = left
  pixels[:, width // 2:] = right
  return Image.fromarray(pixels)


def _decoded(data: bytes, settings: DecodeSettings = SETTINGS) -> np.ndarray:
  result = image_decoding.decode_image(data, settings)
  assert isinstance(result, np.ndarray), result
  assert result.shape == (settings.size, settings.size, 3) and result.dtype == np.uint8
  return result


def _rejected(data: bytes, settings: DecodeSettings = SETTINGS) -> Rejection:
  result = image_decoding.decode_image(data, settings)
  assert isinstance(result, Rejection), type(result)
  assert result.reason in image_decoding.REASONS
  return result


def test_plain_jpeg_png_keep_their_colours():
  for fmt in ("JPEG", "PNG", "BMP", "WEBP", "TIFF", "GIF"):
    out = _decoded(_encode(_halves(), fmt))
    assert np.abs(out[8, 2].astype(int) - (200, 30, 30)).max() < 20, fmt
    assert np.abs(out[8, 13].astype(int) - (30, 30, 200)).max() < 20, fmt


def test_truncated_jpeg_is_rejected():
  noisy = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
  data = _encode(noisy, "JPEG")
  assert _rejected(data[:len(data) // 2]).reason == "truncated"


def test_empty_html_svg_and_garbage_are_rejected():
  assert _rejected(b"").reason == "empty"
  html = b"<!DOCTYPE html>\n<html><head><title>429 Too Many Requests</title></head></html>"
  assert _rejected(html).reason == "html"
  svg = b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>'
  assert _rejected(svg).reason == "svg"
  assert _rejected(b"\x00\x01garbage" * 10).reason == "unidentified"
  # A valid header with nonsense after it.
  png = _encode(_halves(), "PNG")
  assert _rejected(png[:40] + b"\x00" * 200).reason in ("corrupt", "truncated")


def test_cmyk_jpeg_becomes_rgb():
  cmyk = Image.new("CMYK", (32, 32), (0, 255, 255, 0))  # Red in CMYK.
  out = _decoded(_encode(cmyk, "JPEG", quality=95))
  assert out[8, 8, 0] > 200 and out[8, 8, 1] < 40 and out[8, 8, 2] < 40


def test_palette_png_with_transparency_is_composited_on_white():
  image = Image.new("P", (32, 32), 0)
  image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
  image.paste(1, (0, 0, 16, 32))  # Left half red, right half palette 0 = transparent black.
  out = _decoded(_encode(image, "PNG", transparency=0))
  assert tuple(out[8, 2]) == (255, 0, 0)
  assert tuple(out[8, 13]) == (255, 255, 255)
  rgba = Image.new("RGBA", (32, 32), (0, 0, 255, 0))
  assert tuple(_decoded(_encode(rgba, "PNG"))[5, 5]) == (255, 255, 255)
  half = Image.new("LA", (32, 32), (0, 128))
  assert abs(int(_decoded(_encode(half, "PNG"))[5, 5, 0]) - 127) <= 1


def test_16_bit_png_is_scaled_not_clipped():
  gradient = np.tile(np.linspace(0, 65535, 32).astype(np.uint16), (32, 1))
  image = Image.fromarray(gradient)
  assert image.mode.startswith("I;16")
  out = _decoded(_encode(image, "PNG"), DecodeSettings(size=32))
  assert out[0, 0, 0] == 0 and out[0, -1, 0] == 255
  assert 100 < out[0, 16, 0] < 160  # Mid-grey, not clipped to white.
  assert np.all(np.diff(out[0, :, 0].astype(int)) >= 0)


def test_grayscale_and_bilevel():
  gray = Image.new("L", (20, 20), 77)
  assert tuple(_decoded(_encode(gray, "PNG"))[3, 3]) == (77, 77, 77)
  bilevel = Image.new("1", (20, 20), 1)
  assert tuple(_decoded(_encode(bilevel, "PNG"))[3, 3]) == (255, 255, 255)


def test_exif_orientation_is_applied():
  stored = _halves(64, 32)  # Wide: red left, blue right.
  exif = Image.Exif()
  exif[0x0112] = 6  # "Rotate 90 CW to display".
  out = _decoded(_encode(stored, "JPEG", exif=exif.tobytes(), quality=95),
                 DecodeSettings(size=16))
  # After a clockwise quarter turn the red half is on top.
  assert out[2, 8, 0] > 150 and out[2, 8, 2] < 80
  assert out[13, 8, 2] > 150 and out[13, 8, 0] < 80


def test_one_pixel_image_and_min_side():
  one = Image.new("RGB", (1, 1), (10, 20, 30))
  out = _decoded(_encode(one, "PNG"))
  assert np.all(out == np.array([10, 20, 30], np.uint8))
  assert _rejected(_encode(one, "PNG"), DecodeSettings(size=16, min_side=2)).reason == "too_small"


def test_decompression_bomb_is_rejected_before_decoding():
  # A 6000x6000 PNG of one colour: a few KB on disk, 36M pixels when decoded.
  bomb = _encode(Image.new("L", (6000, 6000), 0), "PNG", optimize=True)
  assert len(bomb) < 100_000
  rejection = _rejected(bomb, DecodeSettings(size=16, max_pixels=10_000_000))
  assert rejection.reason == "too_many_pixels" and "6000x6000" in rejection.detail


def test_gif_takes_the_first_frame():
  frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
  buf = io.BytesIO()
  frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=50)
  out = _decoded(buf.getvalue())
  assert tuple(out[4, 4]) == (255, 0, 0)


def test_webp_and_tiff_including_multipage():
  assert _decoded(_encode(_halves(), "WEBP", lossless=True))[8, 2, 0] == 200
  buf = io.BytesIO()
  first = Image.new("RGB", (16, 16), (0, 200, 0))
  first.save(buf, format="TIFF", save_all=True, append_images=[Image.new("RGB", (16, 16), 0)])
  assert tuple(_decoded(buf.getvalue())[4, 4]) == (0, 200, 0)


def test_resize_methods():
  wide = _halves(64, 16)
  squash = _decoded(_encode(wide, "PNG"))
  crop = _decoded(_encode(wide, "PNG"), DecodeSettings(size=16, resize="center_crop"))
  # Squash keeps both halves; a centre crop of a 4:1 image shows the middle quarter, half of each.
  assert squash[8, 1, 0] == 200 and squash[8, 14, 2] == 200
  assert crop[8, 1, 0] == 200 and crop[8, 14, 2] == 200
  # A 4:1 image that is red in its outer quarters: the crop shows no red.
  pixels = np.full((16, 64, 3), 255, np.uint8)
  pixels[:, :16] = pixels[:, 48:] = (255, 0, 0)
  crop = _decoded(_encode(Image.fromarray(pixels), "PNG"), DecodeSettings(size=16, resize="center_crop"))
  assert crop[:, 2:-2, 1].min() == 255


def test_large_jpeg_is_decoded_small_and_antialiased():
  stripes = np.zeros((1200, 1600, 3), np.uint8)
  stripes[:, ::2] = 255  # 1-pixel stripes: aliasing would show them, a good filter averages them.
  out = _decoded(_encode(Image.fromarray(stripes), "JPEG", quality=95))
  assert 100 < out.mean() < 155 and out.std() < 20


def test_settings_are_checked():
  with pytest.raises(InputError, match="resize method"):
    DecodeSettings(resize="stretch")
  with pytest.raises(InputError, match="size"):
    DecodeSettings(size=0)
