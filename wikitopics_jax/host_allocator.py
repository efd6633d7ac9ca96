"""Host memory allocation for XLA's CPU backend: keep freed memory in the process.

XLA's CPU runtime allocates each program's temporary buffer (hundreds of MB for an EfficientNet-B0
train step) with `malloc` on every execution and frees it afterwards. glibc serves blocks that large
with a fresh `mmap` and returns them with `munmap`, so every step faults in all of it as new pages,
which the kernel zeroes: a large share of a CPU train step's time went to page faults
(tests/test_host_allocator.py counts them). PyTorch's tensors are mostly under glibc's mmap
threshold and are recycled from the heap.

`keep_freed_memory()` makes glibc serve large blocks from one heap and never give it back
(`mallopt`: no mmap, no trimming, one arena so that XLA's worker threads use that heap too). The
cost: the process keeps its peak heap until it exits, and that heap holds a few temporaries' worth,
since an aligned request does not always fit the fragment a freed one left
(tests/test_host_allocator.py). It must run before JAX starts its threads (before the first
computation): threads that already have a malloc arena keep it.
`wikitopics` and the benchmark call it first thing; `--host_malloc=system` leaves glibc alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import resource

from absl import flags

HOST_MALLOC = flags.DEFINE_enum(
    "host_malloc", "keep", ["keep", "system"],
    "'keep': glibc keeps freed memory (no mmap/munmap per XLA CPU step; the process keeps its peak "
    "heap); 'system': glibc's defaults.")

# glibc's <malloc.h> parameter numbers.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_NEVER_TRIM = -1  # mallopt(3): "-1 disables trimming completely" (any int would cap it at 2 GiB).

_libc = None


def keep_freed_memory() -> bool:
  """Applies the settings above; False (and nothing changed) where the C library is not glibc."""
  global _libc
  if _libc is not None:
    return True
  path = ctypes.util.find_library("c")
  if path is None:
    return False
  libc = ctypes.CDLL(path)
  if not hasattr(libc, "mallopt") or not hasattr(libc, "gnu_get_libc_version"):
    return False  # mallopt exists in other C libraries with other parameter numbers.
  for parameter, value in ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _NEVER_TRIM), (_M_ARENA_MAX, 1)):
    if libc.mallopt(parameter, value) != 1:
      return False
  _libc = libc
  return True


def is_keeping() -> bool:
  return _libc is not None


def minor_page_faults() -> int:
  """This process's minor page faults so far (getrusage)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def apply_flag() -> bool:
  """`keep_freed_memory()` unless --host_malloc=system; True when the settings are in effect."""
  if HOST_MALLOC.value == "system":
    return False
  return keep_freed_memory()
