"""Sparsity-constrained attention-gating fusion: per-sample modality weights α.

Gate scores ``s_m = w · tanh(W z_m + b)``; ``α = softmax(s)``, ``sparsemax(s)`` (Martins &
Astudillo 2016) or ``entmax15(s)`` (Peters et al. 2019), computed over the *present* modalities
only. A masked (absent) modality gets ``α = 0`` exactly, and ``Σ_m α_m = 1`` for every sample with
at least one present modality (a sample with none gets α = 0 everywhere).

Sparsemax and 1.5-entmax are exact sort-based closed forms written with differentiable torch ops;
autograd through them gives the true Jacobian (the support is locally constant).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

GateKind = Literal["softmax", "sparsemax", "entmax15"]


def _prepare(scores: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """Replace masked scores by a value far enough below the present maximum to get weight 0.

    Sparsemax zeroes every score below ``max - 1`` and 1.5-entmax every score below ``max - 2``,
    so ``max - 10`` is exactly zero for both; the fill is detached (it never receives gradient).
    """
    if mask is None:
        return scores, None
    mask = mask.to(torch.bool)
    neg_inf = torch.tensor(float("-inf"), dtype=scores.dtype, device=scores.device)
    top = torch.where(mask, scores, neg_inf).amax(dim=-1, keepdim=True).detach()
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))  # all masked: any value
    return torch.where(mask, scores, top - 10.0), mask


def _finish(p: Tensor, mask: Tensor | None) -> Tensor:
    if mask is None:
        return p
    return p * mask.to(p.dtype)


def masked_softmax(scores: Tensor, mask: Tensor | None = None) -> Tensor:
    """Softmax over the last dim restricted to ``mask`` (True = present); masked → exactly 0."""
    if mask is None:
        return torch.softmax(scores, dim=-1)
    mask = mask.to(torch.bool)
    filled = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    return torch.softmax(filled, dim=-1) * mask.to(scores.dtype)


def sparsemax(scores: Tensor, mask: Tensor | None = None) -> Tensor:
    """Euclidean projection of ``scores`` onto the simplex, over the last dim (sort-based)."""
    z, mask = _prepare(scores, mask)
    m = z.shape[-1]
    zs, _ = torch.sort(z, dim=-1, descending=True)
    k = torch.arange(1, m + 1, dtype=z.dtype, device=z.device)
    cumsum = zs.cumsum(dim=-1)
    support = (1 + k * zs) > cumsum  # a prefix of the sorted scores
    k_star = support.sum(dim=-1, keepdim=True).clamp_min(1)
    tau = (cumsum.gather(-1, k_star - 1) - 1) / k_star.to(z.dtype)
    p = torch.clamp(z - tau, min=0)
    p = p / p.sum(dim=-1, keepdim=True)  # removes float rounding; analytically a no-op
    return _finish(p, mask)


def entmax15(scores: Tensor, mask: Tensor | None = None) -> Tensor:
    """1.5-entmax over the last dim: ``p_i = [z_i/2 − τ]_+²`` with Σp = 1 (exact sort-based)."""
    z, mask = _prepare(scores, mask)
    z = z / 2
    z = z - z.amax(dim=-1, keepdim=True).detach()  # shift invariance; keeps the squares small
    m = z.shape[-1]
    zs, _ = torch.sort(z, dim=-1, descending=True)
    k = torch.arange(1, m + 1, dtype=z.dtype, device=z.device)
    mean = zs.cumsum(dim=-1) / k
    mean_sq = (zs ** 2).cumsum(dim=-1) / k
    ss = k * (mean_sq - mean ** 2)
    delta = (1 - ss) / k
    tau_k = mean - torch.sqrt(delta.clamp_min(0))
    support = tau_k <= zs
    k_star = support.sum(dim=-1, keepdim=True).clamp_min(1)
    # Recompute τ at k* only, so the sqrt's gradient is taken where its argument is positive.
    delta_star = delta.gather(-1, k_star - 1)
    tau = mean.gather(-1, k_star - 1) - torch.sqrt(delta_star.clamp_min(1e-30))
    p = torch.clamp(z - tau, min=0) ** 2
    p = p / p.sum(dim=-1, keepdim=True)
    return _finish(p, mask)


def normalise(scores: Tensor, mask: Tensor | None, kind: GateKind) -> Tensor:
    if kind == "softmax":
        return masked_softmax(scores, mask)
    if kind == "sparsemax":
        return sparsemax(scores, mask)
    if kind == "entmax15":
        return entmax15(scores, mask)
    raise ValueError(f"unknown gate {kind!r}; expected softmax, sparsemax or entmax15")


def gate_entropy(alpha: Tensor) -> Tensor:
    """Per-sample Shannon entropy (nats) of α (B, M), with 0·log 0 = 0 and finite gradients."""
    pos = alpha > 0
    safe = torch.where(pos, alpha, torch.ones_like(alpha))
    return -(torch.where(pos, alpha * torch.log(safe), torch.zeros_like(alpha))).sum(dim=-1)


class GatingFusion(nn.Module):
    """``α = normalise(w · tanh(W z_m + b))`` over modalities; ``f = Σ_m α_m z_m``.

    ``forward(z (B, M, D), mask (B, M) bool or None) -> (f (B, D), α (B, M))``; with ensemble
    members z is (B, k, M, D), f (B, k, D) and α (B, k, M).
    """

    def __init__(self, d_model: int, hidden: int | None = None, kind: GateKind = "softmax") -> None:
        super().__init__()
        hidden = hidden or d_model
        self.proj = nn.Linear(d_model, hidden)
        self.score = nn.Linear(hidden, 1, bias=False)  # a bias would cancel in every normaliser
        self.kind = kind

    def forward(self, z: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        s = self.score(torch.tanh(self.proj(z))).squeeze(-1)  # (B, [k,] M)
        if mask is not None and s.dim() > mask.dim():  # ensemble members share the batch's mask
            mask = mask.reshape(mask.shape[0], *([1] * (s.dim() - 2)), mask.shape[-1])
        alpha = normalise(s, mask, self.kind)
        f = (alpha.unsqueeze(-1) * z).sum(dim=-2)
        return f, alpha
