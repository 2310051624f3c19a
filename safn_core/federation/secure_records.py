"""What each securely summed aggregation carries: its fields, bounds and how to read the sum.

Three aggregations per run use secure aggregation (`safn_core.secagg`): the statistics round
(``statistics``), each training round (``train``) and each evaluation (``evaluate``); a
personalised run adds a fourth at its end (``personalise``: each site's confusion counts of the
global and of its personal model on its test split). For each,
this module builds the `Packing` both sides agree on, a site's values, and the coordinator's
reading of the decoded sum. Counts (participants, classes, contributing sites) travel *inside*
the masked vector, so the coordinator learns them only as federation-wide totals.

Bounds (``federation.secagg``), so that no sum can overflow the 64-bit ring:

- statistics, in two sums: first counts, sums and sums of absolute values (a feature's value
  at most ``feature_bound``, a site at most ``max_site_examples`` participants); then, with
  each feature divided by its federation-wide mean absolute value, sums and sums of squares
  (at most `SCALED_BOUND` times that mean) — one fixed-point scale could not serve features
  whose magnitudes differ by six orders (cortical thickness in mm, volumes in mm³);
- train: every model weight is clipped to ``[-weight_bound, weight_bound]``; a site sends
  ``n_i · w_i`` (bounded by ``max_site_examples · weight_bound``) and ``n_i``; the coordinator
  divides the sums: exactly FedAvg's example-weighted mean, within the fixed-point error bound
  (`Packing.error_bound`, divided by the total examples). Under central DP a site sends its
  update ``w_i − g`` clipped to L2 norm ``C`` with weight 1 instead: the coordinator's mean of
  clipped updates then has sensitivity ``C / m`` to any one site, which its noise covers;
- evaluate: histogram counts, and the validation loss sum (bounded by ``max_site_examples ·
  loss_bound``).

Values beyond a bound are clipped at the site and the federation-wide clip count is reported.
"""

from __future__ import annotations

import numpy as np

from safn_core.config import FederationConfig
from safn_core.preprocess import FeatureStats
from safn_core.secagg import Field, Packing

LOSS_BOUND = 1e3
"""Per-participant loss bound for the validation loss sum (a focal/BCE loss is far below it)."""


SCALED_BOUND = 1e3
"""In the statistics' second sum, a value at most this many times its feature's mean absolute
value (larger ones are clipped and counted)."""


def statistics_packing(n_features: int, fed: FederationConfig, parties: int,
                       n_classes: int = 2) -> Packing:
    """First sum: counts, sums and sums of absolute values (at most ``feature_bound`` each),
    and the counts of each of the target's ``n_classes`` classes."""
    b = fed.secagg
    bound = b.max_site_examples * b.feature_bound
    return Packing((Field.count("count", (n_features,)),
                    Field.real("total", (n_features,), clip=bound),
                    Field.real("abs_total", (n_features,), clip=bound),
                    Field.count("class_counts", (int(n_classes),)), Field.count("sites")),
                   max_parties=parties)


def scaled_packing(n_features: int, fed: FederationConfig, parties: int) -> Packing:
    """Second sum: each feature divided by its federation-wide mean absolute value, so that one
    fixed-point scale serves features of any magnitude (thickness in mm, volumes in mm³)."""
    n = fed.secagg.max_site_examples
    return Packing((Field.real("total", (n_features,), clip=n * SCALED_BOUND),
                    Field.real("total_sq", (n_features,), clip=n * SCALED_BOUND ** 2)),
                   max_parties=parties)


def statistics_values(stats: FeatureStats, counts: list[int], frame=None) -> dict:
    out = {"count": stats.count.astype(np.int64), "total": stats.total,
           "class_counts": np.asarray(counts, dtype=np.int64), "sites": 1}
    if frame is not None:
        out["abs_total"] = np.nansum(np.abs(frame.to_numpy(dtype=np.float64)), axis=0)
    return out


def released_values(stats: FeatureStats, counts: list[float]) -> dict:
    """A site's statistics as released through the Gaussian mechanism (`privacy.statistics:
    gaussian`), in the first sum's fields: counts rounded and clipped at 0, and in place of the
    sum of absolute values its Cauchy-Schwarz bound ``sqrt(n · Σx²)`` — post-processing of the
    release only, so the secure sum adds nothing to what the site's ε covers."""
    count = np.maximum(np.rint(stats.count), 0).astype(np.int64)
    return {"count": count, "total": stats.total,
            "abs_total": np.sqrt(np.maximum(stats.total_sq, 0) * count),
            "class_counts": np.maximum(np.rint(np.asarray(counts, dtype=np.float64)), 0)
            .astype(np.int64), "sites": 1}


def released_scaled(stats: FeatureStats, scales: np.ndarray) -> dict:
    return {"total": stats.total / scales, "total_sq": stats.total_sq / scales ** 2}


def scales_from_sum(total: dict) -> np.ndarray:
    """Each feature's mean absolute value over the federation (1 where unobserved or 0)."""
    count = np.maximum(total["count"].astype(np.float64), 1.0)
    scale = np.asarray(total["abs_total"], dtype=np.float64) / count
    return np.where(scale > 1e-12, scale, 1.0)


def scaled_values(frame, scales: np.ndarray) -> dict:
    y = frame.to_numpy(dtype=np.float64) / np.asarray(scales)[None, :]
    return {"total": np.nansum(y, axis=0), "total_sq": np.nansum(y ** 2, axis=0)}


def statistics_from_sum(features: tuple[str, ...], first: dict, scaled: dict,
                        scales: np.ndarray, min_cell: int
                        ) -> tuple[FeatureStats, list[int], list[str]]:
    """The federation's statistics from the two sums; a feature observed in fewer than
    ``min_cell`` people in the whole federation is withheld (as if never observed). Returns the
    withheld features too."""
    count = first["count"].astype(np.float64)
    tot = np.asarray(scaled["total"], dtype=np.float64) * scales
    sq = np.asarray(scaled["total_sq"], dtype=np.float64) * scales ** 2
    small = (count > 0) & (count < min_cell)
    for arr in (count, tot, sq):
        arr[small] = 0.0
    withheld = [f for f, s in zip(features, small) if s]
    return (FeatureStats(tuple(features), count, tot, sq),
            [int(c) for c in first["class_counts"]], withheld)


def train_packing(n_weights: int, fed: FederationConfig, parties: int) -> Packing:
    b = fed.secagg
    return Packing((Field.real("weighted", (n_weights,), clip=b.max_site_examples * b.weight_bound),
                    Field.count("weight"), Field.count("examples"),
                    Field.real("loss_sum", clip=b.max_site_examples * LOSS_BOUND),
                    Field.count("loss_examples"), Field.count("sites")),
                   max_parties=parties)


def train_values(vector: np.ndarray | None, n: int, loss: float | None, bound: float,
                 weight: int | None = None) -> dict:
    """A site's training contribution: ``weight · w`` (values clipped to ``bound``), ``weight``
    and ``n``; ``weight`` is ``n`` (FedAvg's example weighting) unless given (central DP: 1, an
    equal-weight mean of clipped updates). A site that did not train (refused) contributes
    zeros, so the masks still cancel."""
    size = 0 if vector is None else len(vector)
    if vector is None or n <= 0:
        return {"weighted": np.zeros(size), "weight": 0, "examples": 0, "loss_sum": 0.0,
                "loss_examples": 0, "sites": 0}
    w = np.clip(np.asarray(vector, dtype=np.float64), -bound, bound)
    k = int(n) if weight is None else int(weight)
    reported = loss is not None and loss >= 0
    return {"weighted": k * w, "weight": k, "examples": int(n),
            "loss_sum": float(n * loss) if reported else 0.0,
            "loss_examples": int(n) if reported else 0, "sites": 1}


def share_packing(n_weights: int, parties: int) -> Packing:
    """Distributed DP's training sum (`safn_core.privacy.noise_shares`): each site's noised
    clipped gradient sum as integers on the plan's grid (a ``ring`` field: never clipped, its
    Gaussian tails intact), its training-split size, 1 in ``sites`` when its data are in it and
    1 in ``noise_shares`` when its noise is (a site that does not train still sends noise)."""
    return Packing((Field.ring("share", (n_weights,)), Field.count("examples"),
                    Field.count("sites"), Field.count("noise_shares")), max_parties=parties)


def evaluate_packing(bins: int, fed: FederationConfig, parties: int,
                     n_classes: int = 2) -> Packing:
    """The evaluation sum: per-class score histograms of the validation and test splits ((2,
    bins) for a binary target; (K, K, bins) and beside them the (K, K) argmax confusion counts
    ``val_confusion`` / ``test_confusion`` for K = ``n_classes`` > 2, `Site.evaluate`), the
    validation loss sum and size, and the number of sites."""
    b = fed.secagg
    K = int(n_classes)
    hist = (2, bins) if K == 2 else (K, K, bins)
    confusion = () if K == 2 else (Field.count("val_confusion", (K, K)),
                                   Field.count("test_confusion", (K, K)))
    return Packing((Field.count("val", hist), Field.count("test", hist), *confusion,
                    Field.real("val_loss_sum", clip=b.max_site_examples * LOSS_BOUND),
                    Field.count("val_examples"), Field.count("sites")),
                   max_parties=parties)


def evaluate_values(res: dict) -> dict:
    """A site's evaluation contribution (`Site.evaluate`'s result), the confusion counts too
    where it has them (K > 2)."""
    confusion = {k: np.asarray(res[k]).astype(np.int64)
                 for k in ("val_confusion", "test_confusion") if k in res}
    return {"val": res["val"].astype(np.int64), "test": res["test"].astype(np.int64),
            **confusion, "val_loss_sum": float(res.get("val_loss_sum", 0.0)),
            "val_examples": int(res.get("val_examples", 0)), "sites": 1}


def personalise_packing(parties: int, n_classes: int = 2) -> Packing:
    """The personalised comparison: [TP, FN, TN, FP] of the global and of the personal model
    on each site's test split (K > 2 classes: the K × K confusion matrix, flat), and the
    number of sites that had a personal model."""
    size = 4 if n_classes == 2 else n_classes * n_classes
    return Packing((Field.count("global", (size,)), Field.count("personal", (size,)),
                    Field.count("sites")), max_parties=parties)


def personalise_values(confusion: dict[str, list[int]], has_model: bool,
                       n_classes: int = 2) -> dict:
    """A site's contribution: its counts whatever their size (only the sum is revealed, to
    which min_cell then applies); zeros when it has no personal model."""
    if not has_model:
        size = 4 if n_classes == 2 else n_classes * n_classes
        return {"global": np.zeros(size, dtype=np.int64),
                "personal": np.zeros(size, dtype=np.int64), "sites": 0}
    return {"global": np.asarray(confusion["global"], dtype=np.int64),
            "personal": np.asarray(confusion["personal"], dtype=np.int64), "sites": 1}
