"""SAFN's output heads for K classes: which head a model has, and the ordinal (cumulative link) link.

Two heads (``model.head``; `head_for` says which a model gets):

* ``softmax``: every path ends in K logits (multi-class softmax; K = 2 is the binary model).
* ``ordinal`` (K > 2 ordered classes, cumulative link / proportional odds, McCullagh 1980): every
  path ends in ONE score η, and K − 1 ordered thresholds θ_1 < … < θ_{K−1} give::

      P(y ≤ k) = σ(θ_k − η),   P(y = k) = P(y ≤ k) − P(y ≤ k − 1)   (P(y ≤ 0) = 0, P(y ≤ K) = 1)

  so a larger η moves probability toward the higher classes for every k at once (stochastic
  ordering), with one score instead of K − 1 free logits: the order is a constraint, not
  something the model must learn from few participants.

`OrdinalLink` returns the *log* class probabilities as the logits (B, [k,] K): softmax of them
is the class probabilities exactly (they already sum to 1), so cross-entropy, the class-balanced
focal loss, the ensemble mixture ``log mean softmax`` and temperature scaling all work on them
unchanged.

Numerics: every log probability is a sum of log-sigmoids (stable for any η), the middle classes
through ``σ(a) − σ(b) = σ(a) σ(−b) (1 − e^{−(a−b)})`` with ``a − b = Δ`` the threshold increment,
so no difference of two rounded probabilities is ever taken; Δ is kept ≥ ``MIN_GAP`` so that no
class probability is exactly 0 (its log finite, its gradient bounded). No log probability is
clamped: a confidently wrong prediction keeps its gradient.

Differential privacy: the thresholds' raw parameters are the bias of an ``nn.Linear(1, K − 1)``
applied to a constant input of ones (its weight fixed at zero, ``requires_grad`` False), so Opacus'
own ``nn.Linear`` grad sampler gives their exact per-sample gradients and no custom sampler is
needed. θ_1 = raw_1 (free), θ_k = θ_{k−1} + softplus(raw_k) + ``MIN_GAP``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MIN_GAP = 1e-6
"""Smallest gap between consecutive thresholds (every class probability stays > 0)."""

HEADS = ("softmax", "ordinal")


def head_for(head: str, n_classes: int, ordered: bool) -> str:
    """The head a model with ``n_classes`` classes gets for ``model.head`` = ``head``.

    Binary targets always get ``softmax`` (one head: P(class 1), the model of before). For
    K > 2 the configured head; ``ordinal`` on an unordered target is refused (its classes have
    no order to exploit)."""
    if head not in HEADS:
        raise ValueError(f"model.head must be softmax or ordinal, not {head!r}")
    if n_classes < 2:
        raise ValueError(f"a model needs at least 2 classes, got {n_classes}")
    if n_classes == 2:
        return "softmax"
    if head == "ordinal" and not ordered:
        raise ValueError("model.head is 'ordinal' but the target's classes are not ordered; "
                         "use head 'softmax'")
    return head


def _softplus_inverse(d: Tensor) -> Tensor:
    """x with softplus(x) = d (d > 0): d + log(1 − e^{−d}), stable for small and large d."""
    return d + torch.log(-torch.expm1(-d))


class OrdinalLink(nn.Module):
    """Score η (..., 1) → log class probabilities (..., K) of the cumulative logit model.

    ``thresholds()`` gives θ (K − 1,), increasing; `set_thresholds` sets them (e.g. to an
    ordinal logistic regression's cut points). Initialised so that η = 0 gives every class
    probability 1/K (θ_k = logit(k/K)).
    """

    def __init__(self, n_classes: int) -> None:
        super().__init__()
        if n_classes < 3:
            raise ValueError(f"an ordinal head needs K >= 3 classes, got {n_classes}")
        self.n_classes = n_classes
        self.raw = nn.Linear(1, n_classes - 1)
        with torch.no_grad():
            self.raw.weight.zero_()
        self.raw.weight.requires_grad_(False)
        k = torch.arange(1, n_classes, dtype=torch.float64) / n_classes
        self.set_thresholds(torch.log(k / (1 - k)))

    @staticmethod
    def _theta(raw: Tensor) -> tuple[Tensor, Tensor]:
        """Raw parameters (..., K − 1) → increasing thresholds θ (..., K − 1) and their gaps
        Δ_k = θ_{k+1} − θ_k (..., K − 2), the gaps computed directly (θ's differences lose
        digits where θ is large)."""
        gaps = F.softplus(raw[..., 1:]) + MIN_GAP
        theta = torch.cat([raw[..., :1], raw[..., :1] + torch.cumsum(gaps, dim=-1)], dim=-1)
        return theta, gaps

    def thresholds(self) -> Tensor:
        """θ_1 < … < θ_{K−1} (K − 1,), detached."""
        with torch.no_grad():
            return self._theta(self.raw.bias)[0]

    @torch.no_grad()
    def set_thresholds(self, theta) -> None:
        """Set θ (K − 1 strictly increasing finite numbers, gaps > ``MIN_GAP``)."""
        theta = torch.as_tensor(theta, dtype=torch.float64).reshape(-1)
        if theta.numel() != self.n_classes - 1:
            raise ValueError(f"{theta.numel()} thresholds for {self.n_classes} classes "
                             f"(need {self.n_classes - 1})")
        if not bool(torch.isfinite(theta).all()):
            raise ValueError("ordinal thresholds must be finite")
        gaps = theta[1:] - theta[:-1] - MIN_GAP
        if bool((gaps <= 0).any()):
            raise ValueError(f"ordinal thresholds must increase by more than {MIN_GAP}: "
                             f"{theta.tolist()}")
        raw = torch.cat([theta[:1], _softplus_inverse(gaps)])
        self.raw.bias.copy_(raw.to(self.raw.bias.dtype))

    def forward(self, eta: Tensor) -> Tensor:
        """``eta`` (B, .., 1) → log P(y = k) (B, .., K)."""
        ones = eta.new_ones(eta.shape[0], 1)
        raw = self.raw(ones)  # (B, K-1): the bias, through a layer Opacus knows
        raw = raw.reshape(raw.shape[0], *([1] * (eta.dim() - 2)), raw.shape[-1])
        theta, gap = self._theta(raw)  # (B, .., K-1), (B, .., K-2)
        t = theta - eta  # θ_k − η
        first = F.logsigmoid(t[..., :1])  # log σ(θ_1 − η)
        last = F.logsigmoid(-t[..., -1:])  # log(1 − σ(θ_{K−1} − η))
        middle = F.logsigmoid(t[..., 1:]) + F.logsigmoid(-t[..., :-1]) \
            + torch.log(-torch.expm1(-gap))
        return torch.cat([first, middle, last], dim=-1)

    def extra_repr(self) -> str:
        return f"n_classes={self.n_classes}"


def cumulative_probabilities(eta: Tensor, theta: Tensor) -> Tensor:
    """P(y ≤ k) = σ(θ_k − η) (..., K − 1): the reference formula (tests, documentation)."""
    return torch.sigmoid(theta - eta)


def class_probabilities(eta: Tensor, theta: Tensor) -> Tensor:
    """P(y = k) (..., K) from η (..., 1) and θ (K − 1,) by differences of `cumulative_probabilities`
    (plain, not log-space: the reference the link is tested against)."""
    c = cumulative_probabilities(eta, theta)
    zeros, ones = torch.zeros_like(c[..., :1]), torch.ones_like(c[..., :1])
    c = torch.cat([zeros, c, ones], dim=-1)
    return c[..., 1:] - c[..., :-1]


__all__ = ["HEADS", "MIN_GAP", "OrdinalLink", "head_for", "class_probabilities",
           "cumulative_probabilities"]
