"""A site's part of one distributed DP-SGD step: its Poisson sample's clipped gradient sum.

`poisson_sample` includes each training participant independently with probability ``q`` (the
sampling Opacus' accountant assumes; shuffled fixed-size batches would understate ε).
`clipped_gradient_sum` computes every sampled participant's own gradient at the global weights
with Opacus' ``GradSampleModule`` (SAFN's own layers are registered in `grad_samplers`), clips
each to L2 norm ``C`` over all weights, exactly as Opacus' ``DPOptimizer`` does, and returns their
sum as one float64 vector in the model's wire order (`safn_core.federation.wire.Layout`). The
noise is added by `noise_shares.NoiseShares.encode`.

The loss is the training loss of a non-DP site (`safn_core.model.losses.total_loss`: the
class-balanced focal loss with the federation's class counts, the members' mean for an
ensemble), which is a mean of per-participant terms, so one participant's gradient is the
gradient of its own term.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch

import safn_core.privacy.grad_samplers  # noqa: F401  (Opacus learns SAFN's own layers)
from safn_core.config import ModelConfig
from safn_core.data.cohort import Modality
from safn_core.federation.wire import Layout
from safn_core.model.losses import total_loss
from safn_core.training.local import Arrays, make_model


def poisson_sample(n: int, sample_rate: float, rng: np.random.Generator) -> np.ndarray:
    """Indices of the participants drawn, each independently with probability ``sample_rate``."""
    if not 0 < sample_rate <= 1:
        raise ValueError(f"a sampling rate must be in (0, 1], got {sample_rate!r}")
    return np.flatnonzero(rng.random(n) < sample_rate)


def clipped_gradient_sum(state: dict[str, np.ndarray], modalities: Sequence[Modality],
                         model_cfg: ModelConfig, data: Arrays, sampled: np.ndarray,
                         clipping_norm: float, class_counts, layout: Layout, *,
                         seed: int, target=None) -> tuple[np.ndarray, int]:
    """Σ over the sampled participants of their gradients clipped to ``clipping_norm``, at the
    weights ``state``, in ``layout`` order (zeros for buffers); and how many were clipped.

    ``seed`` seeds the model's dropout (training mode, as in DP-SGD at a site); ``target``: the
    site's `safn_core.targets.Target` (K outputs; None: the binary pd_vs_hc model)."""
    from opacus import GradSampleModule

    out = np.zeros(layout.size, dtype=np.float64)
    if len(sampled) == 0:
        return out, 0
    torch.manual_seed(seed)
    model = make_model(tuple(modalities), model_cfg, seed, target=target)
    model.load_state_dict({k: torch.as_tensor(np.asarray(v)) for k, v in state.items()})
    model.train()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Full backward hook is firing.*")
        gsm = GradSampleModule(model, loss_reduction="sum")
        x = torch.from_numpy(data.x[sampled])
        m = torch.from_numpy(data.mask[sampled])
        y = torch.from_numpy(data.y[sampled])
        logits, alpha = gsm(x, m, return_weights=True, members=True)
        # total_loss is a mean over participants: × B makes it their sum (loss_reduction "sum")
        loss = total_loss(logits, y, alpha, model_cfg, class_counts) * len(y)
        loss.backward()
    named = dict(model.named_parameters())
    per_sample = {name: p.grad_sample.reshape(len(y), -1).double()
                  for name, p in named.items() if p.requires_grad and p.grad_sample is not None}
    norms = torch.sqrt(sum((g ** 2).sum(dim=1) for g in per_sample.values()))
    factor = (clipping_norm / (norms + 1e-6)).clamp(max=1.0)
    clipped = int((norms > clipping_norm).sum())
    sums = {name: (g * factor[:, None]).sum(dim=0).numpy() for name, g in per_sample.items()}
    state_shapes = {k: np.asarray(v).shape for k, v in state.items()}
    full = {k: (sums[k].reshape(shape) if k in sums else np.zeros(shape))
            for k, shape in state_shapes.items()}
    out[:] = layout.flatten(full)
    return out, clipped
