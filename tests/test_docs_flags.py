"""Every flag that README.md and docs/*.md show on a `wikitopics <command>` line exists and is one
of that command's flags (main.COMMAND_FLAGS), and every --config.* override there parses against
the config that line names. A stale flag fails with file:line."""

from __future__ import annotations

import glob
import os
import re
import shlex

import pytest
from absl import app
from absl import flags
from ml_collections import config_flags

from wikitopics_jax import configlib
from wikitopics_jax import main
from wikitopics_jax.bench import cli as bench_cli
from wikitopics_jax.errors import InputError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = [os.path.join(REPO, "README.md")] + sorted(glob.glob(os.path.join(REPO, "docs", "*.md")))

# `wikitopics <command>`, `.venv/bin/wikitopics <command>`, `python -m wikitopics_jax.main <command>`;
# `python -m wikitopics_jax.bench` is the bench command's own program.
_COMMAND = re.compile(r"(?:(?<![\w-])wikitopics(?![\w-])|python3? -m wikitopics_jax\.main)[ \t]+"
                      r"(?P<command>\w+)|python3? -m wikitopics_jax\.bench(?![\w.])")
# Where a command line ends inside a code block: another command, a shell operator or a comment.
_END = re.compile(r"&&|\s#|\n")
_FLAG = re.compile(r"(?<![\w-])--(?P<name>[A-Za-z_][\w.]*)")
# The generic override in usage lines (`[--config.key=value ...]`), not a key of any config.
PLACEHOLDER_OVERRIDES = {"config.key"}
# Command lines whose overrides are only valid after the reader follows the page: docs/losses.md
# walks through registering an example loss, then trains with it.
TUTORIAL_OVERRIDES = {("docs/losses.md", "--config.loss.tau=0.5")}


def _code_regions(text: str):
  """(offset, code) of each fenced block (backslash-continued lines joined) and inline code span."""
  fenced = list(re.finditer(r"^```[^\n]*\n(.*?)^```", text, flags=re.M | re.S))
  for m in fenced:
    # A continuation becomes spaces of the same length, so offsets still give the line.
    yield m.start(1), re.sub(r"\\\n", "  ", m.group(1))
  outside, last = [], 0
  for m in fenced:
    outside.append((last, text[last:m.start()]))
    last = m.end()
  outside.append((last, text[last:]))
  for base, chunk in outside:
    for span in re.finditer(r"`([^`]+)`", chunk):
      yield base + span.start(1), span.group(1).replace("\n", " ")


def command_lines(path: str):
  """(line number, command, the command line's text after the command, line_of) of every command
  line; line_of(i) is the line number of character i of that text."""
  with open(path, encoding="utf-8") as f:
    text = f.read()
  for offset, code in _code_regions(text):
    matches = list(_COMMAND.finditer(code))
    for i, m in enumerate(matches):
      stop = matches[i + 1].start() if i + 1 < len(matches) else len(code)
      end = _END.search(code, m.end(), stop)
      rest = code[m.end():end.start() if end else stop]
      start = offset + m.end()
      yield (text.count("\n", 0, offset + m.start()) + 1, m.group("command") or "bench-program",
             rest, lambda i, start=start: text.count("\n", 0, start + i) + 1)


def _absl_flags() -> set[str]:
  """The flags absl itself defines (--flagfile, --verbosity, --help, ...): every program has them."""
  app.define_help_flags()
  return {name for module, defined in flags.FLAGS.flags_by_module_dict().items()
          if module.startswith("absl.") for flag in defined for name in (flag.name, flag.short_name)
          if name}


def _allowed(command: str) -> set[str]:
  if command == "bench-program":  # python -m wikitopics_jax.bench: bench's flags and --host_malloc.
    return set(bench_cli.FLAG_NAMES) | {"out", "host_malloc"} | _absl_flags()
  return set(main.COMMAND_FLAGS[command]) | set(main.COMMON_FLAGS) | _absl_flags()


def _flag_name(name: str, allowed: set[str]) -> str:
  """--noflag is the negation of boolean --flag."""
  if name not in allowed and name.startswith("no") and name[2:] in allowed:
    if flags.FLAGS[name[2:]].boolean:
      return name[2:]
  return name


def _check_overrides(where: str, rest: str) -> None:
  """Parses the line's --config and --config.* flags as `wikitopics` would, then configlib.check."""
  try:
    tokens = shlex.split(rest)
  except ValueError:
    tokens = rest.split()
  tokens = [t.strip("[]()") for t in tokens]
  config, overrides = None, []
  for i, token in enumerate(tokens):
    if token.startswith("--config="):
      config = token.split("=", 1)[1]
    elif token == "--config" and i + 1 < len(tokens):
      config = tokens[i + 1]
    elif token.startswith("--config.") and token.split("=", 1)[0][2:] not in PLACEHOLDER_OVERRIDES:
      overrides.append(token if "=" in token or i + 1 >= len(tokens) or tokens[i + 1].startswith("-")
                       else f"{token}={tokens[i + 1]}")
  if not overrides or any((where.split(":")[0], o) in TUTORIAL_OVERRIDES for o in overrides):
    return
  if config is not None and "<" in config:
    return  # A placeholder (configs/experiments.py:<row>): no one config to check against.
  values = flags.FlagValues()
  argv = ["wikitopics", *overrides]
  if config is None:
    # Overrides without a config file: check them against the base every config starts from.
    holder = config_flags.DEFINE_config_dict("config", configlib.base_config(), flag_values=values,
                                             sys_argv=argv)
  else:
    path = os.path.join(REPO, config)
    argv.insert(1, f"--config={path}")
    holder = config_flags.DEFINE_config_file("config", None, flag_values=values, sys_argv=argv)
  try:
    values(argv)
    configlib.check(holder.value)
  except (flags.Error, KeyError, AttributeError, OSError, InputError) as e:
    first = " ".join(str(e.args[0] if e.args else e).split())
    pytest.fail(f"{where}: {' '.join(overrides)} (config {config or 'base_config()'}): {first}")


@pytest.mark.parametrize("path", DOCS, ids=lambda p: os.path.relpath(p, REPO))
def test_every_documented_flag_exists_for_its_command(path):
  found = 0
  name_of_file = os.path.relpath(path, REPO)
  for line, command, rest, line_of in command_lines(path):
    where = f"{name_of_file}:{line}"
    if command != "bench-program" and command not in main.COMMANDS:
      pytest.fail(f"{where}: `wikitopics {command}` is not a command; commands: {main.COMMANDS}")
    allowed = _allowed(command)
    for m in _FLAG.finditer(rest):
      found += 1
      name = _flag_name(m.group("name").rstrip("."), allowed)
      base = name.split(".", 1)[0]
      if base not in allowed:
        kind = "is not a flag of this command" if base in flags.FLAGS else "does not exist"
        own = main.COMMAND_FLAGS.get(command, bench_cli.FLAG_NAMES)
        pytest.fail(f"{name_of_file}:{line_of(m.start())}: `{command}` --{name} {kind}; its flags: "
                    f"{sorted(own)}")
    _check_overrides(where, rest)
  if os.path.basename(path) in ("README.md", "real_data.md"):
    assert found > 10, f"{path}: the command lines were not found"


def test_the_scanner_finds_continued_and_module_forms(tmp_path):
  doc = tmp_path / "doc.md"
  doc.write_text("Intro `wikitopics evaluate --ema` and\n\n```\n"
                 "python -m wikitopics_jax.main ingest --data_dir=d \\\n"
                 "    --extensions=png  # --nope\n"
                 "wikitopics train --config configs/demo.py \\\n"
                 "    --config.loss.name=focal && ls --all\n"
                 "```\n")
  lines = [(line, command, [(m.group("name"), line_of(m.start())) for m in _FLAG.finditer(rest)])
           for line, command, rest, line_of in command_lines(str(doc))]
  assert sorted(lines) == [(1, "evaluate", [("ema", 1)]),
                           (4, "ingest", [("data_dir", 4), ("extensions", 5)]),
                           (6, "train", [("config", 6), ("config.loss.name", 7)])]
