"""`python -m wikitopics_jax.bench`: see `cli`."""

from absl import app

from wikitopics_jax.bench import cli

# Grain's worker processes re-import __main__: nothing may run at import time.
if __name__ == "__main__":
  app.run(cli.main)
