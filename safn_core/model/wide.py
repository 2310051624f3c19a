"""SAFN's wide path (``model.wide``) for K classes: setting it to a logistic regression, and how
much each modality contributes to it.

The wide path is one linear layer on all features concatenated, added to the deep output. Its
width follows the head (`safn_core.model.ordinal`): K logits for the softmax head, one score η
for the ordinal head. While the deep output is still zero (a model as built), the model *is* the
wide path, so `set_wide` makes the untrained SAFN equal a fitted regression exactly:

* binary (K = 2, softmax): ``coef`` (F,), ``intercept`` a number — row 0 = 0, row 1 = coef, bias
  [0, intercept]: P(class 1) = σ(intercept + coef·x). (As before.)
* multinomial (K > 2, softmax): ``coef`` (K, F) and ``intercept`` (K,), or ``coef`` (K − 1, F)
  and ``intercept`` (K − 1,) with class 0 the reference (its row 0): P = softmax(W x + b).
* ordinal (cumulative logit): ``coef`` (F,) = the weights of η (η = coef·x, the wide bias 0) and
  ``intercept`` = the K − 1 increasing cut points θ, set as the ordinal link's thresholds:
  P(y ≤ k) = σ(θ_k − coef·x) (the convention of statsmodels' ``OrderedModel``).

Contributions (`wide_parts`, `wide_shares`): for the binary and the ordinal head one number per
participant and modality — its part of the logit of class 1 (logit 1 − logit 0), resp. of η; for
the multinomial head one per class c = 1..K−1 — its part of logit c − logit 0 (class 0 the
reference, as in the binary case).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def _finite(*tensors: Tensor) -> None:
    if not all(bool(torch.isfinite(t).all()) for t in tensors):
        raise ValueError("set_wide: the coefficients and intercepts must be finite")


@torch.no_grad()
def set_wide(model: nn.Module, layer: nn.Linear, coef, intercept) -> None:
    """Put a fitted regression in ``layer`` (``model``'s wide path); see the module docstring."""
    dtype, k, f = layer.weight.dtype, model.n_classes, layer.in_features
    coef = torch.as_tensor(coef, dtype=dtype)
    b = torch.as_tensor(intercept, dtype=dtype).reshape(-1)
    if model.head_kind == "ordinal":
        coef = coef.reshape(-1)
        if coef.numel() != f:
            raise ValueError(f"set_wide: {coef.numel()} coefficients for {f} features")
        if b.numel() != k - 1:
            raise ValueError(f"set_wide: an ordinal head of {k} classes takes {k - 1} cut "
                             f"points as the intercept, got {b.numel()}")
        _finite(coef, b)
        model.link.set_thresholds(b.double())
        layer.weight.copy_(coef.reshape(1, -1))
        layer.bias.zero_()
        return
    if k == 2 and coef.dim() == 1:  # the binary logistic regression: coef (F,), intercept
        coef, b = coef.reshape(1, -1), b.reshape(-1)
    if coef.dim() != 2 or coef.shape[1] != f or coef.shape[0] not in (k - 1, k):
        raise ValueError(f"set_wide: coefficients of shape {tuple(coef.shape)}; a model of {k} "
                         f"classes and {f} features takes ({k}, {f}) or ({k - 1}, {f})"
                         + (f" or ({f},)" if k == 2 else ""))
    if b.numel() != coef.shape[0]:
        raise ValueError(f"set_wide: {b.numel()} intercepts for {coef.shape[0]} rows of "
                         f"coefficients")
    _finite(coef, b)
    first = k - coef.shape[0]  # 1: class 0 is the reference (its row and bias 0)
    layer.weight.zero_()
    layer.bias.zero_()
    layer.weight[first:].copy_(coef)
    layer.bias[first:].copy_(b)


def _contrasts(model: nn.Module, layer: nn.Linear) -> Tensor:
    """(R, F): the rows whose parts are reported — η (ordinal), w_1 − w_0 (binary), w_c − w_0
    for c = 1..K−1 (multinomial)."""
    w = layer.weight
    if model.head_kind == "ordinal":
        return w
    return w[1:] - w[:1]


@torch.no_grad()
def wide_parts(model: nn.Module, layer: nn.Linear, xs: list[Tensor], mask: Tensor) -> Tensor:
    """Each modality's part of the reported wide contrasts: (B, M) for the binary and the ordinal
    head, (B, M, K − 1) for the multinomial head; absent modalities 0."""
    w = _contrasts(model, layer)  # (R, F)
    parts, start = [], 0
    for m, xm in enumerate(xs):
        stop = start + xm.shape[1]
        xm = torch.where(mask[:, m:m + 1], xm, torch.zeros_like(xm))
        parts.append(xm @ w[:, start:stop].T)  # (B, R)
        start = stop
    out = torch.stack(parts, dim=1)  # (B, M, R)
    return out.squeeze(-1) if w.shape[0] == 1 else out


def shares_of(parts: Tensor, names) -> dict[str, float]:
    """``Cov(c_m, s) / Var(s)`` per modality for parts (B, M) with sum s (see `SAFN.wide_shares`)."""
    parts = parts.double()
    total = parts.sum(dim=1)
    centred, total_c = parts - parts.mean(dim=0), total - total.mean()
    var = float((total_c * total_c).sum())
    if len(total) < 2 or var <= 1e-12 * max(1.0, float((total * total).sum())):
        return {name: 0.0 for name in names}
    cov = (centred * total_c.unsqueeze(1)).sum(dim=0) / var
    return {name: float(v) for name, v in zip(names, cov)}


def wide_shares(parts: Tensor, names) -> dict:
    """Shares of (B, M) parts: {modality: share}; of (B, M, K − 1) parts (multinomial):
    {modality: [share in logit c − logit 0 for c = 1..K−1]}."""
    if parts.dim() == 2:
        return shares_of(parts, names)
    per = [shares_of(parts[..., c], names) for c in range(parts.shape[-1])]
    return {name: [p[name] for p in per] for name in names}


__all__ = ["set_wide", "wide_parts", "wide_shares", "shares_of"]
