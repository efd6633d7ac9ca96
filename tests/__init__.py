"""The test suite (docs/testing.md)."""


def xla_flags(devices: int = 8) -> str:
  """XLA_FLAGS of the test processes and of the CLI subprocesses they start (one set of flags, so
  that a run resumed in-process continues a subprocess's run bitwise): `devices` fake CPU devices,
  and LLVM at -O0. The tests' programs are tiny, so compiling them is most of their cost, and -O0
  compiles them faster (docs/testing.md)."""
  return f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0"
