"""What a recalibration at a site does the same for a binary bundle (`safn_core.validation`)
and a K-class one (`safn_core.validation_multiclass`): the split of the site's participants
into a recalibration and an evaluation part (`split_site`), the table of who went where
(``recalibration_split.csv``, `SplitParts`) and the ``validation.json`` of the result
(`validation_record`)."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

from safn_core.recalibration import RecalibrationOptions, check_parts, split_participants
from safn_core.validation_scope import scope_record


class SiteSplit(NamedTuple):
    """The model's own logits ``z`` on the site's data (any old map dropped), its raw
    probabilities and modality weights, the labels, the participants and ``in_recal``: who
    recalibrates."""

    z: np.ndarray
    p_raw: np.ndarray
    alpha: np.ndarray
    y: np.ndarray
    ids: np.ndarray
    in_recal: np.ndarray


def split_site(site, options: RecalibrationOptions) -> SiteSplit:
    """The site's data through the bundle and its participants split (by participant,
    stratified by class); too few of a class in a part is a one-line `DataError`."""
    bundle = site.bundle
    arrays = bundle.arrays(site.table, adjustments=site.adjustments)
    z, p_raw, alpha = bundle.scores(arrays)  # the model's own logits: any old map is dropped
    y, ids = arrays.y, site.table.index.to_numpy()
    in_recal = split_participants(ids, y, options.fraction, options.split_seed)
    check_parts(y, in_recal, site.min_cell, options.fraction, bundle.label_names)
    return SiteSplit(z, p_raw, alpha, y, ids, in_recal)


class SplitParts:
    """Shared by the recalibration results (`validation.Recalibration`,
    `validation_multiclass.MultiClassRecalibration`), which carry ``participant_ids``, ``y``
    and ``in_recal``."""

    @property
    def evaluated(self) -> np.ndarray:
        return ~self.in_recal

    def split(self) -> pd.DataFrame:
        """``recalibration_split.csv``: which participant went where (stays at the site)."""
        return pd.DataFrame({"participant_id": self.participant_ids, "y": self.y,
                             "part": np.where(self.in_recal, "recalibration", "evaluation")})


def validation_record(res, site_bundle: Path, **head) -> dict:
    """``validation.json`` of a recalibration ``res``, naming the site bundle written at
    ``site_bundle``; ``head``: keys that come right after ``n``."""
    return {**scope_record(res.site), "n": len(res.y), **head,
            "parts": {"recalibration": res.record["recalibration_part"],
                      "evaluation": res.record["evaluation_part"]},
            "recalibration": res.record, "before": res.before, "after": res.after,
            "majority_class": res.majority, "modality_weights": res.modality_weights,
            "site_bundle": str(site_bundle), "harmonisation": res.site.harmonisation}
