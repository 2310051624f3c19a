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

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.linear(self.periodic(x))).flatten(1)


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
