"""The message protocol between the coordinator and the sites: every name on the wire.

Client (`safn.client.app`), coordinator (`server.*`) and strategies read and write messages only
through these names, so a renamed key is a change here and nowhere else. Flower's Message API
carries a `RecordDict` of named records; SAFN uses:

================  ==========================================================================
record            what it holds
================  ==========================================================================
``ARRAYS``        the model as one vector (`MODEL`, `safn_core.federation.wire.Layout`) or a
                  site's masked secure-aggregation vector (`MASKED`); also the statistics'
                  arrays (`STATS`)
``CONFIG``        the coordinator's instruction (`Config`)
``METRICS``       a site's reply metrics (`Metric`)
``SITE``          a site's description in the statistics round (`Describe`)
``STATISTICS``    the mechanism a site's statistics went through (exact / gaussian)
``REFUSAL``       a site's one-line reason for not training
================  ==========================================================================

``ARRAYS``, ``CONFIG`` and ``METRICS`` are also Flower's own default record names
(``arrayrecord_key`` / ``configrecord_key`` of its strategies): they must not change alone.

Two encodings travel as flat lists, because a `ConfigRecord` holds scalars and lists only:
the modality groups (`modalities_to_record` / `modalities_from_record`) and the weights (one
float vector cut by `Layout`, fingerprinted in ``Config.MODEL_LAYOUT``).

A value a site does not report (its training loss or ε under DP, a metric below ``min_cell``)
is the sentinel `WITHHELD` (−1), never 0 and never omitted, so that a reader tells "withheld"
from "zero" without guessing.
"""

from __future__ import annotations

import numpy as np

from safn_core.data.cohort import Modality
from safn_core.federation.wire import KEY as MODEL
from safn_core.federation.wire import Layout

__all__ = ["ARRAYS", "CONFIG", "METRICS", "SITE", "STATS", "STATISTICS", "REFUSAL", "MODEL",
           "MASKED", "WITHHELD", "Task", "Config", "Metric", "Describe", "SecAgg", "Aggregation", "NodeConfig",
           "Layout",
           "modalities_to_record", "modalities_from_record", "is_withheld",
           "class_counts_to_metrics", "class_counts_from_metrics",
           "evaluation_to_metrics", "evaluation_from_metrics"]

# -- records --------------------------------------------------------------------------------
ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
SITE = "site"
STATS = "stats"
STATISTICS = "statistics"
REFUSAL = "refusal"

MASKED = "masked"
"""The one array of a secure-aggregation reply: the site's masked uint64 vector."""

WITHHELD = -1.0
"""A value the site does not report (DP training loss, ε without DP, a small cell)."""


def is_withheld(value) -> bool:
    """True for the `WITHHELD` sentinel (any negative value of a non-negative quantity)."""
    return value is None or float(value) < 0


class Task:
    """``Config.TASK`` of a query message: what the site is asked."""

    DESCRIBE = "describe"          # the statistics round
    SECAGG_KEYS = "secagg-keys"    # a fresh key pair for a redone secure sum
    SECAGG_MASK = "secagg-mask"    # a site's masked vector for a redone secure sum
    RUN_END = "run-end"            # the run is over (completed or stopped): sites may leave
    PERSONALISE = "personalise"    # personalisation: each site's personal vs the global model
    HARMONISE = "harmonise"        # federated ComBat, plain: a site's sums (Config.HARMONISE_STEP)
    LOGISTIC = "logistic"          # the logistic regression floor, plain: a Newton round's sums
    DP_PLAN = "dp-plan"            # distributed DP: the noise multiplier a site's budget needs


class RunEnd:
    """``Config.RUN_STATUS`` of a ``run-end`` message."""

    COMPLETED = "completed"        # the model bundle is written: the sites may leave
    STOPPED = "stopped"            # stopped with its checkpoint: the coordinator may --resume


class Config:
    """Keys of the coordinator's ``CONFIG`` record."""

    TASK = "task"
    SAFN_CONFIG = "safn-config"        # the run's shared configuration (YAML text)
    RUN_ID = "run-id"                  # stable across a resume, unlike Flower's run id
    HELD_OUT_SITES = "held-out-sites"
    PRE_MEAN = "pre-mean"              # the global preprocessing
    PRE_SCALE = "pre-scale"
    CLASS_COUNTS = "class-counts"      # federation-wide, for the class-weighted loss
    LOCAL_EPOCHS = "local-epochs"
    SEED = "seed"
    HISTOGRAM_BINS = "histogram-bins"
    MODEL_LAYOUT = "model-layout"      # `Layout.fingerprint` of the model vector
    SERVER_ROUND = "server-round"      # set by Flower's strategies
    PROXIMAL_MU = "proximal-mu"        # set by Flower's FedProx
    SECURE_AGGREGATION = "secure-aggregation"
    SECAGG_SCALES = "secagg-scales"    # the statistics' per-feature scales (second sum)
    SECAGG_PREFIX = "secagg-"          # keys of one secure sum (`SecAgg`)
    RUN_STATUS = "run-status"          # run-end: "completed" or "stopped"
    RUN_REASON = "run-reason"          # run-end: why a run stopped ("" when it completed)
    LAST_ROUND = "last-round"          # run-end: the last round the run trained
    THRESHOLD = "threshold"            # personalise: the federation's decision threshold
    # federated ComBat (`safn_core.federation.site_harmonisation`)
    HARMONISE_STEP = "harmonise-step"  # "means" (round 1) or "residuals" (round 2)
    HARMONISATION_SCALES = "harmonisation-scales"  # per cohort feature: the divisor of its sums
    HARMONISATION_MEANS = "harmonisation-means"    # round 2: the mean model (JSON)
    HARMONISATION_FIT = "harmonisation-fit"        # every message after the fit (JSON): sites
    # harmonise their data with it before they describe, train or evaluate
    # the logistic regression floor (`safn_core.federation.site_logistic`)
    LOGISTIC_BETAS = "logistic-betas"      # every candidate's coefficients, flat (K × (1 + F))
    LOGISTIC_WEIGHTS = "logistic-weights"  # the balanced class weights (HC, PD)
    # distributed DP (`safn_core.federation.site_distributed`): the round's noise plan (JSON
    # `NoiseShares`); a training message that carries it asks for a noise share, not local epochs
    NOISE_SHARES = "noise-shares"


class SecAgg:
    """One secure sum's keys: in ``CONFIG`` (coordinator → site) and in the site's ``RECORD``
    (site → coordinator: its public key for the next secure sum, announced in advance)."""

    RECORD = "secagg"
    CONTEXT = "secagg-context"         # JSON `AggregationContext` (run, round, name, attempt)
    PACKING = "secagg-packing"
    PEER_IDS = "secagg-peer-ids"
    PEER_KEYS = "secagg-peer-keys"
    NEXT = "secagg-next"               # the context of the next secure sum
    ANNOUNCED_KEY = "next-public-key"
    ANNOUNCED_CONTEXT = "next-context"


class Aggregation:
    """Names of the secure sums of a run (`safn_core.federation.secure_records`)."""

    STATISTICS = "statistics"
    STATISTICS_SCALED = "statistics-scaled"
    TRAIN = "train"
    EVALUATE = "evaluate"
    PERSONALISE = "personalise"
    HARMONISE_MEANS = "harmonise-means"
    HARMONISE_RESIDUALS = "harmonise-residuals"
    LOGISTIC = "logistic"          # one Newton round of the logistic regression floor


class Metric:
    """Keys of a site's ``METRICS`` record."""

    NUM_EXAMPLES = "num-examples"
    TRAIN_LOSS = "train-loss"          # WITHHELD under DP
    # privacy report (every training reply)
    DP = "dp"
    EPSILON = "epsilon"                # spent so far; WITHHELD without DP
    DELTA = "delta"
    EPSILON_BUDGET = "epsilon-budget"
    NOISE_MULTIPLIER = "noise-multiplier"
    DP_STEPS = "dp-steps"
    REFUSED = "refused"                # 1: the site did not train (reason in ``REFUSAL``)
    # distributed DP's plan (``dp-plan``): the smallest σ the site's remaining budget allows
    NEEDED_SIGMA = "needed-noise-multiplier"
    # evaluation, plain: per-class score histograms
    VAL_NEG = "val-neg"
    VAL_POS = "val-pos"
    TEST_NEG = "test-neg"
    TEST_POS = "test-pos"
    WITHHELD = "withheld"              # 1: a class below min_cell, the histograms are zeros
    # evaluation, plain, K > 2 classes (instead of the four above): the (K, K, bins) histograms
    # (true class × scored class × bins) and the (K, K) argmax confusion counts, flat
    N_CLASSES = "n-classes"
    VAL_HIST = "val-hist"
    TEST_HIST = "test-hist"
    VAL_CONFUSION = "val-confusion"
    TEST_CONFUSION = "test-confusion"
    # evaluation, secure: a site's own metrics, only where its own counts pass min_cell
    SITE_REPORTED = "site-reported"
    SITE_ROC_AUC = "site-roc-auc"
    SITE_N = "site-n"
    # evaluation, plain: the validation loss sum (for the coordinator's model selection)
    VAL_LOSS_SUM = "val-loss-sum"
    VAL_EXAMPLES = "val-examples"
    # personalise: a site's global-vs-personal comparison on its test split; the metrics
    # (prefix + `personal.COMPARED`) only where both its test classes pass min_cell, else
    # WITHHELD; the confusion counts [TP, FN, TN, FP] plain only then, else zeros (under
    # secure aggregation they travel masked, never beside)
    PERSONAL_REPORTED = "personal-reported"
    PERSONAL_REFUSED = "personal-refused"  # 1: no personal model (reason in ``REFUSAL``)
    PERSONAL_N = "personal-n"          # test participants behind the metrics
    PERSONAL_SELECTED = "personal-selected"  # the kept epoch (fine_tune) or round (ditto)
    PERSONAL_IS_GLOBAL = "personal-is-global"  # 1: the site's validation split is too small
    # to choose a personal model (a class below min_cell): it keeps the global model
    GLOBAL_PREFIX = "global-"
    PERSONAL_PREFIX = "personal-"
    GLOBAL_CONFUSION = "global-confusion"
    PERSONAL_CONFUSION = "personal-confusion"
    # statistics round, plain: the training split's size and its count of each class k as
    # ``class-<k>`` (`class_key`; K classes, binary: CLASS_0 and CLASS_1 only)
    N_TRAIN = "n-train"
    CLASS_0 = "class-0"
    CLASS_1 = "class-1"
    CLASS_PREFIX = "class-"

    @staticmethod
    def class_key(k: int) -> str:
        """The statistics round's key of class ``k``'s count (``class-0``, ``class-1``, …)."""
        return f"{Metric.CLASS_PREFIX}{int(k)}"


class Describe:
    """Keys of a site's ``SITE`` record in the statistics round."""

    NAME = "name"
    OK = "ok"
    HELD_OUT = "held-out"
    REASON = "reason"
    LABEL_NAMES = "label-names"
    TARGET = "target"                  # JSON `Target.to_dict` of the site's cohort: what its
    # labels mean (classes, order); the coordinator stops a run whose sites differ
    DATA_SOURCE = "data-source"        # the kind of data the site's own `data.source` names
    # (synthetic | ppmi | table): what its participants are, not a statistic about them
    PUBLIC_KEY = "public-key"          # the site's key for the first secure sum
    STATISTICS = "statistics"          # the mechanism: "exact" | "gaussian" | "refused"; also
    # the key of the ``STATISTICS`` record under secure aggregation, whose other keys are
    # REASON and the Gaussian release's Metric.NOISE_MULTIPLIER / EPSILON / DELTA
    STATISTICS_PREFIX = "statistics-"  # those three keys in the ``SITE`` record (plain)
    EXACT, GAUSSIAN, REFUSED = "exact", "gaussian", "refused"


class NodeConfig:
    """Keys of a SuperNode's node config that say which site it is."""

    SITE_CONFIG = "site-config"        # deployment: the site's own site.yaml (safn-client)
    PARTITION_ID = "partition-id"      # simulation: the virtual site's index (Flower's key)


# -- modality encoding ------------------------------------------------------------------------


def modalities_to_record(modalities: tuple[Modality, ...]) -> dict:
    """Flat lists (Flower ConfigRecord values) describing the modality groups."""
    return {"modality-names": [m.name for m in modalities],
            "modality-sides": [m.side for m in modalities],
            "modality-sizes": [len(m.features) for m in modalities],
            "features": [f for m in modalities for f in m.features]}


def modalities_from_record(rec) -> tuple[Modality, ...]:
    """Inverse of `modalities_to_record`."""
    features = list(rec["features"])
    out, start = [], 0
    for name, side, size in zip(rec["modality-names"], rec["modality-sides"],
                                rec["modality-sizes"]):
        out.append(Modality(str(name), tuple(features[start:start + int(size)]), str(side)))
        start += int(size)
    return tuple(out)


# -- class counts of the plain statistics round --------------------------------------------


def class_counts_to_metrics(counts, cast=int) -> dict:
    """A site's training-split class counts as ``METRICS`` keys (`Metric.class_key`), one per
    class (a binary site's: ``class-0`` and ``class-1``, as always); ``cast``: `float` for
    noised counts."""
    return {Metric.class_key(k): cast(c) for k, c in enumerate(counts)}


def class_counts_from_metrics(m) -> list[float]:
    """Inverse of `class_counts_to_metrics`: the counts of classes 0, 1, … in order (as
    floats: noised counts are not integers)."""
    out, k = [], 0
    while Metric.class_key(k) in m:
        out.append(float(m[Metric.class_key(k)]))
        k += 1
    return out


# -- a plain evaluation reply -----------------------------------------------------------------


def evaluation_to_metrics(res: dict) -> dict:
    """A site's plain evaluation (`Site.evaluate`) as ``METRICS``: per-class score histograms,
    the withheld flag, and the validation loss sum and size (zeros where anything is withheld).
    Every site sends the same keys: Flower's strategies refuse to aggregate metric records
    whose keys differ. A binary target's histograms are (2, bins): ``val-neg`` … ``test-pos``;
    K > 2 classes' are (K, K, bins) with (K, K) confusion counts, flat under ``val-hist``,
    ``test-hist``, ``val-confusion``, ``test-confusion`` with ``n-classes``."""
    sent = not res["withheld"] and "val_loss_sum" in res
    out = {Metric.NUM_EXAMPLES: _examples(res["test"])}
    if np.ndim(res["test"]) == 3:
        k = int(np.shape(res["test"])[0])
        out.update({Metric.N_CLASSES: k,
                    Metric.VAL_HIST: _flat(res["val"]), Metric.TEST_HIST: _flat(res["test"]),
                    Metric.VAL_CONFUSION: _flat(res.get("val_confusion", np.zeros((k, k)))),
                    Metric.TEST_CONFUSION: _flat(res.get("test_confusion", np.zeros((k, k))))})
    else:
        out.update({Metric.VAL_NEG: res["val"][0].tolist(), Metric.VAL_POS: res["val"][1].tolist(),
                    Metric.TEST_NEG: res["test"][0].tolist(),
                    Metric.TEST_POS: res["test"][1].tolist()})
    out.update({Metric.WITHHELD: int(res["withheld"]),
                Metric.VAL_LOSS_SUM: float(res["val_loss_sum"]) if sent else 0.0,
                Metric.VAL_EXAMPLES: int(res["val_examples"]) if sent else 0})
    return out


def _examples(test) -> int:
    """Test participants behind a histogram: (2, bins) counts each once; (K, K, bins) K times
    (one row of scores per class), so one scored class's slice counts them."""
    test = np.asarray(test)
    return int(test.sum() if test.ndim == 2 else test[:, 0].sum())


def _flat(a) -> list[int]:
    return np.asarray(a, dtype=np.int64).ravel().tolist()


def evaluation_from_metrics(m) -> dict:
    """Inverse of `evaluation_to_metrics`: ``val`` / ``test`` histograms ((2, bins), or
    (K, K, bins) with ``val_confusion`` / ``test_confusion`` (K, K)), ``withheld`` and, where
    sent, ``val_loss_sum`` / ``val_examples``."""
    if Metric.N_CLASSES in m:
        k = int(m[Metric.N_CLASSES])
        out = {part: np.asarray(m[key], dtype=np.int64).reshape(k, k, -1)
               for part, key in (("val", Metric.VAL_HIST), ("test", Metric.TEST_HIST))}
        out.update({part: np.asarray(m[key], dtype=np.int64).reshape(k, k) for part, key in
                    (("val_confusion", Metric.VAL_CONFUSION),
                     ("test_confusion", Metric.TEST_CONFUSION))})
    else:
        out = {"val": np.array([m[Metric.VAL_NEG], m[Metric.VAL_POS]], dtype=np.int64),
               "test": np.array([m[Metric.TEST_NEG], m[Metric.TEST_POS]], dtype=np.int64)}
    out["withheld"] = bool(m[Metric.WITHHELD])
    if Metric.VAL_LOSS_SUM in m:
        out["val_loss_sum"] = float(m[Metric.VAL_LOSS_SUM])
        out["val_examples"] = int(m[Metric.VAL_EXAMPLES])
    return out
