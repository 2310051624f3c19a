"""How well a model does on a validation split: the losses and ROC-AUC that select rounds.

`validation_metrics` (one forward pass: the loss and the ROC-AUC), `validation_losses` (each
participant's part of that loss: what a paired margin compares) and `calibrated_log_loss` (the
class-balanced log loss at the temperature that suits the split best, blind to the logits'
scale). Binary models: the logit of P(positive) and P(positive); K > 2 classes: the K logits,
the multi-class cross-entropy and the macro one-vs-rest ROC-AUC. ``data`` is a
`safn_core.training.local.Arrays` (x, mask, y).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch import Tensor, nn

from safn_core.config import ModelConfig
from safn_core.metrics import cross_entropy_sum
from safn_core.model.losses import class_balanced_weights, classification_loss


@torch.no_grad()
def validation_loss(model: nn.Module, data, model_cfg: ModelConfig, class_counts) -> float:
    return validation_metrics(model, data, model_cfg, class_counts)[0]


@torch.no_grad()
def validation_metrics(model: nn.Module, data, model_cfg: ModelConfig, class_counts,
                       loss: str = "objective") -> tuple[float, float | None]:
    """Validation loss and ROC-AUC of P(positive) from one forward pass, in eval mode.

    ``loss``: ``"objective"`` (the training loss, class-weighted / focal as configured),
    ``"cross_entropy"`` (the mean binary cross-entropy of P(positive): what a federation's
    sites sum for the coordinator's pooled validation loss, `Site.evaluate`) or
    ``"calibrated"`` (`calibrated_log_loss`: the class-balanced log loss at the temperature
    that suits ``data`` best, blind to the logits' scale). The ROC-AUC is ``None`` when
    ``data`` lacks one of the classes (it is undefined).

    With K > 2 classes: ``"cross_entropy"`` is the mean multi-class cross-entropy of the class
    probabilities (clipped at 1e-7 like the binary one), ``"calibrated"`` the class-balanced
    multi-class log loss at the best temperature, and the ROC-AUC the macro one-vs-rest one
    (``None`` unless every class is present).
    """
    model.eval()
    logits = model(torch.from_numpy(data.x), torch.from_numpy(data.mask))
    if logits.shape[-1] > 2:
        return _kclass_metrics(logits, data, model_cfg, class_counts, loss)
    if loss == "cross_entropy":
        loss = cross_entropy_sum(data.y, torch.softmax(logits, dim=1)[:, 1].numpy()) / len(data.y)
    elif loss == "calibrated":
        loss = calibrated_log_loss((logits[:, 1] - logits[:, 0]).double().numpy(), data.y)
    else:
        loss = float(classification_loss(logits, torch.from_numpy(data.y), model_cfg,
                                         class_counts))
    auc = None
    if len(np.unique(data.y)) == 2:
        auc = float(roc_auc_score(data.y, torch.softmax(logits, dim=1)[:, 1].numpy()))
    return loss, auc


def _kclass_metrics(logits: Tensor, data, model_cfg: ModelConfig, class_counts,
                    loss: str) -> tuple[float, float | None]:
    """`validation_metrics` for K > 2 classes (see there)."""
    k = logits.shape[-1]
    p = torch.softmax(logits.double(), dim=1).numpy()
    if loss == "cross_entropy":
        value = float(_kclass_cross_entropy(p, data.y).mean())
    elif loss == "calibrated":
        value = calibrated_log_loss(logits.double().numpy(), data.y)
    else:
        value = float(classification_loss(logits, torch.from_numpy(data.y), model_cfg,
                                          class_counts))
    auc = None
    if len(np.unique(data.y)) == k:
        auc = float(roc_auc_score(data.y, p, multi_class="ovr", average="macro",
                                  labels=list(range(k))))
    return value, auc


def _kclass_cross_entropy(p: np.ndarray, y: np.ndarray) -> np.ndarray:
    """−log P(y) per participant (n,) from class probabilities (n, K), P clipped at 1e-7."""
    return -np.log(np.clip(p[np.arange(len(y)), y], 1e-7, 1.0))


def calibrated_log_loss(z: np.ndarray, y: np.ndarray) -> float:
    """The class-balanced log loss of σ(s·z) at the best scale s ≥ 0 for these logits ``z`` and
    labels ``y`` (the mean loss of each class, averaged over the classes).

    What safn-train ships is σ(z/T) with T fitted on the validation split
    (``train.temperature_scaling``), so a round's worth is its validation loss *after* such a
    fit: a change of the logits' scale alone (which the focal loss rewards and the temperature
    undoes) does not count, the ranking and the shape of the scores do. The loss is convex in
    s; golden-section search on [0, 100] (s = 0: every P = 1/2, log 2). NaN when a class is
    absent.

    K > 2 classes: ``z`` (n, K) the model's logits and the loss the multi-class log loss of
    softmax(s·z) (temperature 1/s; s = 0: every P = 1/K), balanced over the classes present
    (NaN when fewer than two are).
    """
    z, y = np.asarray(z, dtype=np.float64), np.asarray(y)
    if len(np.unique(y)) < 2:
        return float("nan")
    return _balanced_loss_at(z, y, _best_scale(z, y))


def _losses_at(z: np.ndarray, y: np.ndarray, s: float) -> np.ndarray:
    """Each participant's log loss at scale ``s``: binary z (n,), or K-class logits (n, K)."""
    if z.ndim == 1:
        return np.logaddexp(0.0, -s * np.where(y == 1, 1.0, -1.0) * z)
    sz = s * z
    top = sz.max(axis=1, keepdims=True)
    log_norm = top[:, 0] + np.log(np.exp(sz - top).sum(axis=1))
    return log_norm - sz[np.arange(len(y)), y]


def _balanced_loss_at(z: np.ndarray, y: np.ndarray, s: float) -> float:
    each = _losses_at(z, y, s)
    classes = (0, 1) if z.ndim == 1 else np.unique(y)
    return float(np.mean([each[y == c].mean() for c in classes]))


def _best_scale(z: np.ndarray, y: np.ndarray) -> float:
    """The scale s in [0, 100] minimising `_balanced_loss_at` (golden-section search; the loss
    is convex in s)."""
    lo, hi = 0.0, 100.0
    ratio = (math.sqrt(5) - 1) / 2
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = _balanced_loss_at(z, y, a), _balanced_loss_at(z, y, b)
    for _ in range(60):
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = _balanced_loss_at(z, y, a)
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = _balanced_loss_at(z, y, b)
    return min([(fa, a), (fb, b), (_balanced_loss_at(z, y, 0.0), 0.0)])[1]


@torch.no_grad()
def validation_losses(model: nn.Module, data, model_cfg: ModelConfig, class_counts,
                      loss: str = "objective") -> np.ndarray:
    """Each participant's part of `validation_metrics`' loss (n,): their mean is that loss
    (``"objective"``: the class-weighted focal or plain cross-entropy of each participant;
    ``"cross_entropy"``: binary cross-entropy; ``"calibrated"``: the log loss at the best
    scale, weighted n / (2 n_c) by class so that the mean is the class-balanced loss). With
    K > 2 classes the multi-class counterparts (weights n / (K' n_c), K' the classes present)."""
    model.eval()
    logits = model(torch.from_numpy(data.x), torch.from_numpy(data.mask))
    y = torch.from_numpy(data.y)
    if logits.shape[-1] > 2 and loss in ("cross_entropy", "calibrated"):
        if loss == "cross_entropy":
            return _kclass_cross_entropy(torch.softmax(logits.double(), dim=1).numpy(), data.y)
        z = logits.double().numpy()
        present, counts = np.unique(data.y, return_counts=True)
        weight = np.zeros(int(present.max()) + 1)
        weight[present] = len(data.y) / (len(present) * counts)
        return weight[data.y] * _losses_at(z, data.y, _best_scale(z, data.y))
    if loss == "cross_entropy":
        p = np.clip(torch.softmax(logits, dim=1)[:, 1].double().numpy(), 1e-7, 1 - 1e-7)
        return -(data.y * np.log(p) + (1 - data.y) * np.log(1 - p))
    if loss == "calibrated":
        z = (logits[:, 1] - logits[:, 0]).double().numpy()
        s = _best_scale(z, data.y)
        counts = np.bincount(data.y, minlength=2).astype(np.float64)
        weight = (len(data.y) / (2.0 * counts))[data.y]
        return weight * np.logaddexp(0.0, -s * np.where(data.y == 1, 1.0, -1.0) * z)
    ce = torch.nn.functional.cross_entropy(logits, y, reduction="none")
    if model_cfg.loss == "ce":
        return ce.double().numpy()
    w = class_balanced_weights(class_counts, model_cfg.cb_beta)[y]
    return (w * (1.0 - torch.exp(-ce)) ** model_cfg.focal_gamma * ce).double().numpy()
