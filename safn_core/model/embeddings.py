"""Per-feature input layers of the modality encoders: periodic numerical embeddings, feature dropout.

Periodic embeddings (Gorishniy, Rubachev & Babenko, "On embeddings for numerical features in
tabular deep learning", NeurIPS 2022, the "PLR(lite)" variant): each scaled feature ``x_j`` becomes

    v_j = [cos(2π c_j x_j), sin(2π c_j x_j)] ∈ R^{2k},    e_j = ReLU(W v_j + b) ∈ R^{d_e}

with ``k`` trainable frequencies ``c_j`` per feature (initialised N(0, σ²)) and one linear map
shared by the features of a modality; the encoder then reads the concatenation of every ``e_j``.
An MLP on raw scalars must bend one affine function of each feature into the shape the label
needs; the periodic basis gives it those shapes per feature, which is where tree ensembles beat
neural nets on tabular data.

`PeriodicFeatures` holds only the frequencies, so that its per-sample gradient for DP-SGD is one
closed form (`safn_core.privacy.grad_samplers`); the shared map is an ``nn.Linear`` on a
(batch, features, 2k) input, which Opacus supports natively.

Feature dropout (`FeatureDropout`) replaces each input feature, independently per participant
and only in training, by 0 (= the training mean after scaling) with probability p, without the
1/(1 − p) rescaling of ``nn.Dropout``: the model learns not to lean on any single feature, the
regulariser of choice for many features and few participants. No parameters, no batch statistics:
per-sample gradients are unaffected.

Parameter-efficient ensembling (`EnsembleAdapter`; TabM-mini, Gorishniy, Kotelnikov & Babenko,
"TabM: Advancing tabular deep learning with parameter-efficient ensembling", ICLR 2025): k
members share every weight of the network and differ only in a multiplicative adapter on the
input features, ``x (B, n) -> x ⊙ r_i (B, k, n)`` with ``r_i`` initialised to random signs ±1.
Each member is trained on its own loss and the prediction is the mean of their probabilities:
the variance of one small network trained on a few hundred participants averages out, at a
fraction of the cost of k separate networks (the shared layers simply see k times the rows).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class PeriodicFeatures(nn.Module):
    """``x (B, n) -> [cos(2π c x), sin(2π c x)] (B, n, 2k)`` with trainable ``c`` (n, k)."""

    def __init__(self, n_features: int, n_frequencies: int, sigma: float) -> None:
        super().__init__()
        if n_features < 1 or n_frequencies < 1 or sigma <= 0:
            raise ValueError(f"PeriodicFeatures needs n_features >= 1, n_frequencies >= 1, "
                             f"sigma > 0 (got {n_features}, {n_frequencies}, {sigma})")
        self.frequencies = nn.Parameter(torch.randn(n_features, n_frequencies) * sigma)

    def forward(self, x: Tensor) -> Tensor:
        v = 2 * math.pi * x.unsqueeze(-1) * self.frequencies  # (B, n, k)
        return torch.cat([torch.cos(v), torch.sin(v)], dim=-1)


class PeriodicEmbedding(nn.Module):
    """``x (B, n) -> (B, n · d_e)``: `PeriodicFeatures`, a shared Linear(2k, d_e), ReLU, flatten."""

    def __init__(self, n_features: int, n_frequencies: int, d_embedding: int,
                 sigma: float) -> None:
        super().__init__()
        self.periodic = PeriodicFeatures(n_features, n_frequencies, sigma)
        self.linear = nn.Linear(2 * n_frequencies, d_embedding)
        self.act = nn.ReLU()
        self.out_features = n_features * d_embedding

    def forward(self, x: Tensor) -> Tensor:  # x (..., n) -> (..., n · d_e)
        return self.act(self.linear(self.periodic(x))).flatten(-2)


class FeatureDropout(nn.Module):
    """In training, each feature of each participant is set to 0 with probability ``p``."""

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"feature dropout must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = torch.rand_like(x) >= self.p
        return torch.where(keep, x, torch.zeros_like(x))

    def extra_repr(self) -> str:
        return f"p={self.p}"


class EnsembleAdapter(nn.Module):
    """``x (B, n) -> x.unsqueeze(1) * r (B, k, n)``: member i sees its features scaled by ``r_i``.

    ``r`` (k, n) starts as random signs (±1, from the global RNG: seed it for reproducible
    weights) so that the members start apart although every other weight is shared; it is
    trained and averaged like every other parameter. Its per-sample gradient under DP-SGD is a
    closed form registered in `safn_core.privacy.grad_samplers`.
    """

    def __init__(self, n_features: int, k: int) -> None:
        super().__init__()
        if n_features < 1 or k < 1:
            raise ValueError(f"EnsembleAdapter needs n_features >= 1 and k >= 1 "
                             f"(got {n_features}, {k})")
        signs = torch.randint(0, 2, (k, n_features)).float() * 2 - 1
        self.r = nn.Parameter(signs)

    def forward(self, x: Tensor) -> Tensor:
        return x.unsqueeze(1) * self.r

    def extra_repr(self) -> str:
        k, n = self.r.shape
        return f"members={k}, features={n}"


class FeatureNoise(nn.Module):
    """In training, adds ``σ · N(0, 1)`` to every (scaled) feature of every participant."""

    def __init__(self, sigma: float) -> None:
        super().__init__()
        if sigma < 0:
            raise ValueError(f"feature noise must be >= 0, got {sigma}")
        self.sigma = sigma

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.sigma == 0.0:
            return x
        return x + self.sigma * torch.randn_like(x)

    def extra_repr(self) -> str:
        return f"sigma={self.sigma}"
