r"""configs/tiny.py with the model of the training-machinery tests (tests/toy_model.py).

In-process: `toy_config.get_config(data_dir)`. In a subprocess, with the repository on PYTHONPATH:

  wikitopics train --config tests/toy_config.py:/path/to/dataset --workdir /tmp/toy

Loading this file registers the toy model in that process.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs"))

import tiny  # pylint: disable=g-import-not-at-top,wrong-import-position

from tests import toy_model  # pylint: disable=g-import-not-at-top,wrong-import-position


def get_config(arg=None):
  c = tiny.get_config(arg)
  c.model.name = toy_model.training_model()
  return c
