"""What one site does, on its own data: split, describe, train a round, evaluate.

Only aggregate statistics, model weights and score histograms leave these functions; a site with
fewer than ``min_cell`` people of a class in the part it would describe sends nothing about it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from sklearn.model_selection import train_test_split

from safn_core.config import ModelConfig, SafnConfig
from safn_core.data.cohort import LABEL, Cohort
from safn_core.metrics import cross_entropy_sum, score_histogram
from safn_core.model.feature_sparsity import lasso_step
from safn_core.multiclass import (class_score_histogram, confusion_counts,
                                  cross_entropy_sum_multiclass)
from safn_core.preprocess import FeatureStats, Preprocessor
from safn_core.training.local import (Arrays, make_loader, make_model, make_optimizer, predict,
                                      run_epochs)


class SmallCell(Exception):
    """A statistic would describe fewer than ``min_cell`` people: the site withholds it."""


@dataclass
class SiteSplit:
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


def split_participants(ids: np.ndarray, y: np.ndarray, val_fraction: float,
                       test_fraction: float, seed: int) -> SiteSplit:
    """Participant-level train/val/test split, stratified when both classes allow it."""
    def strat(labels):
        counts = np.bincount(labels, minlength=2)
        return labels if counts.min() >= 2 else None

    rest, test = train_test_split(ids, test_size=test_fraction, stratify=strat(y),
                                  random_state=seed)
    y_rest = pd.Series(y, index=ids).loc[rest].to_numpy()
    train, val = train_test_split(rest, test_size=val_fraction / (1 - test_fraction),
                                  stratify=strat(y_rest), random_state=seed + 1)
    return SiteSplit(np.sort(train), np.sort(val), np.sort(test))


def small_class_text(counts, names, min_cell: int) -> str | None:
    """``counts`` per class in words when a class is below ``min_cell`` (None otherwise): a
    binary split's as always (``"12 / 3 participants per class, fewer than min_cell = 5"``),
    with K classes each class named (``"HC 12 / Prodromal 3 / PD 40 participants per class;
    Prodromal fewer than min_cell = 5"``)."""
    if min(counts) >= min_cell:
        return None
    if len(counts) == 2:
        return (f"{counts[0]} / {counts[1]} participants per class, fewer than min_cell = "
                f"{min_cell}")
    names = list(names) if len(names) == len(counts) else [f"class {k}" for k in range(len(counts))]
    each = " / ".join(f"{n} {c:g}" for n, c in zip(names, counts))
    small = ", ".join(n for n, c in zip(names, counts) if c < min_cell)
    return f"{each} participants per class; {small} fewer than min_cell = {min_cell}"


def state_to_numpy(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


class Site:
    """A site's cohort and split, and the steps of the federated protocol."""

    def __init__(self, name: str, cohort: Cohort, cfg: SafnConfig):
        self.name = name
        self.cohort = cohort
        self.cfg = cfg
        fed = cfg.federation
        self.split = split_participants(cohort.ids, cohort.y, fed.val_fraction,
                                        fed.test_fraction, fed.split_seed)
        self._arrays: dict[tuple, Arrays] = {}

    @property
    def min_cell(self) -> int:
        return self.cfg.data.min_cell

    def _class_counts(self, ids) -> list[int]:
        """The count of each of the target's K classes among ``ids`` (zeros included)."""
        k = self.cohort.n_classes
        return np.bincount(self.cohort.table.loc[ids, LABEL].to_numpy(), minlength=k)[:k].tolist()

    def small_classes(self, counts: list[int]) -> str | None:
        """Which classes of ``counts`` are below ``min_cell``, in words (None: none is)."""
        return small_class_text(counts, self.cohort.label_names, self.min_cell)

    def describe(self, check_cells: bool = True) -> tuple[FeatureStats, list[int]]:
        """Sufficient statistics and class counts of the TRAIN split (never val/test).

        ``check_cells=False`` under secure aggregation: only the federation-wide sum is
        revealed, and the coordinator applies ``min_cell`` to it."""
        counts = self._class_counts(self.split.train)
        if not check_cells:
            stats = FeatureStats.from_frame(self.cohort.table.loc[self.split.train],
                                            self.cohort.features)
            return stats, counts
        small = self.small_classes(counts)
        if small is not None:
            raise SmallCell(f"site {self.name}: its training split has {small}")
        stats = FeatureStats.from_frame(self.cohort.table.loc[self.split.train],
                                        self.cohort.features)
        # a feature observed in fewer than min_cell people would describe them: withhold it
        small = (stats.count > 0) & (stats.count < self.min_cell)
        for arr in (stats.count, stats.total, stats.total_sq):
            arr[small] = 0.0
        return stats, counts

    def arrays(self, pre: Preprocessor, part: str) -> Arrays:
        """Preprocessed arrays of a split (``train``, ``val``, ``test``) or of ``all``."""
        key = (part, id(pre))
        if key not in self._arrays:
            ids = self.cohort.ids if part == "all" else getattr(self.split, part)
            table = self.cohort.table.loc[ids]
            self._arrays = {k: v for k, v in self._arrays.items() if k[1] == id(pre)}
            self._arrays[key] = Arrays.from_table(pre, table)
        return self._arrays[key]

    def train(self, state: dict, pre: Preprocessor, class_counts: list[int], *,
              model_cfg: ModelConfig, epochs: int, seed: int,
              proximal_mu: float = 0.0) -> tuple[dict[str, np.ndarray], int, float]:
        """One round of local training from the global weights; returns new weights."""
        torch.manual_seed(seed)
        data = self.arrays(pre, "train")
        model = make_model(pre.modalities, model_cfg, seed, target=self.cohort.target)
        model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()})
        global_params = [p.detach().clone() for p in model.parameters()]
        optimizer = make_optimizer(model, self.cfg.train)
        loader = make_loader(data, self.cfg.train.batch_size, seed)
        loss = run_epochs(model, loader, optimizer, epochs, model_cfg, class_counts,
                          proximal_mu=proximal_mu, global_params=global_params,
                          after_step=lasso_step(model, optimizer, model_cfg.feature_lasso))
        return state_to_numpy(model), len(data), loss

    def evaluate(self, state: dict, pre: Preprocessor, model_cfg: ModelConfig,
                 bins: int, held_out: bool = False, withhold: bool = True) -> dict:
        """Score histograms of the validation and test splits (per class).

        A split with fewer than ``min_cell`` people of a class is withheld (zeros, flagged);
        ``withheld`` flags a site whose histograms the coordinator must not use (either split).
        A held-out site (external validation) is tested on all its participants and sends no
        validation histogram (the threshold is chosen on the training sites only). Under secure
        aggregation (``withhold=False``) the histograms are kept whatever their counts: only
        their federation-wide sum is revealed, to which ``min_cell`` then applies; the flags
        still say whether the site's own counts pass, for its own metrics. Also returns the
        validation split's summed cross-entropy and size (``val_loss_sum``, ``val_examples``).

        Binary target (K = 2): ``val`` / ``test`` are (2, bins) histograms of P(class 1). K > 2
        (``self.cohort.n_classes``): ``val`` / ``test`` are (K, K, bins) histograms ([true class,
        class j, bin of P_j], `safn_core.multiclass.class_score_histogram`), beside them
        ``val_confusion`` / ``test_confusion`` (K, K) counts at the argmax rule (a site applies
        no fitted cutpoints), and the loss sum is the K-class cross-entropy; every class of a
        split needs ``min_cell`` people (a class absent from the split withholds it too).
        """
        K = self.cohort.n_classes
        model = make_model(pre.modalities, model_cfg, 0, target=self.cohort.target)
        model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()})
        shape = (2, bins) if K == 2 else (K, K, bins)
        out = {}
        if held_out:
            out["val"], out["val_withheld"] = np.zeros(shape, dtype=np.int64), False
            if K > 2:
                out["val_confusion"] = np.zeros((K, K), dtype=np.int64)
        for part in ("test",) if held_out else ("val", "test"):
            data = self.arrays(pre, "all" if held_out else part)
            counts = np.bincount(data.y, minlength=K)
            small = bool(counts.min() < self.min_cell)
            if small and withhold:
                out[part] = np.zeros(shape, dtype=np.int64)
                if K > 2:
                    out[f"{part}_confusion"] = np.zeros((K, K), dtype=np.int64)
                out[f"{part}_withheld"] = True
                continue
            p, _ = predict(model, data)  # K > 2: class probabilities (n, K)
            if K == 2:
                out[part] = score_histogram(data.y, p, bins)
                loss = cross_entropy_sum(data.y, p) if part == "val" else None
            else:
                out[part] = class_score_histogram(data.y, p, K, bins)
                out[f"{part}_confusion"] = confusion_counts(data.y, p, K, "argmax")
                loss = cross_entropy_sum_multiclass(data.y, p) if part == "val" else None
            out[f"{part}_withheld"] = small
            if part == "val":
                out["val_loss_sum"] = loss
                out["val_examples"] = int(len(data.y))
        out["withheld"] = out["val_withheld"] or out["test_withheld"]
        return out
