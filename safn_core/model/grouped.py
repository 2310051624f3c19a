"""Grouped layers: G independent ``Linear`` / ``LayerNorm`` layers run as one batched operation.

SAFN has parts of the same shape that never share weights: the tail of every modality encoder,
and the two cross-attention blocks (imaging queries / clinical keys, and the reverse). Run one by
one, each is a dozen tiny CPU operations whose fixed cost (dispatch, autograd bookkeeping) is most
of a training step on a few hundred participants. A grouped layer holds the G layers' weights
stacked, ``weight (G, in, out)``, and runs them as one batched matrix product over inputs laid out
as ``(..., G, in)``: the same function, the same parameters per group, a few operations instead of
G times as many.

Differential privacy: Opacus does not know these layers; their per-sample gradients are closed
forms registered in `safn_core.privacy.grad_samplers` (inputs may carry any dimensions between the
batch and the group dimension: tokens, ensemble members).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class GroupedLinear(nn.Module):
    """``y[..., g, :] = x[..., g, :] @ weight[g] + bias[g]`` for g = 0..G-1.

    Initialised like ``nn.Linear`` (uniform ±1/√in) group by group.
    """

    def __init__(self, groups: int, in_features: int, out_features: int) -> None:
        super().__init__()
        if min(groups, in_features, out_features) < 1:
            raise ValueError(f"GroupedLinear needs groups, in_features, out_features >= 1 "
                             f"(got {groups}, {in_features}, {out_features})")
        self.groups, self.in_features, self.out_features = groups, in_features, out_features
        bound = 1.0 / math.sqrt(in_features)
        self.weight = nn.Parameter(torch.empty(groups, in_features, out_features)
                                   .uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(groups, out_features).uniform_(-bound, bound))

    def forward(self, x: Tensor) -> Tensor:
        *lead, g, i = x.shape
        if g != self.groups or i != self.in_features:
            raise ValueError(f"GroupedLinear expects (..., {self.groups}, {self.in_features}), "
                             f"got {tuple(x.shape)}")
        flat = x.reshape(-1, g, i).transpose(0, 1)  # (G, N, in)
        y = torch.baddbmm(self.bias.unsqueeze(1), flat, self.weight)  # (G, N, out)
        return y.transpose(0, 1).reshape(*lead, g, self.out_features)

    def extra_repr(self) -> str:
        return f"groups={self.groups}, in_features={self.in_features}, " \
               f"out_features={self.out_features}"


class GroupedLayerNorm(nn.Module):
    """LayerNorm over the last dimension with its own affine weight and bias per group."""

    def __init__(self, groups: int, features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.groups, self.features, self.eps = groups, features, eps
        self.weight = nn.Parameter(torch.ones(groups, features))
        self.bias = nn.Parameter(torch.zeros(groups, features))

    def normalised(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, (self.features,), eps=self.eps)

    def forward(self, x: Tensor) -> Tensor:  # (..., G, features)
        return torch.addcmul(self.bias, self.normalised(x), self.weight)

    def extra_repr(self) -> str:
        return f"groups={self.groups}, features={self.features}, eps={self.eps}"


class FastDropout(nn.Module):
    """Inverted dropout like ``nn.Dropout``, with the mask drawn by ``torch.rand``.

    ``nn.Dropout`` draws its mask with ``bernoulli_``, which on CPU costs about three times as
    much per element as a uniform draw; on SAFN's small tensors the draws were the largest single
    cost of a training step. Same expectation, same drop probability.
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        scale = torch.rand_like(x).ge_(self.p).mul_(1.0 / (1.0 - self.p))  # 0 or 1/(1-p)
        return x * scale

    def extra_repr(self) -> str:
        return f"p={self.p}"
