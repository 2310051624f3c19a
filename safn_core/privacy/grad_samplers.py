"""Per-sample gradients of SAFN's own parametrised layers, registered with Opacus.

Opacus computes per-sample gradients layer by layer and knows ``nn.Linear``, ``nn.LayerNorm`` and
the other stock layers; a layer holding its own ``nn.Parameter`` needs a grad sampler, registered
through Opacus' public ``register_grad_sampler``. Importing this module registers them;
`safn_core.privacy.engine` imports it before ``make_private``.

`PeriodicFeatures`: ``o = [cos v, sin v]``, ``v = 2π x c`` (per feature j, frequency k), so with
the backpropagated ``g = [g_cos, g_sin]`` of one participant

    ∂L/∂c_jk = 2π x_j (cos(v_jk) g_sin,jk − sin(v_jk) g_cos,jk).

Under parameter-efficient ensembling the layers after the adapter see (B, k, ...) inputs: every
sampler sums the members' contributions of one participant (all dimensions between the batch and
the parameter's own). `EnsembleAdapter`: ``o_i = x ⊙ r_i``, so ``∂L/∂r_i = x ⊙ g_i``.

Grouped layers (`safn_core.model.grouped`), inputs (B, .., G, in): `GroupedLinear` has
``∂L/∂W_g = Σ x_g^T g_g`` and ``∂L/∂b_g = Σ g_g`` per participant (Σ over the dimensions between
batch and group); `GroupedLayerNorm` has ``∂L/∂w_g = Σ x̂_g ⊙ g_g`` and ``∂L/∂b_g = Σ g_g`` with
``x̂`` the normalised input.
"""

from __future__ import annotations

import math

import torch
from opacus.grad_sample import register_grad_sampler
from torch import Tensor, nn

from safn_core.model.embeddings import EnsembleAdapter, PeriodicFeatures
from safn_core.model.grouped import GroupedLayerNorm, GroupedLinear


def _per_participant(grad: Tensor, param_dims: int) -> Tensor:
    """Sum ``grad`` (B, ..., *param shape) over the dimensions between batch and parameter."""
    extra = grad.dim() - 1 - param_dims
    return grad.sum(dim=tuple(range(1, 1 + extra))) if extra > 0 else grad


@register_grad_sampler(PeriodicFeatures)
def periodic_features_grad_sample(layer: PeriodicFeatures, activations: list[Tensor],
                                  backprops: Tensor) -> dict[nn.Parameter, Tensor]:
    x = activations[0].to(backprops.dtype)  # (B, [k,] n)
    k = layer.frequencies.shape[1]
    v = 2 * math.pi * x.unsqueeze(-1) * layer.frequencies  # (B, n, k)
    g_cos, g_sin = backprops[..., :k], backprops[..., k:]
    grad = 2 * math.pi * x.unsqueeze(-1) * (torch.cos(v) * g_sin - torch.sin(v) * g_cos)
    grad = _per_participant(grad, 2)
    return {layer.frequencies: grad} if layer.frequencies.requires_grad else {}


@register_grad_sampler(EnsembleAdapter)
def ensemble_adapter_grad_sample(layer: EnsembleAdapter, activations: list[Tensor],
                                 backprops: Tensor) -> dict[nn.Parameter, Tensor]:
    x = activations[0].to(backprops.dtype)  # (B, n); backprops (B, k, n)
    return {layer.r: x.unsqueeze(1) * backprops} if layer.r.requires_grad else {}



def _rows(t: Tensor) -> Tensor:
    """(B, .., G, f) -> (B, N, G, f): every dimension between batch and group flattened."""
    return t.reshape(t.shape[0], -1, *t.shape[-2:])


@register_grad_sampler(GroupedLinear)
def grouped_linear_grad_sample(layer: GroupedLinear, activations: list[Tensor],
                               backprops: Tensor) -> dict[nn.Parameter, Tensor]:
    x, g = _rows(activations[0].to(backprops.dtype)), _rows(backprops)
    out = {}
    if layer.weight.requires_grad:
        out[layer.weight] = torch.einsum("bngi,bngo->bgio", x, g)
    if layer.bias.requires_grad:
        out[layer.bias] = g.sum(dim=1)
    return out


@register_grad_sampler(GroupedLayerNorm)
def grouped_layer_norm_grad_sample(layer: GroupedLayerNorm, activations: list[Tensor],
                                   backprops: Tensor) -> dict[nn.Parameter, Tensor]:
    x_hat = _rows(layer.normalised(activations[0].to(backprops.dtype)))
    g = _rows(backprops)
    out = {}
    if layer.weight.requires_grad:
        out[layer.weight] = (x_hat * g).sum(dim=1)
    if layer.bias.requires_grad:
        out[layer.bias] = g.sum(dim=1)
    return out
