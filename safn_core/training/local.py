"""Local training of SAFN on one participant set: the loop every engine calls.

A centralised fold, a federated site and a DP site all train through `run_epochs`; they differ
only in the data loader and optimizer they pass (Opacus supplies its own for DP-SGD) and in an
optional proximal term (FedProx). `fit_by_rounds` trains one centralised model by the
federation's rounds and round-selection rule (`safn_core.training.selection`), for the pooled and
local-only comparators; `fit_with_early_stopping` is its epoch-wise case (cross-validation).
Only `fit_by_rounds` follows ``train.lr_schedule`` and ``train.weight_averaging``: a federated
site trains a few local epochs per round with the constant ``train.lr``.

With a wide path (``model.wide``: trained or frozen) `fit_by_rounds` first fits the exact
class-balanced logistic regression on its own training split, the penalty chosen on its own
validation split (`safn_core.logistic.fit_pooled`), sets the wide path to it and validates that
untrained model as round 0: the selection can keep the logistic regression itself when no round
of training improves on it.

K classes (``target``: `safn_core.targets.Target`; default ``pd_vs_hc``): `make_model` builds
SAFN with K outputs and the head the target's order and ``model.head`` call for. Scores follow
one convention: a binary model's are P(class 1) (n,) as always; with K > 2 they are the class
probabilities (n, K), the "logits" z the model's K logits (n, K) (for the ordinal head: the log
class probabilities), the ROC-AUC the macro one-vs-rest one, the cross-entropy the multi-class
one, and the calibrated loss the class-balanced multi-class log loss at the best temperature.
A K-class regression start is taken from ``logistic_start`` (`start_from_logistic`).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from safn_core.config import ModelConfig, TrainConfig
from safn_core.data.cohort import LABEL, Modality
from safn_core.logistic import LogisticFit, fit_pooled
from safn_core.model import SAFN, total_loss
from safn_core.model.feature_sparsity import lasso_step
from safn_core.targets import PD_VS_HC, Target
from safn_core.training.selection import RoundSelection, Select
from safn_core.training.validation_scores import (  # noqa: F401  (also imported from here)
    calibrated_log_loss, validation_loss, validation_losses, validation_metrics)


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

    def class_counts(self, n_classes: int = 2) -> list[int]:
        """Participants per class 0..K-1 (K = ``n_classes``, or more if the labels go higher):
        pass the target's K, so that a class absent here still has its (zero) count."""
        return np.bincount(self.y, minlength=n_classes).tolist()


def make_model(modalities: tuple[Modality, ...], model_cfg: ModelConfig, seed: int,
               target: Target | None = None) -> SAFN:
    """SAFN with deterministic initial weights for ``seed``, with K = ``target``'s classes and
    the head its order and ``model.head`` call for (`safn_core.model.ordinal.head_for`);
    ``target`` None = ``pd_vs_hc`` (the binary model). A bundle or a federation's state is
    rebuilt by the same call with the same target."""
    target = PD_VS_HC if target is None else target
    torch.manual_seed(seed)
    return SAFN([(m.name, len(m.features), m.side) for m in modalities], model_cfg,
                n_classes=target.n_classes, ordered=target.ordered)


def modality_weights_by_class(model: nn.Module, data: Arrays,
                              class_names=None) -> dict[str, dict[str, float]]:
    """Mean gate weights α of each class's participants (in eval mode): {class name: {modality:
    mean α}} — the "modality weights per class" of a K-class target (α is per participant; a
    class without participants gets NaN). ``class_names`` default: "0".."K-1"."""
    net = getattr(model, "_module", model)
    k = net.n_classes
    names = list(class_names) if class_names is not None else [str(c) for c in range(k)]
    if len(names) != k:
        raise ValueError(f"{len(names)} class names for a model of {k} classes")
    alpha = scores(model, data)[2]
    out = {}
    for c, name in enumerate(names):
        rows = alpha[data.y == c]
        mean = rows.mean(axis=0) if len(rows) else np.full(alpha.shape[1], np.nan)
        out[name] = {m: float(a) for m, a in zip(net.modality_names, mean)}
    return out


def parameters_like(model: nn.Module, weights) -> list[Tensor]:
    """``weights`` (a state dict in ``model``'s layout) as tensors in the order of
    ``model.parameters()``: the anchor of a proximal term (FedProx's or Ditto's)."""
    return [torch.as_tensor(np.asarray(weights[name]), dtype=p.dtype).clone()
            for name, p in model.named_parameters()]


def make_loader(data: Arrays, batch_size: int, seed: int, shuffle: bool = True) -> DataLoader:
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(data.dataset(), batch_size=batch_size, shuffle=shuffle, generator=gen,
                      drop_last=False)


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW, fused: one kernel updates every parameter tensor. (PyTorch's CPU default loops
    over the tensors in Python; SAFN has ~60 small ones, so that loop cost more than the
    forward pass.) Opacus' DP optimizer wraps it unchanged.

    A trained wide path (``model.wide: trained``) gets its own decoupled weight decay,
    ``train.wide_weight_decay`` (None: ``train.weight_decay``): a strong one makes the logistic
    regression the model starts from fade step by step unless the data hold it up, so that
    the deep path takes over where it can (docs/model.md)."""
    wide, rest = [], []
    for name, p in model.named_parameters():
        (wide if name.endswith(WIDE_PARAMETERS) else rest).append(p)
    decay = cfg.weight_decay if cfg.wide_weight_decay is None else cfg.wide_weight_decay
    if not wide or decay == cfg.weight_decay:
        return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                 fused=True)
    return torch.optim.AdamW([{"params": rest}, {"params": wide, "weight_decay": decay}],
                             lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)


WIDE_PARAMETERS = ("wide.weight", "wide.bias")


def run_epochs(model: nn.Module, loader, optimizer: torch.optim.Optimizer, epochs: int,
               model_cfg: ModelConfig, class_counts, *, proximal_mu: float = 0.0,
               global_params: list[Tensor] | None = None, after_step=None) -> float:
    """Train ``epochs`` passes over ``loader``; return the mean training loss of the last one.

    ``proximal_mu`` > 0 adds FedProx's (μ/2)·‖w − w_global‖² to every step; ``after_step()``
    runs after every optimizer step (weight averaging).
    """
    model.train()
    last = float("nan")
    for _ in range(epochs):
        total, n = 0.0, 0
        for xb, mb, yb in loader:
            if len(yb) == 0:  # Poisson sampling can draw an empty batch
                continue
            optimizer.zero_grad(set_to_none=True)
            logits, alpha = model(xb, mb, return_weights=True, members=True)
            loss = total_loss(logits, yb, alpha, model_cfg, class_counts)
            if proximal_mu > 0 and global_params is not None:
                prox = sum(((p - g) ** 2).sum() for p, g in zip(model.parameters(), global_params))
                loss = loss + 0.5 * proximal_mu * prox
            loss.backward()
            optimizer.step()
            if after_step is not None:
                after_step()
            total += float(loss.detach()) * len(yb)
            n += len(yb)
        last = total / max(n, 1)
    return last


@torch.no_grad()
def scores(model: nn.Module, data: Arrays,
           batch_size: int = 1024) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The model's logit of P(positive) (n,) (float64, the difference of the two output logits:
    what a calibration map takes), P(positive) (n,) (softmax, float32) and gate weights α
    (n, M), in eval mode.

    With K > 2 classes: the K logits (n, K) (float64; ordinal head: the log class
    probabilities), the class probabilities (n, K) (float64 softmax of them) and α."""
    model.eval()
    z, probs, weights = [], [], []
    x, m = torch.from_numpy(data.x), torch.from_numpy(data.mask)
    k = getattr(model, "_module", model).n_classes
    for i in range(0, len(data), batch_size):
        logits, alpha = model(x[i:i + batch_size], m[i:i + batch_size], return_weights=True)
        if k == 2:
            z.append((logits[:, 1].double() - logits[:, 0].double()).numpy())
            probs.append(torch.softmax(logits, dim=1)[:, 1].numpy())
        else:
            z.append(logits.double().numpy())
            probs.append(torch.softmax(logits.double(), dim=1).numpy())
        weights.append(alpha.numpy())
    if not probs:
        shape = (0,) if k == 2 else (0, k)
        return np.zeros(shape), np.zeros(shape), np.zeros((0, data.mask.shape[1]))
    return np.concatenate(z), np.concatenate(probs), np.concatenate(weights)


def predict(model: nn.Module, data: Arrays, batch_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """P(positive class) (n,) (K > 2: class probabilities (n, K)) and gate weights α (n, M),
    in eval mode."""
    return scores(model, data, batch_size)[1:]


@dataclass
class FitResult:
    """A trained model and how it was chosen.

    ``best_epoch``: epochs trained up to the kept weights; ``best_val_loss``: their validation
    loss; ``selected_round``: the kept round of `fit_by_rounds` (= ``best_epoch`` for
    `fit_with_early_stopping`, whose rounds are single epochs); ``history``: one entry per
    round (``round``, ``epoch``, ``train_loss``, ``val_loss``, ``val_roc_auc``).

    With a wide path (``model.wide``) ``logistic`` is the logistic regression it started from
    (`safn_core.logistic.LogisticFit`, or the K-class ``logistic_start``; None without a wide path, or where it could not be
    fitted: ``logistic_note`` says why), and ``history`` starts with round 0 (epoch 0,
    ``train_loss`` None): that untrained model, which the selection may keep
    (``selected_round`` = ``best_epoch`` = 0: the model is the logistic regression);
    ``round0_test`` is the margin test of `keep_round0` where it ran (None elsewhere).
    """

    model: SAFN
    epochs_run: int
    best_epoch: int
    best_val_loss: float
    history: list[dict] = field(default_factory=list)
    selected_round: int | None = None
    logistic: LogisticFit | None = None
    logistic_note: str | None = None
    round0_test: dict | None = None


def fit_by_rounds(train: Arrays, val: Arrays, modalities: tuple[Modality, ...],
                  model_cfg: ModelConfig, train_cfg: TrainConfig, seed: int, *, rounds: int,
                  epochs_per_round: int, select: Select = "val_loss",
                  patience: int | None = None, val_loss: str = "objective",
                  round0_margin: float = 0.0, target: Target | None = None,
                  logistic_start=None) -> FitResult:
    """Train one model on ``train`` the way a federation trains: by rounds, selected by a rule.

    Up to ``rounds`` rounds of ``epochs_per_round`` epochs (AdamW, loader and learning-rate
    schedule of the project's local training, the schedule planned over all ``rounds`` ×
    ``epochs_per_round`` epochs, `lr_schedule`; kept across rounds: one continuous centralised
    run), validated on ``val`` after each round; the round kept and the early stop follow
    `RoundSelection` (``select``: ``"val_loss"``, ``"val_roc_auc"`` or ``"last"``; stop after
    ``patience`` rounds without improvement, ``None``: never). Returns the model with the
    selected round's weights. With the federation's ``rounds``, ``local_epochs``, ``select``
    and ``patience`` this gives a pooled or local-only comparator the federated model's
    protocol and epoch budget, and with ``val_loss="cross_entropy"`` the federation's
    validation loss (`validation_metrics`).

    With a wide path (``model.wide`` not off) the model starts as the exact logistic regression
    of ``train`` (penalty chosen on ``val``, `start_from_logistic`), validated as round 0
    before any training; the selection keeps it unless a later round improves on it. With
    ``round0_margin`` > 0 (rule ``"val_loss"``) a trained round must improve on it by more than
    that many standard errors (`keep_round0`); the test is in ``FitResult.round0_test``.

    ``target``: the classes (`make_model`; None = ``pd_vs_hc``); ``logistic_start``: a K-class
    regression to start from (`start_from_logistic`'s ``start``).
    """
    if rounds < 1 or epochs_per_round < 1:
        raise ValueError(f"rounds and epochs_per_round must be >= 1 (got {rounds}, "
                         f"{epochs_per_round})")
    selection = RoundSelection(select, patience)
    model = make_model(modalities, model_cfg, seed, target)
    counts = train.class_counts(model.n_classes)
    logistic, note = start_from_logistic(model, train, val, logistic_start)
    optimizer = make_optimizer(model, train_cfg)
    loader = make_loader(train, train_cfg.batch_size, seed)
    averaged, average_step = _weight_average(model, train_cfg)
    schedule = lr_schedule(optimizer, train_cfg, steps_per_epoch=len(loader),
                           epochs=rounds * epochs_per_round)
    after_step = _each(lasso_step(model, optimizer, model_cfg.feature_lasso), average_step,
                       schedule.step if schedule is not None else None)
    kept = averaged if averaged is not None else model  # what is validated and returned
    best_state, history, start_state = None, [], None
    first = 0 if model_cfg.wide != "off" else 1  # round 0: the logistic regression itself
    for r in range(first, rounds + 1):
        train_loss = None
        if r > 0:
            train_loss = run_epochs(model, loader, optimizer, epochs_per_round, model_cfg,
                                    counts, after_step=after_step)
        loss, val_auc = validation_metrics(kept, val, model_cfg, counts, val_loss)
        history.append({"round": r, "epoch": r * epochs_per_round, "train_loss": train_loss,
                        "val_loss": loss, "val_roc_auc": val_auc})
        if selection.update(r, val_loss=loss, val_roc_auc=val_auc):
            best_state = copy.deepcopy(kept.state_dict())
        if r == 0:
            start_state = best_state
        if selection.should_stop:
            break
    best, test = selection.best_round_, None
    if start_state is not None and best != 0 and round0_margin > 0 and select == "val_loss":
        test = keep_round0(kept, start_state, best_state, val, model_cfg, counts, val_loss,
                           round0_margin)
        test["round"] = best
        if test["keep_round0"]:
            best, best_state = 0, start_state
    model.load_state_dict(best_state)
    return FitResult(model, history[-1]["round"] * epochs_per_round, best * epochs_per_round,
                     float(history[best - first]["val_loss"]), history, selected_round=best,
                     logistic=logistic, logistic_note=note, round0_test=test)


def keep_round0(model: nn.Module, start_state: dict, best_state: dict, val: Arrays,
                model_cfg: ModelConfig, class_counts, loss: str, margin: float) -> dict:
    """Whether the selected trained round improves on round 0 (the logistic regression) by
    more than ``margin`` standard errors: the paired difference of the two models'
    per-participant validation losses (`validation_losses`), its mean and standard error.

    On a few hundred participants the lowest of many noisy validation losses is optimistic:
    where the data hold little beyond the regression, some trained epoch beats it on the
    validation split by chance. Asking for a margin on the same split keeps the regression
    unless the split shows more than noise (the "one standard error" rule, with the simpler
    model the regression). Loads each state into ``model`` in turn; the caller loads the one
    it keeps.
    """
    losses = []
    for state in (start_state, best_state):
        model.load_state_dict(state)
        losses.append(validation_losses(model, val, model_cfg, class_counts, loss))
    diff = losses[0] - losses[1]  # > 0: the trained round is better
    n = len(diff)
    se = float(diff.std(ddof=1) / math.sqrt(n)) if n > 1 else float("inf")
    gain = float(diff.mean()) if n else 0.0
    return {"gain": gain, "se": se, "margin": float(margin),
            "keep_round0": not gain > margin * se}


def start_from_logistic(model: SAFN, train: Arrays, val: Arrays, start=None
                        ) -> tuple[LogisticFit | None, str | None]:
    """Set ``model``'s wide path to the exact logistic regression of ``train`` (penalty chosen
    on ``val``'s class-balanced log loss, `safn_core.logistic.fit_pooled`).

    Returns ``(fit, None)``; ``(None, why)`` where it cannot be fitted (a class absent from
    ``train``: the wide path then stays at zero and training starts from there); ``(None,
    None)`` without a wide path. The regression sees the features as the wide path does: an
    absent modality's are 0, its training mean.

    ``start`` (the hook for K classes, any K): a fitted regression, or a callable
    ``start(x_train, y_train, x_val, y_val)`` returning one (the features as the wide path sees
    them), used instead of `fit_pooled`. It is read by attribute (`regression_parts`):
    ``coef``/``coef_`` and ``intercept``/``intercept_``, or for the ordinal head
    ``thresholds``/``thresholds_``/``cutpoints`` (the K − 1 cut points, P(y ≤ k) = σ(θ_k −
    coef·x)); forms as `SAFN.set_wide`. With K > 2 and no ``start`` the pooled multinomial or
    ordinal fit of `safn_core.logistic.family` (the kind of the model's head) is used where that
    module exists; otherwise the wide path stays at zero and ``why`` says so.
    """
    if model.cfg.wide == "off":
        return None, None
    counts = train.class_counts(model.n_classes)
    if min(counts) < 1:
        return None, (f"no logistic regression start: the training split has class counts "
                      f"{counts}")
    if start is None and model.n_classes > 2:
        start = _kclass_start(model)
        if start is None:
            kind = "ordinal" if model.head_kind == "ordinal" else "multinomial"
            return None, (f"no logistic regression start: no {kind} regression is available "
                          f"for {model.n_classes} classes (pass logistic_start); the wide path "
                          f"starts at zero")
    x_tr, x_va = _as_seen(model, train), _as_seen(model, val)
    if start is None:
        fit = fit_pooled(x_tr, train.y, x_va, val.y)
    else:
        fit = start(x_tr, train.y, x_va, val.y) if callable(start) else start
    model.set_wide(*regression_parts(fit, model.head_kind))
    return fit, None


def _kclass_start(model: SAFN):
    """The pooled K-class fit of the model head's kind (`safn_core.logistic.family`), as a
    ``start`` callable; None where that module is not there."""
    try:
        from safn_core.logistic import family
    except ImportError:
        return None
    kind = "ordinal" if model.head_kind == "ordinal" else "multinomial"
    k = model.n_classes
    return lambda x, y, x_val, y_val: family.fit_pooled(kind, x, y, x_val, y_val, n_classes=k)


def regression_parts(fit, head: str = "softmax") -> tuple[np.ndarray, np.ndarray]:
    """``(coef, intercept)`` of a fitted regression for `SAFN.set_wide`: ``coef``/``coef_`` and,
    for the ordinal head, the cut points (``thresholds``/``thresholds_``/``cutpoints``, else
    ``intercept``), otherwise ``intercept``/``intercept_``."""
    def first(*names):
        for name in names:
            value = getattr(fit, name, None)
            if value is not None:
                return np.asarray(value, dtype=np.float64)
        raise ValueError(f"the logistic start {type(fit).__name__} has none of {names}")

    coef = first("coef", "coef_")
    if head == "ordinal":
        return coef, first("thresholds", "thresholds_", "cutpoints", "intercept", "intercept_")
    return coef, first("intercept", "intercept_")


def _as_seen(model: SAFN, data: Arrays) -> np.ndarray:
    """``data.x`` as the wide path sees it: an absent modality's features are 0."""
    if data.mask.all():
        return data.x
    keep = np.repeat(data.mask, model.n_features, axis=1)
    return np.where(keep, data.x, 0).astype(data.x.dtype, copy=False)


def _weight_average(model: nn.Module, cfg: TrainConfig):
    """``(averaged model, after_step)`` for ``train.weight_averaging``; ``(None, None)`` for none.

    The exponential moving average ``w̄ ← d·w̄ + (1 − d)·w`` after every step (``ema_decay`` d)
    is a copy of SAFN with the same layout: it is validated, selected and returned in place of
    the raw weights, which keep training.
    """
    if cfg.weight_averaging == "none":
        return None, None
    from torch.optim.swa_utils import get_ema_multi_avg_fn

    averaged = copy.deepcopy(model)
    update = get_ema_multi_avg_fn(cfg.ema_decay)  # one fused lerp over every tensor
    raw, avg = list(model.parameters()), list(averaged.parameters())

    @torch.no_grad()
    def after_step() -> None:
        update(avg, raw, None)

    return averaged, after_step


def lr_factor(step: int, warmup: int, total: int, cosine: bool) -> float:
    """The learning rate of optimizer step ``step`` (0-based) as a fraction of ``train.lr``.

    A linear warm-up over the first ``warmup`` steps ((step + 1) / warmup: no step at lr 0),
    then 1 (constant) or a half cosine from 1 down to about 0 at step ``total`` − 1 (not 0:
    every planned step still moves the weights).
    """
    if step < warmup:
        return (step + 1) / warmup
    if not cosine:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_schedule(optimizer: torch.optim.Optimizer, cfg: TrainConfig, *, steps_per_epoch: int,
                epochs: int):
    """``train.lr_schedule`` and ``train.warmup_epochs`` as a `LambdaLR` over the fit's planned
    ``epochs`` × ``steps_per_epoch`` optimizer steps, to be stepped after every optimizer step;
    None for a constant rate without warm-up, so that the default fit is the one it always was.

    The horizon is the fit's planned budget (``train.max_epochs`` for safn-train's fits, the
    federation's rounds × local epochs for a comparator), not the epoch early stopping picks:
    the schedule must not depend on the validation data it is selected by.
    """
    if cfg.lr_schedule == "constant" and cfg.warmup_epochs == 0:
        return None
    warmup, total = cfg.warmup_epochs * steps_per_epoch, epochs * steps_per_epoch
    cosine = cfg.lr_schedule == "cosine"
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, warmup, total, cosine))


def _each(*hooks):
    """One ``after_step`` that runs every hook that is not None, in order; None if none is."""
    hooks = [h for h in hooks if h is not None]
    if not hooks:
        return None
    if len(hooks) == 1:
        return hooks[0]

    def after_step() -> None:
        for hook in hooks:
            hook()

    return after_step


def fit_with_early_stopping(train: Arrays, val: Arrays, modalities: tuple[Modality, ...],
                            model_cfg: ModelConfig, cfg: TrainConfig, seed: int, *,
                            target: Target | None = None, logistic_start=None) -> FitResult:
    """Train on ``train`` until the validation metric stops improving; keep the best weights.

    Epoch-wise early stopping (``train.max_epochs``, ``train.patience``) of centralised
    cross-validation: `fit_by_rounds` with one-epoch rounds selected by ``train.select``
    (validation loss, validation ROC-AUC, or ``val_loss_calibrated``: the lowest
    `calibrated_log_loss`, by the rule ``val_loss`` with ``val_loss="calibrated"``).
    ``target`` and ``logistic_start``: as `fit_by_rounds`.
    """
    select, loss = cfg.select, "objective"
    if select == "val_loss_calibrated":
        select, loss = "val_loss", "calibrated"
    return fit_by_rounds(train, val, modalities, model_cfg, cfg, seed, rounds=cfg.max_epochs,
                         epochs_per_round=1, select=select, patience=cfg.patience,
                         val_loss=loss, round0_margin=cfg.round0_margin, target=target,
                         logistic_start=logistic_start)
