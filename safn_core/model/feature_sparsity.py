"""Feature selection in SAFN's deep path: a group-lasso proximal step on each feature's
first-layer weights (``model.feature_lasso``).

Where features outnumber participants, gradient boosting wins by ignoring most features. The deep
path can do the same: every feature enters its modality's encoder through the columns of one
linear layer (one column per feature; ``numeric_embedding: periodic``: the block of columns of
its embedding), and after every optimizer step each feature's block ``W_j`` is shrunk toward
zero by the proximal operator of λ‖W_j‖ (group lasso, Yuan & Lin 2006)::

    W_j ← W_j · max(0, 1 − η·λ / ‖W_j‖)          η: the step's learning rate

so a feature whose gradient does not keep pulling its weights away from zero is switched off
exactly, and stays off unless the data pull it back. The wide path (the logistic regression SAFN
starts from) keeps its L2 penalty and every feature.

Why a proximal step and not a penalty in the loss: under DP-SGD only per-sample gradients are
clipped and noised, and a penalty on parameters alone has no per-sample gradient (Opacus would
drop it). The proximal step is applied to the weights after the (noised) step: post-processing,
which costs no privacy, and the same at a centralised fit, a federated site and a DP site.
`kept_features` says which features the deep path still reads.
"""

from __future__ import annotations

import torch
from torch import nn


def feature_blocks(model: nn.Module) -> list[tuple[nn.Linear, int, int]]:
    """For every modality: (its encoder's first linear layer, number of features, columns per
    feature)."""
    model = getattr(model, "_module", model)  # Opacus' GradSampleModule wraps the model
    out = []
    for encoder, n in zip(model.encoders, model.n_features):
        linear = encoder[-1]
        if linear.in_features % n:
            raise ValueError(f"an encoder's first layer has {linear.in_features} inputs, not a "
                             f"multiple of its {n} features")
        out.append((linear, n, linear.in_features // n))
    return out


@torch.no_grad()
def proximal_step(model: nn.Module, strength: float) -> None:
    """Shrink each feature's first-layer block by ``strength`` (= η·λ) in norm (see module)."""
    if strength <= 0:
        return
    for linear, n, width in feature_blocks(model):
        w = linear.weight.view(linear.out_features, n, width)
        norms = w.square().sum(dim=(0, 2)).sqrt()  # (n,)
        factor = torch.clamp(1.0 - strength / norms.clamp_min(1e-12), min=0.0)
        w.mul_(factor.view(1, n, 1))


def lasso_step(model: nn.Module, optimizer: torch.optim.Optimizer, lam: float):
    """An ``after_step`` hook (`safn_core.training.local.run_epochs`) taking the proximal step
    at the optimizer's current learning rate; None when ``lam`` is 0."""
    if lam <= 0:
        return None

    def after_step() -> None:
        proximal_step(model, float(optimizer.param_groups[0]["lr"]) * lam)

    return after_step


@torch.no_grad()
def kept_features(model: nn.Module, names: list[str] | tuple[str, ...]) -> list[str]:
    """The features whose first-layer block is not exactly zero, in ``names`` order (the
    modalities' features concatenated)."""
    kept = []
    for linear, n, width in feature_blocks(model):
        w = linear.weight.view(linear.out_features, n, width)
        kept.append(w.abs().sum(dim=(0, 2)) > 0)
    mask = torch.cat(kept).tolist()
    if len(mask) != len(names):
        raise ValueError(f"{len(names)} feature names for {len(mask)} features")
    return [f for f, keep in zip(names, mask) if keep]
