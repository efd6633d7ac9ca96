"""host_allocator: with glibc keeping freed memory, an XLA CPU program stops faulting in its
temporary buffer afresh on every call. Page faults are counted by the kernel (getrusage), in fresh
processes, since the settings must precede JAX's threads."""

import json
import statistics
import subprocess
import sys

import pytest
from absl import flags
from absl.testing import flagsaver

from wikitopics_jax import host_allocator

# A program with a 64 MiB temporary (the barrier keeps XLA from fusing it away); prints the minor
# page faults of each of the last 20 of 40 calls, in the mode given by argv[1].
_PROBE = r"""
import json, sys
from wikitopics_jax import host_allocator
kept = sys.argv[1] == "keep" and host_allocator.keep_freed_memory()
import jax, jax.numpy as jnp
from jax import lax

@jax.jit
def program(x):
  return (lax.optimization_barrier(jnp.sin(x)) * 2.0).sum()

x = jnp.ones((4096, 4096), jnp.float32)
faults = []
for call in range(40):
  before = host_allocator.minor_page_faults()
  program(x).block_until_ready()
  faults.append(host_allocator.minor_page_faults() - before)
print(json.dumps({"kept": kept, "faults": faults[20:]}))
"""
_TEMP_PAGES = 4096 * 4096 * 4 // 4096


def _probe(mode: str) -> dict:
  out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True,
                       check=True, env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"})
  return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_kept_memory_removes_the_per_call_page_faults_of_xla_temporaries():
  system = _probe("system")
  kept = _probe("keep")
  assert kept["kept"]
  # By default every call maps the 64 MiB temporary afresh and touches each of its pages.
  assert min(system["faults"]) > 0.9 * _TEMP_PAGES
  # Kept: the heap holds those pages. It grows for the first calls, more on a busy machine, while
  # freed blocks too fragmented for the next aligned request pile up, then settles (measured: at
  # 7 temporaries' worth under load); after that most calls fault nothing.
  assert statistics.median(kept["faults"]) < 0.05 * _TEMP_PAGES


@pytest.fixture
def keep_calls(monkeypatch):
  """Records calls of keep_freed_memory instead of changing this process's allocator."""
  calls = []
  monkeypatch.setattr(host_allocator, "keep_freed_memory", lambda: calls.append(1) or True)
  return calls


def test_system_flag_leaves_glibc_alone(keep_calls, monkeypatch):
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  with flagsaver.flagsaver(host_malloc="system"):
    assert not host_allocator.apply_flag()
  assert not keep_calls
  assert flags.FLAGS["host_malloc"].default == "auto"


@pytest.mark.parametrize("platforms, plugins, expected", [
    ("cpu", ("libtpu",), True),        # JAX_PLATFORMS decides, plugins or not.
    ("tpu,cpu", (), False),
    ("cuda", (), False),
    ("", (), True),                    # Unset: no accelerator plugin, the CPU backend.
    ("", ("libtpu",), False),
    ("", ("jax_plugins",), False),
])
def test_auto_keeps_freed_memory_on_the_cpu_backend_only(platforms, plugins, expected, keep_calls,
                                                         monkeypatch):
  if platforms:
    monkeypatch.setenv("JAX_PLATFORMS", platforms)
  else:
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
  monkeypatch.setattr(host_allocator.importlib.util, "find_spec",
                      lambda name: object() if name in plugins else None)
  assert host_allocator.cpu_backend_expected() == expected
  with flagsaver.flagsaver(host_malloc="auto"):
    assert host_allocator.apply_flag() == expected
  assert len(keep_calls) == int(expected)
  with flagsaver.flagsaver(host_malloc="keep"):  # Opt-in on any backend.
    assert host_allocator.apply_flag()
  assert len(keep_calls) == int(expected) + 1
