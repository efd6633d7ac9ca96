"""`python -m wikitopics_jax.bench`: see `cli`."""

from absl import app
from absl import flags

from wikitopics_jax.bench import cli

_OUT = flags.DEFINE_string("out", None, "The JSON report (default bench.json).")

# Grain's worker processes re-import __main__: nothing may run at import time.
if __name__ == "__main__":
  app.run(lambda argv: cli.main(argv, out=_OUT.value))
