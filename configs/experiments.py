r"""The thesis's experiments (Bernat 2023, Tables 4.1-4.6 and 5.1) and a few extra rows, one config each.

  wikitopics train --config=configs/experiments.py:table4_3_focal --workdir=workdir/sweep/table4_3_focal
  wikitopics train --config=configs/experiments.py:table4_3_focal:smoke --workdir=workdir/smoke/...

The argument is a row name (see `ROWS`), optionally followed by ":smoke". config_flags splits the
`--config` value at its first colon only, so "table4_3_focal:smoke" reaches `get_config` whole. As in
every config file, a further ":loss=<name>" part replaces the row's loss by that loss with its defaults
(`configlib.loss_argument`), e.g. "table4_2_undersampling:smoke:loss=focal".

Scales:
- full (no suffix): the thesis's setup (section 3.2.1), as configs/thesis_b2_64.py: EfficientNet-B2 at
  64x64, thesis head, batch 512, Adam 1e-3, 15 epochs, hierarchical labels, the checkpoint with the
  lowest validation loss. Rows with ImageNet initialisation use EfficientNet-Lite0 instead (the thesis
  used Keras's ImageNet B2; we ship ImageNet weights for Lite0/1/2 only, docs/pretrained.md). The
  data defaults to the synthetic set at 64x64; point a row at real data with the overrides of
  docs/real_data.md.
- smoke: configs/demo.py's setup (the embedded synthetic data at 32x32, a width/depth-halved B0, batch
  128) for SMOKE_EPOCHS epochs (Lite0 rows: SMOKE_EPOCHS_LITE0): a row runs in a few minutes on 2 CPU
  cores. It checks that every row runs and shows the direction of effects on easy data; it is not a
  reproduction.

Deviations from the thesis, all forced by what we can run:
- B2 rows start from random weights and train all layers. The thesis froze an ImageNet B2 for Tables
  4.1-4.3 (only its two head layers trained); a frozen random backbone would measure nothing. The
  thesis's frozen-ImageNet protocol is row `table4_5_layers_0` (Lite0, head only).
- Lite0 has 157 layers by the Keras count (B2: 339), so Table 4.5's "200" has no Lite0 counterpart;
  its "339" (all) is Lite0's 157. The thesis's last-K counts 0/3/10/70/100 are kept as they are.
- Tables 4.4 and 4.5 trained for up to 30 and 20 epochs in the thesis; every row here trains for 15
  (section 5.1 cites Table 4.4 "for 15 epochs"; the best checkpoint is kept either way).
- Lite0 rows normalise inputs the Lite way ("lite") for both initialisations, so the Table 4.4 arms
  differ in `init` only.

Each row is the base config plus a list of pieces (functions that modify it), so a row differs from
`baseline` in exactly the keys its pieces set (tests/test_experiments.py checks this). `TABLES` lists
the rows of each thesis table with the thesis's labels and, for orientation, its published numbers
with their source. Those were measured on WIT with the thesis's metric (AUC(PR) = Keras's 50-threshold
PR-AUC, not average precision, in the thesis code): compare directions, not values.

`report_split` (a dataset split name) tells launch/sweep.py which split a row is reported on: the test
split (results.json of the training job) or, for Table 5.1, the training split (the sweep then runs
`wikitopics evaluate --split=train` at threshold 0.5 and at the tuned thresholds). The trainer ignores
it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
import importlib.util
import os
from typing import NamedTuple

import ml_collections

from wikitopics_jax import configlib
from wikitopics_jax import losses

SMOKE_SUFFIX = ":smoke"
SMOKE_EPOCHS = 4
# Full-width Lite0 costs about 2.5x the halved B0 per step on CPU; fewer epochs keep a row near 2-3
# minutes (and the ImageNet features learn the synthetic data faster anyway).
SMOKE_EPOCHS_LITE0 = 2

Piece = Callable[[ml_collections.ConfigDict], None]


# ---------------------------------------------------------------------------------------------------
# Scales: the config every row starts from.


def _sibling_config(name: str) -> ml_collections.ConfigDict:
  """get_config() of another file in configs/ (they are files, not a package)."""
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"wikitopics_configs_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def full_scale() -> ml_collections.ConfigDict:
  """The thesis's setup: configs/thesis_b2_64.py."""
  c = _sibling_config("thesis_b2_64")
  c.report_split = c.data.test_split
  return c


def smoke_scale() -> ml_collections.ConfigDict:
  """configs/demo.py's setup, fewer epochs."""
  c = _sibling_config("demo")
  c.report_split = c.data.test_split
  c.num_epochs = SMOKE_EPOCHS
  return c


# ---------------------------------------------------------------------------------------------------
# Pieces. Each sets the keys of one experimental factor.


def flat_data(c: ml_collections.ConfigDict) -> None:
  """Train and evaluate on the heuristics' labels only, without their ancestors (thesis 3.1.2)."""
  c.data.hierarchical = False


def chmcnn(c: ml_collections.ConfigDict) -> None:
  """The hierarchical model: C-HMCNN's MCLoss/MCM with R from the dataset's taxonomy (thesis 3.2.2)."""
  c.loss = losses.config("chmcnn")


def naive_augmentation(c: ml_collections.ConfigDict) -> None:
  """Zoom, rotation, shift and flip of every training image."""
  c.data.augment = "naive"


def heuristic_undersampling(c: ml_collections.ConfigDict) -> None:
  """Thesis Algorithm 1, keeping 80% of the images."""
  c.data.resampling.method = "heuristic_under"
  c.data.resampling.keep_fraction = 0.8


def heuristic_oversampling_augmented(c: ml_collections.ConfigDict) -> None:
  """Thesis Algorithm 2, adding 20% copies, and label-dependent augmentation of the copies."""
  c.data.resampling.method = "heuristic_over"
  c.data.resampling.extra_fraction = 0.2
  c.data.augment_duplicates = True


def focal(c: ml_collections.ConfigDict) -> None:
  """Focal loss with the thesis's gamma 2, without alpha (thesis eq. 2.2)."""
  c.loss = losses.config("focal", gamma=2.0)


def class_weights(c: ml_collections.ConfigDict) -> None:
  """Thesis eqs. 2.6-2.7 ("class weights")."""
  c.loss = losses.config("class_weighted_bce")


def pos_weights(c: ml_collections.ConfigDict) -> None:
  """Thesis eqs. 2.8-2.9 (its "sample weights")."""
  c.loss = losses.config("pos_weighted_bce")


def asl(c: ml_collections.ConfigDict) -> None:
  """Asymmetric loss (Ridnik et al. 2021) with its defaults."""
  c.loss = losses.config("asl")


def distribution_balanced(c: ml_collections.ConfigDict) -> None:
  """Distribution-balanced loss (Wu et al. 2020) with its VOC-MLT defaults."""
  c.loss = losses.config("distribution_balanced")


def cosine_schedule(c: ml_collections.ConfigDict) -> None:
  """Cosine decay from Adam's 1e-3 to 0 over the run, instead of the thesis's constant rate."""
  c.schedule.name = "cosine"


def _lite0(c: ml_collections.ConfigDict, init: str) -> None:
  c.model.name = "efficientnet_lite0"
  # ImageNet weights exist for the unscaled model only (the smoke scale halves B0).
  c.model.width_multiplier = None
  c.model.depth_multiplier = None
  c.model.input_normalization = "lite"
  c.init = init


def imagenet_lite0(c: ml_collections.ConfigDict) -> None:
  """EfficientNet-Lite0 with ImageNet weights (stands in for the thesis's ImageNet B2)."""
  _lite0(c, "imagenet")


def random_lite0(c: ml_collections.ConfigDict) -> None:
  """EfficientNet-Lite0 from random weights, inputs normalised as for the ImageNet arm."""
  _lite0(c, "random")


def trainable_layers(num_layers: int) -> Piece:
  """Train the head and the base model's last `num_layers` layers (Keras's count)."""
  def piece(c: ml_collections.ConfigDict) -> None:
    c.trainable_layers = num_layers
  piece.__name__ = f"trainable_layers({num_layers})"
  return piece


def report_on_training_split(c: ml_collections.ConfigDict) -> None:
  """Report metrics on the images the model trained on (thesis Table 5.1)."""
  c.report_split = c.data.train_split


# ---------------------------------------------------------------------------------------------------
# Rows.


# NamedTuples, not dataclasses: this file is loaded by path (config_flags, launch/sweep.py), maybe
# without a sys.modules entry, and dataclasses then fail to resolve the postponed annotations.
class Row(NamedTuple):
  name: str
  pieces: tuple[Piece, ...]
  changes: str  # What the row changes relative to `baseline`, for docs and tables.

  def build(self, smoke: bool = False) -> ml_collections.ConfigDict:
    c = smoke_scale() if smoke else full_scale()
    for piece in self.pieces:
      piece(c)
    if smoke and c.model.name == "efficientnet_lite0":
      c.num_epochs = SMOKE_EPOCHS_LITE0
    return c


TABLE4_5_LAYERS = (0, 3, 10, 70, 100)

_ROW_LIST = (
    Row("baseline", (), "B2, random init, all layers, BCE, hierarchical data, threshold 0.5"),
    Row("table4_1_flat_data", (flat_data,), "flat data"),
    Row("table4_1_chmcnn_flat_data", (chmcnn, flat_data), "C-HMCNN model, flat data"),
    Row("table4_1_chmcnn", (chmcnn,), "C-HMCNN model"),
    Row("table4_2_naive_augmentation", (naive_augmentation,), "naive augmentation"),
    Row("table4_2_undersampling", (heuristic_undersampling,), "heuristic undersampling to 80%"),
    Row("table4_2_oversampling_augmentation", (heuristic_oversampling_augmented,),
        "heuristic oversampling of 20% + augmentation of the copies"),
    Row("table4_3_focal", (focal,), "focal loss, gamma 2"),
    Row("table4_3_class_weights", (class_weights,), "class-weighted BCE"),
    Row("table4_3_pos_weights", (pos_weights,), "positive-weighted BCE (thesis: sample weights)"),
    Row("table4_4_imagenet", (imagenet_lite0,), "Lite0, ImageNet init"),
    Row("table4_4_random", (random_lite0,), "Lite0, random init"),
    *(Row(f"table4_5_layers_{k}", (imagenet_lite0, trainable_layers(k)),
          f"Lite0, ImageNet init, head + last {k} layers trained") for k in TABLE4_5_LAYERS),
    Row("table5_1_training_split", (imagenet_lite0, report_on_training_split),
        "Lite0, ImageNet init, reported on the training split"),
    Row("extra_asl", (asl,), "asymmetric loss"),
    Row("extra_distribution_balanced", (distribution_balanced,), "distribution-balanced loss"),
    Row("extra_chmcnn_imagenet", (imagenet_lite0, chmcnn),
        "Lite0, ImageNet init, C-HMCNN model (R from the taxonomy)"),
    Row("extra_cosine", (cosine_schedule,), "cosine learning-rate decay"),
)
ROWS: dict[str, Row] = {row.name: row for row in _ROW_LIST}


# ---------------------------------------------------------------------------------------------------
# Tables: rows in the thesis's layout, with its labels and its published numbers.

# Metric keys shared with launch/sweep.py's columns. "ap" is the thesis's AUC(PR) column; "*_top" are
# the 5 most frequent labels, "*_rest" the others; P/R/F1 are macro averages.
METRICS = ("ap", "p_all", "r_all", "p_top", "r_top", "p_rest", "r_rest", "f1_all", "f1_top",
           "f1_rest", "micro_f1", "labels_per_image", "trainable_params")

_FACTS = "logged runs of the thesis code, epfl-dlab/wiki_image_classification (held-out test, threshold 0.5)"


class Entry(NamedTuple):
  """One line of a table: a row's results at threshold 0.5 or at its tuned per-class thresholds."""
  row: str
  label: str                      # The thesis's label of the line.
  thresholds: str = "0.5"         # "0.5" or "tuned"
  thesis: Mapping[str, float] = {}  # Read-only: never mutated.
  source: str = ""                # Where the thesis numbers come from.
  cell: tuple[str, str] | None = None  # (grid row, grid column) for the "grid" layout.


class Table(NamedTuple):
  key: str          # "4.1", ..., "extra"
  title: str
  layout: str       # "grid" (AUC(PR) by data x model), "pr" (precision/recall), "f1" (F1 scores)
  entries: tuple[Entry, ...]
  notes: str = ""

  @property
  def rows(self) -> tuple[str, ...]:
    return tuple(dict.fromkeys(e.row for e in self.entries))


def _pr(ap, p_all, r_all, p_top, r_top, p_rest, r_rest) -> dict[str, float]:
  return dict(ap=ap, p_all=p_all, r_all=r_all, p_top=p_top, r_top=r_top, p_rest=p_rest, r_rest=r_rest)


def _facts(f1_all, f1_top, f1_rest, ap, micro_f1) -> dict[str, float]:
  return dict(f1_all=f1_all, f1_top=f1_top, f1_rest=f1_rest, ap=ap, micro_f1=micro_f1)


def _f1(trainable_params, labels_per_image, f1_all, f1_top, f1_rest) -> dict[str, float]:
  return dict(trainable_params=trainable_params, labels_per_image=labels_per_image, f1_all=f1_all,
              f1_top=f1_top, f1_rest=f1_rest)


_T41 = "thesis Table 4.1"
_T42 = "thesis Table 4.2"
_T43 = "thesis Table 4.3"

_TABLE_LIST = (
    Table("4.1", "Flat vs. hierarchical data and model: AUC(PR) on held-out test data", "grid", (
        Entry("table4_1_flat_data", "flat model, flat data",
              thesis=_facts(0.215, 0.478, 0.164, 0.271, 0.456),
              source=f"{_T41}; F1s: {_FACTS}, 'flat model, flat data, all layers, ImageNet init, "
                     "390k test'", cell=("flat data", "flat model")),
        Entry("table4_1_chmcnn_flat_data", "hierarchical model, flat data", thesis=dict(ap=0.179),
              source=_T41, cell=("flat data", "hierarchical model")),
        Entry("baseline", "flat model, hierarchical data", thesis=dict(ap=0.303), source=_T41,
              cell=("hierarchical data", "flat model")),
        Entry("table4_1_chmcnn", "hierarchical model, hierarchical data",
              thesis=_facts(0.101, 0.367, 0.050, 0.210, 0.434),
              source=f"{_T41}; F1s: {_FACTS}, 'C-HMCNN, hierarchical data (random init)'",
              cell=("hierarchical data", "hierarchical model")),
    ), notes="Thesis: frozen ImageNet B2, only the head trained; here B2 from random init, all layers. "
             "Flat model = BCE, hierarchical model = C-HMCNN."),
    Table("4.2", "Data-level techniques for mitigating imbalance", "pr", (
        Entry("baseline", "Baseline",
              thesis={**_pr(0.254, 0.408, 0.142, 0.652, 0.448, 0.362, 0.083),
                      **_facts(0.181, 0.547, 0.110, 0.254, 0.518)},
              source=f"{_T42}; F1s: {_FACTS}, 'baseline, frozen backbone, 50k test'"),
        Entry("table4_2_naive_augmentation", "Naive augmentation",
              thesis=_pr(0.200, 0.345, 0.098, 0.590, 0.276, 0.280, 0.053), source=_T42),
        Entry("table4_2_undersampling", "Under-sampling",
              thesis=_pr(0.233, 0.367, 0.139, 0.646, 0.457, 0.313, 0.078), source=_T42),
        Entry("table4_2_oversampling_augmentation", "Oversampling + augmentation",
              thesis={**_pr(0.158, 0.198, 0.203, 0.488, 0.613, 0.142, 0.124),
                      **_facts(0.147, 0.459, 0.087, 0.158, 0.480)},
              source=f"{_T42}; F1s: {_FACTS}, 'augmentation + oversampling, frozen'"),
    ), notes="Hierarchical data. Thesis: frozen ImageNet B2; here B2 from random init, all layers."),
    Table("4.3", "Algorithm-level techniques for mitigating imbalance", "pr", (
        Entry("baseline", "Baseline",
              thesis={**_pr(0.254, 0.408, 0.142, 0.668, 0.487, 0.358, 0.076),
                      **_facts(0.181, 0.547, 0.110, 0.254, 0.518)},
              source=f"{_T43}; F1s: {_FACTS}, 'baseline, frozen backbone, 50k test'"),
        Entry("baseline", "Per-class thresholds", thresholds="tuned",
              thesis=dict(**_pr(0.254, 0.233, 0.527, 0.488, 0.800, 0.184, 0.474), labels_per_image=10.322),
              source=f"{_T43}; labels per image: thesis section 4.3.2"),
        Entry("table4_3_focal", "Focal loss",
              thesis={**_pr(0.252, 0.373, 0.144, 0.668, 0.489, 0.316, 0.078),
                      **_facts(0.183, 0.549, 0.112, 0.252, 0.519)},
              source=f"{_T43}; F1s: {_FACTS}, 'focal loss gamma=2, frozen'"),
        Entry("table4_3_class_weights", "Class-weights",
              thesis={**_pr(0.208, 0.267, 0.185, 0.556, 0.486, 0.211, 0.127),
                      **_facts(0.163, 0.488, 0.101, 0.208, 0.474)},
              source=f"{_T43}; F1s: {_FACTS}, 'class weights, frozen'"),
        Entry("table4_3_pos_weights", "Sample-weights",
              thesis={**_pr(0.263, 0.420, 0.156, 0.674, 0.517, 0.371, 0.087),
                      **_facts(0.195, 0.573, 0.122, 0.263, 0.544)},
              source=f"{_T43}; F1s: {_FACTS}, 'pos-weight loss, frozen, hierarchical data, 390k "
                     "test'"),
    ), notes="Hierarchical data. The per-class-thresholds line is the baseline's run evaluated with "
             "thresholds tuned on the threshold split (thesis section 3.2.1). Thesis: frozen ImageNet "
             "B2; here B2 from random init, all layers."),
    Table("4.4", "Weight initialisation (all layers trainable): F1 scores", "f1", (
        Entry("table4_4_imagenet", "ImageNet", thesis=dict(f1_all=0.267, f1_top=0.450, f1_rest=0.206),
              source="thesis Table 4.4"),
        Entry("table4_4_random", "Random", thesis=dict(f1_all=0.192, f1_top=0.415, f1_rest=0.118),
              source="thesis Table 4.4"),
    ), notes="Thesis: Keras ImageNet B2, 30 epochs; here Lite0 (ImageNet weights exist for Lite0/1/2 "
             "only) for both arms, 15 epochs."),
    Table("4.5", "Fine-tuning depth of the base model (ImageNet init)", "f1", (
        *(Entry(f"table4_5_layers_{k}", str(k), thesis=_f1(*values), source="thesis Table 4.5")
          for k, values in zip(TABLE4_5_LAYERS, (
              (723_604, 0.922, 0.186, 0.386, 0.119), (1_222_036, 0.976, 0.209, 0.414, 0.141),
              (2_340_076, 0.912, 0.195, 0.399, 0.127), (5_722_684, 1.064, 0.241, 0.441, 0.175),
              (6_900_894, 1.079, 0.242, 0.438, 0.176)))),
        Entry("table4_4_imagenet", "all (thesis: 339 of B2; here: 157 of Lite0)",
              thesis=_f1(8_424_598, 1.165, 0.262, 0.469, 0.193), source="thesis Table 4.5"),
    ), notes="Thesis: B2 (339 layers), up to 20 epochs; here Lite0 (157 layers), 15 epochs. The "
             "thesis's 200-layer line (8,187,424 trainable parameters, 1.132 labels per image, F1 "
             "0.252 / 0.450 / 0.186) has no Lite0 counterpart."),
    Table("4.6", "Flat vs. hierarchical models (all layers trainable)", "pr", (
        Entry("baseline", "Flat", thesis=_pr(0.310, 0.518, 0.190, 0.686, 0.535, 0.486, 0.124),
              source="thesis Table 4.6"),
        Entry("table4_1_chmcnn", "Hierarchical",
              thesis=_pr(0.237, 0.401, 0.132, 0.723, 0.421, 0.339, 0.076), source="thesis Table 4.6"),
    ), notes="Hierarchical data, B2 from random init. The thesis's C-HMCNN used an ancestor matrix in "
             "the wrong label order and random weights (in the thesis code); ours derives it "
             "from the taxonomy. Row extra_chmcnn_imagenet adds ImageNet init."),
    Table("5.1", "Predictions on the training data", "pr", (
        Entry("table5_1_training_split", "Flat",
              thesis=_pr(0.349, 0.525, 0.229, 0.722, 0.578, 0.487, 0.162), source="thesis Table 5.1"),
        Entry("table5_1_training_split", "Flat (per-class thresh)", thresholds="tuned",
              thesis=_pr(0.349, 0.335, 0.524, 0.601, 0.784, 0.283, 0.474), source="thesis Table 5.1"),
    ), notes="Evaluated on the training split: in-sample numbers, not a generalisation estimate. "
             "Thesis: ImageNet B2, all layers, hierarchical data; here Lite0; BCE (section 5.1 trains "
             "'as specified in Section 3.2.1'). The thesis code's logs give "
             "this run's 'best' figures as PR-AUC 0.349, macro-F1 0.269, micro-F1 0.602 "
             "(the threshold is not stated there)."),
    Table("extra", "Beyond the thesis", "pr", (
        Entry("baseline", "Baseline (BCE)"),
        Entry("extra_asl", "Asymmetric loss"),
        Entry("extra_distribution_balanced", "Distribution-balanced loss"),
        Entry("extra_cosine", "Cosine learning-rate decay"),
        Entry("table4_4_imagenet", "Lite0 ImageNet, BCE"),
        Entry("extra_chmcnn_imagenet", "Lite0 ImageNet, C-HMCNN"),
    ), notes="The first four lines: B2 from random init; the last two: Lite0 with ImageNet weights."),
)
TABLES: dict[str, Table] = {table.key: table for table in _TABLE_LIST}


def parse_arg(arg: str | None) -> tuple[str, bool]:
  """'row' or 'row:smoke' -> (row, smoke)."""
  if not arg:
    raise ValueError(f"configs/experiments.py needs a row: configs/experiments.py:<row>[{SMOKE_SUFFIX}]; "
                     f"rows: {', '.join(ROWS)}")
  smoke = arg.endswith(SMOKE_SUFFIX)
  name = arg[:-len(SMOKE_SUFFIX)] if smoke else arg
  if name not in ROWS:
    raise ValueError(f"configs/experiments.py: unknown row {name!r}; rows: {', '.join(ROWS)}")
  return name, smoke


@configlib.loss_argument
def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  name, smoke = parse_arg(arg)
  return ROWS[name].build(smoke=smoke)
