"""The `wikitopics` command line: one-line errors with exit 2 for bad flags and configs (through the
real command line), each command's own flags, the ingest filter flags, quiet library logging."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys

import pytest
from absl import flags
from absl import logging as absl_logging
from absl.testing import flagsaver
from PIL import Image

from tests import ingest_inputs
from wikitopics_jax import main
from wikitopics_jax.data import manifest as manifest_lib
from wikitopics_jax.data import wit
from wikitopics_jax.errors import InputError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "tiny.py")


def _cli(*args: str) -> subprocess.Popen:
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  return subprocess.Popen([sys.executable, "-m", "wikitopics_jax.main", *args], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_bad_flags_and_configs_are_one_line_and_exit_2(tmp_path):
  workdir = str(tmp_path / "workdir")  # Must stay absent: each run fails before any work.
  train = ["train", f"--config={TINY}:{tmp_path / 'no_data'}", f"--workdir={workdir}"]
  cases = {  # (argv, words the one line must hold)
      "unknown config key": (train + ["--config.los.name=focal"], ["--config.los.name", "'los'"]),
      "bad value type": (train + ["--config.optimizer.learning_rate=abc"],
                         ["--config.optimizer.learning_rate=abc", "abc"]),
      "missing config file": (["train", "--config=configs/nope.py", f"--workdir={workdir}"],
                              ["configs/nope.py", "No such file"]),
      "unknown loss": (train + ["--config.loss.name=nope"], ["config.loss.name='nope'", "focal"]),
      "unknown model": (train + ["--config.model.name=nope"],
                        ["config.model.name='nope'", "efficientnet_b0"]),
      # These three fail before any config loads or JAX imports: a fraction of a second each.
      "flag of another command": (["stats", "--data_dir=x", "--extensions=png"],
                                  ["--extensions", "wikitopics stats", "--data_dir"]),
      "unknown flag": (["stats", "--data_dir=x", "--no_such_flag=1"], ["no_such_flag"]),
      "missing flag": (["train", f"--workdir={workdir}"], ["train needs --config"]),
  }
  # Started together: each is mostly interpreter and import time.
  procs = {name: _cli(*argv) for name, (argv, _) in cases.items()}
  for name, proc in procs.items():
    output, _ = proc.communicate(timeout=300)
    lines = output.strip().splitlines()
    assert proc.returncode == 2, (name, output[-3000:])
    assert len(lines) == 1, (name, output[-3000:])
    assert lines[0].startswith("error: "), (name, lines[0])
    for word in cases[name][1]:
      assert word in lines[0], (name, word, lines[0])
  assert not os.path.exists(workdir)


def test_every_flag_belongs_to_a_command_or_to_all():
  ours = {flag.name for module, defined in flags.FLAGS.flags_by_module_dict().items()
          if module.startswith("wikitopics_jax") for flag in defined}
  listed = {name for names in main.COMMAND_FLAGS.values() for name in names}
  assert ours == listed | set(main.COMMON_FLAGS)
  assert set(main.COMMAND_FLAGS) == set(main.COMMANDS)
  assert not listed & set(main.COMMON_FLAGS)


def _parsed(*args: str) -> None:
  flags.FLAGS(["wikitopics", *args])


def test_a_flag_of_another_command_names_the_valid_ones():
  with flagsaver.flagsaver():
    _parsed("--keep_unlabelled", "--data_dir=x")
    main._check_command_flags("ingest")  # pylint: disable=protected-access
    with pytest.raises(InputError, match=r"--keep_unlabelled is not a flag of `wikitopics stats`; "
                       r"its flags: --data_dir --split --out --resampling"):
      main._check_command_flags("stats")  # pylint: disable=protected-access


def _png_bytes() -> bytes:
  buf = io.BytesIO()
  Image.new("RGB", (20, 20), (10, 200, 30)).save(buf, format="PNG")
  return buf.getvalue()


def test_ingest_flags_keep_pngs_unlabelled_and_other_mime_types(tmp_path):
  inputs = ingest_inputs.make_inputs(str(tmp_path / "in"), num_images=6)
  png = wit.file_from_title("Real_drawing.png")
  path = os.path.join(inputs.image_dir, png.relative_path)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as f:
    f.write(_png_bytes())
  with open(inputs.labels, "a", encoding="utf-8") as f:
    f.write(json.dumps({"id": "3001", "title": "File:Real drawing.png", "url": png.url(),
                        "labels": ["Art"]}) + "\n")
  data_dir = str(tmp_path / "data")
  proc = _cli("ingest", f"--data_dir={data_dir}", f"--labels={inputs.labels}",
              f"--wit_tsv={inputs.wit_tsv}", f"--image_dirs={inputs.image_dir}", "--image_size=16",
              "--num_workers=1", "--extensions=jpg,png", "--mime_types=", "--keep_unlabelled")
  output, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, output[-3000:]
  info = manifest_lib.read(data_dir).info
  settings = info["settings"]
  assert (settings["extensions"], settings["mime_types"], settings["keep_unlabelled"]) == (
      ["jpg", "png"], [], True)
  # Kept now: the PNG, the unlabelled JPEG and the JPEG whose WIT row says image/gif; the garbage
  # "Drawing.png" passes the extension filter and fails to decode instead.
  filtered = info["counts"]["filtered"]
  assert not {"extension", "mime_type", "no_label"} & set(filtered), filtered
  assert info["counts"]["examples"] == inputs.expected_examples + 3


def test_ingest_refuses_flags_of_its_other_mode():
  with flagsaver.flagsaver():
    _parsed("--data_dir=x", "--human_annotations=a.parquet", "--extensions=png")
    with pytest.raises(InputError, match="--extensions does not apply with --human_annotations"):
      main._ingest()  # pylint: disable=protected-access
  with flagsaver.flagsaver():
    _parsed("--data_dir=x", "--labels=l.jsonl", "--geology_and_fossils=drop")
    with pytest.raises(InputError, match="--geology_and_fossils does not apply without"):
      main._ingest()  # pylint: disable=protected-access


def test_fetch_passes_its_flags(monkeypatch):
  from wikitopics_jax.data import thumbnails  # pylint: disable=g-import-not-at-top
  calls = []
  monkeypatch.setattr(thumbnails, "run_fetch", lambda out, **kwargs: calls.append((out, kwargs)))
  with flagsaver.flagsaver():
    _parsed("--out=thumbs", "--user_agent=me/1 (x; y)", "--labels=a.jsonl", "--extensions=jpg",
            "--max_workers=8", "--requests_per_second=40")
    main._fetch()  # pylint: disable=protected-access
  (out, kwargs), = calls
  assert out == "thumbs"
  assert (kwargs["extensions"], kwargs["max_workers"], kwargs["requests_per_second"]) == (
      ["jpg"], 8, 40.0)


@pytest.fixture
def logging_state():
  """Saves and restores what quiet_library_logging changes (other tests share these loggers)."""
  names = ("absl", "", *main._NOISY_LIBRARIES)  # pylint: disable=protected-access
  loggers = [logging.getLogger(n) for n in names]
  saved = [(lg, lg.level, list(lg.filters)) for lg in loggers]
  verbosity = absl_logging.get_verbosity()
  for lg in loggers:
    lg.filters.clear()  # e.g. evaluate_job's own filter of two Orbax notices, from earlier tests.
  yield
  for lg, level, filters in saved:
    lg.setLevel(level)
    lg.filters[:] = filters
  absl_logging.set_verbosity(verbosity)


def test_library_logging_is_quiet_by_default_and_errors_still_show(tmp_path, caplog, logging_state):
  del logging_state
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  caplog.set_level(logging.INFO)

  def read_only_manager():
    caplog.clear()
    ocp.CheckpointManager(str(tmp_path), options=ocp.CheckpointManagerOptions(read_only=True))
    return [r.getMessage() for r in caplog.records]

  assert any("read only" in m for m in read_only_manager())  # What Orbax says unasked.
  main.quiet_library_logging()
  assert read_only_manager() == []
  assert absl_logging.get_verbosity() == absl_logging.WARNING
  absl_logger = logging.getLogger("absl")
  orbax_file = ocp.__file__
  caplog.clear()
  for level, pathname, message in ((logging.ERROR, orbax_file, "orbax error"),
                                   (logging.WARNING, orbax_file, "orbax warning"),
                                   (logging.WARNING, main.__file__, "our warning")):
    absl_logger.handle(absl_logger.makeRecord("absl", level, pathname, 1, message, (), None))
  assert [r.getMessage() for r in caplog.records] == ["orbax error", "our warning"]
