"""Class-balanced focal loss (Cui et al., CVPR 2019; Lin et al. 2017), done right, and the total loss.

``w_c = (1 − β) / (1 − β^{n_c})``, normalised to sum to the number of classes, with ``n_c`` the
class counts of the *training* data (in federated training, the federation's pooled counts), passed
in by the caller. ``p_t`` comes from the **unweighted** cross-entropy::

    ce = cross_entropy(logits, y, reduction="none"); pt = exp(-ce)
    loss = mean(w[y] * (1 - pt) ** γ * ce)

(The common shortcut ``pt = exp(-weighted_ce)`` is wrong and is not what this module computes.)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from safn_core.config import ModelConfig
from safn_core.model.gating import gate_entropy

ClassCounts = Sequence[float] | np.ndarray | Tensor | Mapping[int, float]


def _as_counts(class_counts: ClassCounts) -> list[float]:
    if isinstance(class_counts, Mapping):
        n = max(int(k) for k in class_counts) + 1 if class_counts else 0
        counts = [float(class_counts.get(c, 0)) for c in range(n)]
    elif isinstance(class_counts, Tensor):
        counts = [float(v) for v in class_counts.detach().cpu().reshape(-1).tolist()]
    else:
        counts = [float(v) for v in np.asarray(class_counts, dtype=float).reshape(-1)]
    if len(counts) < 2:
        raise ValueError(f"class_counts must give a count for every class (at least 2), "
                         f"got {counts}")
    for c, n_c in enumerate(counts):
        if not np.isfinite(n_c) or n_c < 0:
            raise ValueError(f"class_counts[{c}] = {n_c}: counts must be finite and >= 0")
        if n_c == 0:
            raise ValueError(
                f"class_counts[{c}] = 0: class {c} has no training example, so its "
                f"class-balanced weight (1-beta)/(1-beta^0) is undefined; use data that contains "
                f"both classes (in federated training pass the federation's pooled counts)")
    return counts


def class_balanced_weights(class_counts: ClassCounts, beta: float = 0.999) -> Tensor:
    """``w_c = (1 − β)/(1 − β^{n_c})`` normalised to ``Σ_c w_c = C`` (float32 tensor, length C)."""
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"beta must be in [0, 1), got {beta}")
    counts = np.asarray(_as_counts(class_counts), dtype=np.float64)
    effective = 1.0 - np.power(beta, counts)  # (1 − β^n) > 0 for n > 0, β < 1
    w = (1.0 - beta) / effective
    w = w / w.sum() * len(counts)
    return torch.as_tensor(w, dtype=torch.float32)


def focal_loss(logits: Tensor, y: Tensor, gamma: float = 1.5,
               weights: Tensor | None = None) -> Tensor:
    """Mean over the batch of ``w[y] · (1 − p_t)^γ · ce`` with ``p_t = exp(−ce)``, ce unweighted.

    ``weights`` None = unweighted focal loss. An empty batch gives 0 (attached to the graph).
    """
    y = y.long()
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    ce = F.cross_entropy(logits, y, reduction="none")
    pt = torch.exp(-ce)
    loss = (1.0 - pt) ** gamma * ce
    if weights is not None:
        if weights.numel() != logits.shape[-1]:
            raise ValueError(f"{weights.numel()} class weights for {logits.shape[-1]} logits")
        loss = weights.to(device=logits.device, dtype=logits.dtype)[y] * loss
    return loss.mean()


def cb_focal_loss(logits: Tensor, y: Tensor, class_counts: ClassCounts, beta: float = 0.999,
                  gamma: float = 1.5) -> Tensor:
    """Class-balanced focal loss from the class counts (see the module docstring)."""
    w = class_balanced_weights(class_counts, beta)
    if w.numel() != logits.shape[-1]:
        raise ValueError(f"class_counts has {w.numel()} classes but the model has "
                         f"{logits.shape[-1]} logits")
    return focal_loss(logits, y, gamma=gamma, weights=w)


def classification_loss(logits: Tensor, y: Tensor, cfg: ModelConfig,
                        class_counts: ClassCounts | None = None) -> Tensor:
    """``cfg.loss``: ``cb_focal`` (needs ``class_counts``) or ``ce`` (plain unweighted CE)."""
    if cfg.loss == "ce":
        if logits.shape[0] == 0:
            return logits.sum() * 0.0
        return F.cross_entropy(logits, y.long())
    if class_counts is None:
        raise ValueError("model.loss is 'cb_focal': pass the training class counts "
                         "(the federation's pooled counts in federated training)")
    return cb_focal_loss(logits, y, class_counts, beta=cfg.cb_beta, gamma=cfg.focal_gamma)


def sparsity_penalty(alpha: Tensor) -> Tensor:
    """Mean over the batch (and ensemble members) of the gate entropy H(α) (nats); 0 for an
    empty batch."""
    if alpha.shape[0] == 0:
        return alpha.sum() * 0.0
    return gate_entropy(alpha).mean()


def total_loss(logits: Tensor, y: Tensor, alpha: Tensor | None, cfg: ModelConfig,
               class_counts: ClassCounts | None = None) -> Tensor:
    """Classification loss (CB-focal or CE per ``cfg.loss``) + ``λ · mean entropy(α)``.

    ``alpha`` may be None only when ``cfg.sparsity_lambda`` is 0. With ensemble members,
    ``logits`` (B, k, C) and ``alpha`` (B, k, M) are the members' (``SAFN(..., members=True)``):
    the loss is the mean of the members' losses (each member is trained as its own model).
    """
    if logits.dim() == 3:  # ensemble members (B, k, C): each member fits on its own loss
        k = logits.shape[1]
        logits, y = logits.reshape(-1, logits.shape[-1]), y.repeat_interleave(k)
    loss = classification_loss(logits, y, cfg, class_counts)
    if cfg.sparsity_lambda > 0:
        if alpha is None:
            raise ValueError("model.sparsity_lambda > 0 needs the gate weights alpha; call the "
                             "model with return_weights=True")
        loss = loss + cfg.sparsity_lambda * sparsity_penalty(alpha)
    return loss
