"""What a bundle predicts and how its model is rebuilt: the target it records, its K-class
scores and calibration maps (`safn_core.bundle`).

A bundle's ``bundle.json`` records its `Target` under ``target``; one written before targets
existed predicts ``pd_vs_hc``. A K-class model (K > 2) is rebuilt with K outputs and the head
its config names (``model.head``: softmax or ordinal) through `training.local.make_model`, and
its scores are its K logits and their softmax, the class probabilities: the same for both
heads.
"""

from __future__ import annotations

import numpy as np
import torch

from safn_core.config import SafnConfig
from safn_core.errors import DataError
from safn_core.model import SAFN
from safn_core.preprocess import Preprocessor
from safn_core.recalibration import CalibrationMap
from safn_core.recalibration_multiclass import MultiClassMap
from safn_core.targets import PD_VS_HC, Target
from safn_core.training.local import Arrays


def bundle_target(meta: dict) -> Target:
    """The target a bundle's ``bundle.json`` records; a bundle written before targets existed
    predicts ``pd_vs_hc`` (under its recorded label names, when a table named them)."""
    record = meta.get("target")
    if record:
        try:
            return Target.from_dict(record)
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"bundle.json target: not a target record ({exc}); the bundle is "
                            "damaged") from None
    names = tuple(meta.get("label_names") or PD_VS_HC.classes)
    return PD_VS_HC if names == PD_VS_HC.classes else Target(PD_VS_HC.name, names)


def read_map(d: dict, where: str, n_classes: int) -> CalibrationMap | MultiClassMap:
    """A calibration map's JSON form for a bundle of ``n_classes``: binary maps for K = 2,
    K-class maps (`MultiClassMap`) otherwise."""
    if n_classes == 2:
        return CalibrationMap.from_dict(d, where)
    return MultiClassMap.from_dict(d, where, n_classes)


@torch.no_grad()
def kclass_scores(model: SAFN, data: Arrays, batch_size: int = 1024
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A K-class model's logits (n, K) and class probabilities (their softmax, n × K, the same
    for the softmax and the ordinal head), float64, and its gate weights α (n, M), in eval
    mode."""
    model.eval()
    z, weights = [], []
    x, m = torch.from_numpy(data.x), torch.from_numpy(data.mask)
    for i in range(0, len(data), batch_size):
        logits, alpha = model(x[i:i + batch_size], m[i:i + batch_size], return_weights=True)
        z.append(logits.double().numpy())
        weights.append(alpha.numpy())
    k = int(getattr(model, "n_classes", 0)) or 3
    if not z:
        return np.zeros((0, k)), np.zeros((0, k)), np.zeros((0, data.mask.shape[1]))
    logits = np.concatenate(z)
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    return logits, p / p.sum(axis=1, keepdims=True), np.concatenate(weights)


def build_model(preprocessor: Preprocessor, config: SafnConfig, target: Target) -> SAFN:
    """The bundle's model, untrained: its modalities, its config's model section and K
    outputs with the head of ``target`` (`training.local.make_model`); the global RNG is left
    as it was."""
    from inspect import signature

    from safn_core.training.local import make_model

    dims = [(m.name, len(m.features), m.side) for m in preprocessor.modalities]
    if target.n_classes == 2:
        return SAFN(dims, config.model)
    with torch.random.fork_rng():
        if "target" in signature(make_model).parameters:
            return make_model(preprocessor.modalities, config.model, 0, target=target)
        return SAFN(dims, config.model, n_classes=target.n_classes)
