"""A TensorFlow Datasets builder over an ingested dataset directory (no TensorFlow needed).

For users whose tooling speaks TFDS: `prepare(source_dir, tfds_data_dir)` turns a dataset made by
`ingest` (or `synthetic`) into a TFDS dataset in ArrayRecord format, after which

    tfds.data_source("wikitopics", data_dir=tfds_data_dir, split="train")

gives random access to {"image": (S, S, 3) uint8, "labels": (L,) uint8, "labels_hier": (L,) uint8,
"id", "url", "page_title", "caption": bytes}, in any process, with or without this module imported
(TFDS then reads the prepared files), and Grain can read it:
``grain.MapDataset.source(tfds.data_source(...))``. `tfds.load` needs TensorFlow and is not
supported. The training pipeline itself reads the ingested directory directly (`pipeline`); this is
an export.

Builder config: one per (taxonomy version, image size), named like ``v1.3-64px``, made from the
source manifest; the source directory is TFDS's "manual dir". The image feature is stored as PNG
(lossless): without TensorFlow, TFDS can only store images given as encoded bytes, a path or a PIL
image, so raw pixels are PNG-encoded on the way in (NumPy images would need TensorFlow to encode).
"""

from __future__ import annotations

import dataclasses
import io
import os

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from wikitopics_jax.data import manifest as manifest_lib
from wikitopics_jax.data import records
from wikitopics_jax.errors import InputError

NAME = "wikitopics"


@dataclasses.dataclass(eq=False)
class WikitopicsConfig(tfds.core.BuilderConfig):
  taxonomy_version: str = "v1.3"
  num_labels: int = 31
  image_size: int = 64


def config_for(manifest: manifest_lib.Manifest) -> WikitopicsConfig:
  size = manifest.image_shape[0]
  return WikitopicsConfig(
      name=f"{manifest.taxonomy.version}-{size}px",
      description=f"Wikipedia images, {size}x{size}, topics of taxonomy {manifest.taxonomy.version}",
      taxonomy_version=manifest.taxonomy.version, num_labels=manifest.taxonomy.num_labels,
      image_size=size)


class Wikitopics(tfds.core.GeneratorBasedBuilder):
  """Wikipedia images with multi-label topics (flat and hierarchical), from an ingested directory."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First version."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = "The manual dir is a dataset directory made by `wikitopics ingest`."

  # wikitopics_jax is a namespace package (no __init__.py), which TFDS's importlib.resources lookup
  # of a builder's source directory cannot resolve: say where it is.
  pkg_dir_path = epath.Path(os.path.dirname(os.path.abspath(__file__)))

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:  # pylint: disable=invalid-overridden-method
    return epath.Path(os.path.abspath(__file__))

  def __init__(self, *, label_names: tuple[str, ...] = (), **kwargs):
    self._label_names = tuple(label_names)
    super().__init__(**kwargs)

  @classmethod
  def _get_builder_name(cls) -> str:  # pylint: disable=arguments-differ
    return NAME

  def _info(self) -> tfds.core.DatasetInfo:
    config: WikitopicsConfig = self.builder_config
    size, num_labels = config.image_size, config.num_labels
    # DatasetInfo directly: `dataset_info_from_configs` wants metadata files beside the module.
    return tfds.core.DatasetInfo(
        builder=self,
        description="Wikipedia (WIT) images with multi-label topics, flat and hierarchical.",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(size, size, 3), encoding_format="png"),
            "labels": tfds.features.Tensor(shape=(num_labels,), dtype=np.uint8),
            "labels_hier": tfds.features.Tensor(shape=(num_labels,), dtype=np.uint8),
            "id": tfds.features.Text(),
            "url": tfds.features.Text(),
            "page_title": tfds.features.Text(),
            "caption": tfds.features.Text(),
        }),
        metadata=tfds.core.MetadataDict(label_names=list(self._label_names),
                                        taxonomy_version=config.taxonomy_version),
        homepage="https://github.com/google-research-datasets/wit",
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    source = os.fspath(dl_manager.manual_dir)
    manifest = manifest_lib.read(source)
    expected = config_for(manifest)
    if (expected.taxonomy_version, expected.image_size, expected.num_labels) != (
        self.builder_config.taxonomy_version, self.builder_config.image_size,
        self.builder_config.num_labels):
      raise InputError(f"{source}: holds {expected.name} data, the builder config is "
                       f"{self.builder_config.name}")
    return {name: self._generate_examples(source, manifest, name) for name in manifest.splits}

  def _generate_examples(self, source: str, manifest: manifest_lib.Manifest, split: str):
    import grain  # pylint: disable=g-import-not-at-top
    info = manifest.split(split)
    if not info.files:
      return
    data = grain.sources.ArrayRecordDataSource(manifest_lib.split_paths(source, info))
    for index in range(len(data)):
      example = records.decode_record(data[index], where=f"{source}:{split}:{index}")
      buf = io.BytesIO()
      Image.fromarray(example["image"]).save(buf, format="PNG")
      yield example["id"], {
          "image": buf.getvalue(),  # Encoded bytes: TFDS cannot encode numpy without TensorFlow.
          "labels": example["labels"],
          "labels_hier": example["labels_hier"],
          "id": example["id"],
          **{k: example.get(k, "") for k in ("url", "page_title", "caption")},
      }


def prepare(source_dir: str, tfds_data_dir: str) -> tfds.core.DatasetBuilder:
  """Builds the TFDS dataset from an ingested directory (skipped if already prepared)."""
  manifest = manifest_lib.read(source_dir)
  builder = Wikitopics(config=config_for(manifest), data_dir=tfds_data_dir,
                       label_names=manifest.taxonomy.labels)
  builder.download_and_prepare(
      file_format="array_record",
      download_config=tfds.download.DownloadConfig(manual_dir=os.path.abspath(source_dir)))
  return builder
