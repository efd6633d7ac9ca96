"""The one exception type for bad user input (files, records, labels, config keys).

`main` catches it, prints its one-line message and exits non-zero; everything else is a bug and
keeps its traceback.
"""


class InputError(ValueError):
  """Bad input from the user: the message names the file, record, label or config key at fault."""
