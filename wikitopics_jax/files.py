"""How every output file is written: atomically (a reader, or a crash, sees the old file or the new
one, never half of one; a failed write leaves no temporary behind), and how inputs are fingerprinted."""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator
from typing import IO


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "w", *, encoding: str | None = None) -> Iterator[IO]:
  """`open(path, mode)` that replaces `path` only when the block finishes without an exception.

  The temporary file sits beside the target (same file system, so the rename is atomic), is named by
  the process id (concurrent writers never share one) and gets the umask's permissions like any
  other output.
  """
  if mode not in ("w", "wb"):
    raise ValueError(f"atomic_open writes whole files: mode 'w' or 'wb', not {mode!r}")
  tmp = f"{path}.tmp-{os.getpid()}"
  if encoding is None and mode == "w":
    encoding = "utf-8"
  try:
    with open(tmp, mode, encoding=encoding) as f:
      yield f
      f.flush()
      os.fsync(f.fileno())  # the new content is on disk before the name points at it
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp)
    raise


def sha256(path: str) -> str:
  """Hex SHA-256 of a file, read in 1 MiB blocks."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()
