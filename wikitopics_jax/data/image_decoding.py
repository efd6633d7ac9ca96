"""Arbitrary image bytes -> an RGB uint8 array of a fixed size, or a rejection with a reason.

`decode_image` never raises on bad bytes: every input is either converted or returned as a
`Rejection` whose `reason` is one of `REASONS` (callers count them). What "converted correctly" means:

* Colour: any Pillow mode becomes RGB. Transparency (alpha channels, palette or grey-level
  `transparency`) is composited on a white background, as the images appear on Wikipedia pages.
  CMYK/YCbCr use Pillow's conversion. 16-bit images (mode I;16*, and I) are scaled by 1/257, so
  65535 -> 255 regardless of content (a dark 16-bit image stays dark); float images (F) are taken as
  0..1 if their maximum is <= 1, else as 0..255, and clipped.
* Orientation: the EXIF orientation tag is applied (a photo taken sideways stands upright); a broken
  EXIF block is ignored, not a reason to reject.
* Animated GIF/WebP and multi-page TIFF: the first frame/page.
* Formats: only raster formats Pillow reads natively are tried (`RASTER_FORMATS`); SVG, HTML (an
  error page saved under an image's name), PDF and everything else are rejected. Never EPS: Pillow
  would run Ghostscript on it.
* Size limits: an image whose header declares more than `max_pixels` pixels is rejected before any
  pixel is decoded (decompression bombs); smaller than `min_side` pixels on a side is rejected too.

Resizing (`DecodeSettings.resize`):
  "squash" (default): the whole image is scaled to the target size, ignoring its aspect ratio, like
    the thesis's Keras input pipeline: nothing is cut off (a map or a diagram stays complete).
  "center_crop": scaled so the shorter side fits, then the centre is cut out (no distortion).
Filter: Pillow's bicubic, which widens its kernel with the scale factor (antialiased, no moire when
shrinking a 4000-px photo to 64 px); large images are first box-reduced by an integer factor
(``reducing_gap=3``) and JPEGs are decoded at a reduced DCT scale (``draft``) that still keeps at
least 3x the target size. Deterministic for a given Pillow version.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import warnings

import numpy as np
from PIL import Image
from PIL import ImageOps

from wikitopics_jax.errors import InputError

RASTER_FORMATS = ("JPEG", "MPO", "PNG", "GIF", "WEBP", "TIFF", "BMP", "ICO", "PPM", "JPEG2000",
                  "AVIF")
RESIZE_METHODS = ("squash", "center_crop")

# Why an input was rejected (counted by callers; stable names, they appear in manifests).
REASONS = {
    "empty": "no bytes",
    "html": "an HTML or XML page, not an image (e.g. an error page saved under the image's name)",
    "svg": "an SVG drawing: vector, not raster",
    "unidentified": "not a raster format this decoder reads",
    "truncated": "the file ends before the image data does",
    "too_many_pixels": "more pixels than max_pixels (decompression bomb guard)",
    "too_small": "a side shorter than min_side",
    "unsupported_mode": "a pixel format that cannot be converted to RGB",
    "corrupt": "the decoder failed on the image data",
}

_DEFAULT_MAX_PIXELS = 100_000_000  # Above the largest ordinary photos; big maps are fetched as thumbnails.
_SNIFF_BYTES = 1024
# The magic numbers of JPEG, PNG, GIF, TIFF (both byte orders) and BMP.
_RASTER_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF8", b"II*\x00", b"MM\x00*", b"BM")


@dataclasses.dataclass(frozen=True)
class DecodeSettings:
  """size: output side in pixels (square); resize: one of `RESIZE_METHODS`; max_pixels: header
  width x height above which an image is rejected (Pillow itself refuses more than twice its
  `Image.MAX_IMAGE_PIXELS`, ~179M, whatever this says); min_side: smallest accepted width or height;
  background: RGB that transparent pixels are composited on."""
  size: int = 64
  resize: str = "squash"
  max_pixels: int = _DEFAULT_MAX_PIXELS
  min_side: int = 1
  background: tuple[int, int, int] = (255, 255, 255)

  def __post_init__(self):
    if not isinstance(self.size, int) or self.size < 1:
      raise InputError(f"image size must be a positive integer, got {self.size!r}")
    if self.resize not in RESIZE_METHODS:
      raise InputError(f"resize method {self.resize!r} is not one of {RESIZE_METHODS}")
    if not isinstance(self.max_pixels, int) or self.max_pixels < 1:
      raise InputError(f"max_pixels must be a positive integer, got {self.max_pixels!r}")
    if not isinstance(self.min_side, int) or self.min_side < 1:
      raise InputError(f"min_side must be a positive integer, got {self.min_side!r}")


@dataclasses.dataclass(frozen=True)
class Rejection:
  """reason: a key of `REASONS`; detail: what exactly was wrong."""
  reason: str
  detail: str

  def __str__(self) -> str:
    return f"{self.reason}: {self.detail}"


def decode_image(data: bytes, settings: DecodeSettings = DecodeSettings()
                 ) -> np.ndarray | Rejection:
  """(size, size, 3) uint8 RGB pixels, or a Rejection. Never raises on bad input bytes."""
  if not data:
    return Rejection("empty", "0 bytes")
  markup = _sniff_markup(data)
  if markup is not None:
    return markup
  # Pillow's warnings (odd EXIF, palette transparency, its own bomb warning) are about inputs we
  # handle or reject ourselves.
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    try:
      return _decode(data, settings)
    except Image.DecompressionBombError as e:
      return Rejection("too_many_pixels", str(e))
    except (MemoryError, OverflowError) as e:
      return Rejection("too_many_pixels", f"{type(e).__name__}: {e}")
    except Exception as e:  # pylint: disable=broad-except
      # Image plugins fail on hostile bytes with whatever they hit (OSError, SyntaxError,
      # struct.error, IndexError, ...); one bad file must not stop an ingest of millions.
      message = f"{type(e).__name__}: {e}"
      if "truncated" in message.lower() or "broken data stream" in message:
        return Rejection("truncated", message)
      return Rejection("corrupt", message)


def _sniff_markup(data: bytes) -> Rejection | None:
  head = data[:_SNIFF_BYTES].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
  if not head.startswith(b"<"):
    return None
  if b"<svg" in head:
    return Rejection("svg", "an SVG document")
  return Rejection("html", f"markup starting {bytes(head[:40])!r}")


@functools.cache
def _readable_formats() -> tuple[str, ...]:
  Image.init()  # Registers every plugin; Image.open(formats=...) needs them registered.
  return tuple(f for f in RASTER_FORMATS if f in Image.OPEN)


def _decode(data: bytes, settings: DecodeSettings) -> np.ndarray | Rejection:
  try:
    image = Image.open(io.BytesIO(data), formats=_readable_formats())
  except Image.UnidentifiedImageError:
    if data.startswith(_RASTER_SIGNATURES) or data[8:12] == b"WEBP":
      return Rejection("corrupt", f"a broken header after the signature {data[:8]!r}")
    return Rejection("unidentified", f"unknown format, first bytes {data[:8]!r}")
  width, height = image.size
  if width * height > settings.max_pixels:
    return Rejection("too_many_pixels", f"{width}x{height} = {width * height} pixels > "
                     f"{settings.max_pixels}")
  if min(width, height) < settings.min_side:
    return Rejection("too_small", f"{width}x{height}, min_side {settings.min_side}")
  if image.format in ("JPEG", "MPO"):
    # Decode at 1/2, 1/4 or 1/8 scale when that still leaves 3x the target: much faster on photos.
    image.draft("RGB", (3 * settings.size, 3 * settings.size))
  image.load()  # The first frame of an animation or the first page of a TIFF.
  try:
    image = ImageOps.exif_transpose(image)
  except Exception:  # pylint: disable=broad-except
    pass  # A broken EXIF block: keep the pixels as stored.
  rgb = _to_rgb(image, settings.background)
  if isinstance(rgb, Rejection):
    return rgb
  return np.asarray(_resize(rgb, settings), dtype=np.uint8)


def _to_rgb(image: Image.Image, background: tuple[int, int, int]) -> Image.Image | Rejection:
  mode = image.mode
  if mode.startswith("I;16") or mode == "I":
    # 16-bit data: a fixed scale, so brightness does not depend on the image's own range.
    pixels = np.asarray(image, dtype=np.float64)
    image = Image.fromarray(np.clip(np.rint(pixels / 257.0), 0, 255).astype(np.uint8), "L")
    mode = "L"
  elif mode == "F":
    pixels = np.nan_to_num(np.asarray(image, dtype=np.float64))
    scale = 255.0 if pixels.size and pixels.max() <= 1.0 else 1.0
    image = Image.fromarray(np.clip(np.rint(pixels * scale), 0, 255).astype(np.uint8), "L")
    mode = "L"
  has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
  try:
    if has_alpha:
      rgba = image.convert("RGBA")
      canvas = Image.new("RGBA", rgba.size, (*background, 255))
      return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image if mode == "RGB" else image.convert("RGB")
  except ValueError as e:
    return Rejection("unsupported_mode", f"mode {mode}: {e}")


def _resize(image: Image.Image, settings: DecodeSettings) -> Image.Image:
  size = (settings.size, settings.size)
  box = None
  if settings.resize == "center_crop":
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) / 2, (height - side) / 2
    box = (left, top, left + side, top + side)
  if image.size == size and box is None:
    return image
  return image.resize(size, Image.Resampling.BICUBIC, box=box, reducing_gap=3.0)
