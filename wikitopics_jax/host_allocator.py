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
`wikitopics` and the benchmark call `apply_flag()` first thing. `--host_malloc=auto` (the default)
keeps freed memory only where JAX's default backend will be the CPU (`cpu_backend_expected`): on
GPU/TPU hosts XLA's temporaries live on the device, and the host would only hold its peak heap for
nothing. `--host_malloc=keep` applies the settings everywhere, `--host_malloc=system` nowhere.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import os
import resource

from absl import flags

HOST_MALLOC = flags.DEFINE_enum(
    "host_malloc", "auto", ["auto", "keep", "system"],
    "'keep': glibc keeps freed memory (no mmap/munmap per XLA CPU step; the process keeps its peak "
    "heap); 'system': glibc's defaults; 'auto': 'keep' where JAX's backend will be the CPU "
    "(JAX_PLATFORMS starts with cpu, or no accelerator plugin is installed), else 'system'.")

# Import names of JAX's accelerator plugins: libtpu, and the namespace package that the CUDA / ROCm
# plugins (jax-cuda12-plugin, ...) install their PJRT modules into.
_ACCELERATOR_PLUGINS = ("libtpu", "jax_plugins")

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


def cpu_backend_expected() -> bool:
  """Whether JAX's default backend will be the CPU, decided without starting JAX (which would start
  its threads): the first of JAX_PLATFORMS when set, else whether no accelerator plugin is
  installed. A plugin without a device (JAX then falls back to the CPU) reads as an accelerator."""
  platforms = os.environ.get("JAX_PLATFORMS", "").strip()
  if platforms:
    return platforms.split(",")[0].strip().lower() == "cpu"
  return not any(importlib.util.find_spec(name) is not None for name in _ACCELERATOR_PLUGINS)


def apply_flag() -> bool:
  """`keep_freed_memory()` as --host_malloc says (see the module docstring); True when the settings
  are in effect."""
  mode = HOST_MALLOC.value
  if mode == "system" or (mode == "auto" and not cpu_backend_expected()):
    return False
  return keep_freed_memory()
