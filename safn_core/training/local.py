"""Local training of SAFN on one participant set: the loop every engine calls.

A centralised fold, a federated site and a DP site all train through `run_epochs`; they differ
only in the data loader and optimizer they pass (Opacus supplies its own for DP-SGD) and in an
optional proximal term (FedProx).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from safn_core.config import ModelConfig, TrainConfig
from safn_core.data.cohort import LABEL, Modality
from safn_core.model import SAFN, total_loss
from safn_core.model.losses import classification_loss


@dataclass
class Arrays:
    """Preprocessed participants: features concatenated in modality order, mask and labels."""

    x: np.ndarray  # (n, F) float32
    mask: np.ndarray  # (n, M) bool
    y: np.ndarray  # (n,) int64

    def __len__(self) -> int:
        return len(self.y)

    @classmethod
    def from_blocks(cls, blocks: list[np.ndarray], mask: np.ndarray, y: np.ndarray) -> "Arrays":
        return cls(np.concatenate(blocks, axis=1).astype(np.float32), np.array(mask, dtype=bool),
                   np.array(y, dtype=np.int64))

    @classmethod
    def from_table(cls, pre, table) -> "Arrays":
        """Participants of ``table`` (with its label column) through the fitted ``pre``."""
        blocks, mask = pre.transform(table)
        return cls.from_blocks(blocks, mask, table[LABEL].to_numpy())

    def dataset(self) -> TensorDataset:
        return TensorDataset(torch.from_numpy(self.x), torch.from_numpy(self.mask),
                             torch.from_numpy(self.y))

    def class_counts(self) -> list[int]:
        return np.bincount(self.y, minlength=2).tolist()


def make_model(modalities: tuple[Modality, ...], model_cfg: ModelConfig, seed: int) -> SAFN:
    """SAFN with deterministic initial weights for ``seed``."""
    torch.manual_seed(seed)
    return SAFN([(m.name, len(m.features), m.side) for m in modalities], model_cfg)


def make_loader(data: Arrays, batch_size: int, seed: int, shuffle: bool = True) -> DataLoader:
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(data.dataset(), batch_size=batch_size, shuffle=shuffle, generator=gen,
                      drop_last=False)


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def run_epochs(model: nn.Module, loader, optimizer: torch.optim.Optimizer, epochs: int,
               model_cfg: ModelConfig, class_counts, *, proximal_mu: float = 0.0,
               global_params: list[Tensor] | None = None) -> float:
    """Train ``epochs`` passes over ``loader``; return the mean training loss of the last one.

    ``proximal_mu`` > 0 adds FedProx's (μ/2)·‖w − w_global‖² to every step.
    """
    model.train()
    last = float("nan")
    for _ in range(epochs):
        total, n = 0.0, 0
        for xb, mb, yb in loader:
            if len(yb) == 0:  # Poisson sampling can draw an empty batch
                continue
            optimizer.zero_grad(set_to_none=True)
            logits, alpha = model(xb, mb, return_weights=True)
            loss = total_loss(logits, yb, alpha, model_cfg, class_counts)
            if proximal_mu > 0 and global_params is not None:
                prox = sum(((p - g) ** 2).sum() for p, g in zip(model.parameters(), global_params))
                loss = loss + 0.5 * proximal_mu * prox
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(yb)
            n += len(yb)
        last = total / max(n, 1)
    return last


@torch.no_grad()
def predict(model: nn.Module, data: Arrays, batch_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """P(positive class) (n,) and gate weights α (n, M), in eval mode."""
    model.eval()
    probs, weights = [], []
    x, m = torch.from_numpy(data.x), torch.from_numpy(data.mask)
    for i in range(0, len(data), batch_size):
        logits, alpha = model(x[i:i + batch_size], m[i:i + batch_size], return_weights=True)
        probs.append(torch.softmax(logits, dim=1)[:, 1].numpy())
        weights.append(alpha.numpy())
    if not probs:
        return np.zeros(0), np.zeros((0, data.mask.shape[1]))
    return np.concatenate(probs), np.concatenate(weights)


@torch.no_grad()
def validation_loss(model: nn.Module, data: Arrays, model_cfg: ModelConfig, class_counts) -> float:
    model.eval()
    logits = model(torch.from_numpy(data.x), torch.from_numpy(data.mask))
    return float(classification_loss(logits, torch.from_numpy(data.y), model_cfg, class_counts))


@dataclass
class FitResult:
    model: SAFN
    epochs_run: int
    best_epoch: int
    best_val_loss: float
    history: list[dict] = field(default_factory=list)


def fit_with_early_stopping(train: Arrays, val: Arrays, modalities: tuple[Modality, ...],
                            model_cfg: ModelConfig, cfg: TrainConfig, seed: int) -> FitResult:
    """Train on ``train`` until the validation loss stops improving; keep the best weights."""
    model = make_model(modalities, model_cfg, seed)
    counts = train.class_counts()
    optimizer = make_optimizer(model, cfg)
    loader = make_loader(train, cfg.batch_size, seed)
    best_state, best_loss, best_epoch, history = None, np.inf, 0, []
    for epoch in range(1, cfg.max_epochs + 1):
        train_loss = run_epochs(model, loader, optimizer, 1, model_cfg, counts)
        val_loss = validation_loss(model, val, model_cfg, counts)
        history.append({"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss})
        if val_loss < best_loss - 1e-5:
            best_loss, best_epoch = val_loss, epoch
            best_state = copy.deepcopy(model.state_dict())
        elif epoch - best_epoch >= cfg.patience:
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    return FitResult(model, len(history), best_epoch, float(best_loss), history)
