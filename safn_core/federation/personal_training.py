"""A site's personal model (``personalisation``): trained on its own data, kept on its own disk
(`personal_store`). No Flower here; the comparison with the global model is
`personal_comparison`, what goes on the wire `personal_wire`.

Two methods (`safn_core.config.site_differences.PersonalisationConfig`):

- ``fine_tune``, once after the federation (`fine_tune`, called by
  `personal_comparison.personalise`): from the selected global model, up to
  ``personalisation.epochs`` epochs on the site's training split; after each epoch the site's
  validation split scores the model by the run's ``federation.select`` rule, and the best epoch
  is kept, epoch 0 (the global model itself) included: fine-tuning that does not help on the
  site's own validation data is not kept.
- ``ditto`` (Li et al., "Ditto: fair and robust federated learning through personalization",
  ICML 2021), in every round (`ditto_round`, after the round's global training): the personal
  model ``v`` takes ``federation.local_epochs`` epochs on the training split with the proximal
  pull (λ/2)·‖v − w‖² towards the round's global model ``w``, and the round its validation
  split prefers is kept. The global update the site sends is computed before, from ``w``, and
  is the same as without Ditto.

A site whose validation split has fewer than ``min_cell`` people of a class cannot choose a
personal model (`unfit_validation`): the choice of epoch or round and the threshold would be
statistics of too few people (with one class, a model predicting that class for everyone looks
best). It keeps the global model at the federation's threshold and trains no personal model (a
DP site spends nothing on it).

A DP site trains its personal model with DP-SGD from the same ledger: the run's plan (σ) counts
the personal epochs too (`personal_plan.planned_personal_epochs`), and each personal training
is a ledger entry of kind ``personal``. A budget that cannot pay for it refuses the personal
model (the federation goes on).

Why a site keeps the global model, or trains no personal model, is a code with its counts, never
a sentence (the site's terminal renders it, `safn.client.personal_replies`):

- ``{"code": "validation_too_small", "class_counts": [n0, n1, …] (one per class of the target),
  "min_cell": m}``
- ``{"code": "privacy_refused", "reason": "<the ledger's or budget's one line>"}``
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from safn_core.config import PrivacyConfig
from safn_core.errors import SafnError
from safn_core.federation.personal_plan import personal_seed
from safn_core.federation.personal_store import PersonalStore
from safn_core.federation.site import Site, state_to_numpy
from safn_core.federation.site_privacy import site_dp
from safn_core.model.feature_sparsity import lasso_step
from safn_core.preprocess import Preprocessor
from safn_core.training.local import (make_loader, make_model, make_optimizer,
                                      parameters_like, run_epochs, validation_metrics)
from safn_core.training.selection import RoundSelection

VALIDATION_TOO_SMALL = "validation_too_small"
PRIVACY_REFUSED = "privacy_refused"


class PersonalRefused(SafnError):
    """The site has no personal model for this run (its privacy budget or ledger refused the
    training, or it trained in no round); the reason is one line."""


def refusal_code(exc: PersonalRefused) -> dict:
    """A privacy refusal as a code; its reason is the privacy module's one line."""
    return {"code": PRIVACY_REFUSED, "reason": str(exc)}


# ------------------------------------------------------------------------- training


class _Trainer:
    """Personal training from ``start``, pulled towards ``anchor`` by ``mu`` (0: none), in as
    many calls to `train` as the caller wants; a DP site spends its ledger on every call."""

    def __init__(self, site: Site, pre: Preprocessor, class_counts: list[int],
                 start: dict, *, anchor: dict | None, mu: float, seed: int,
                 privacy: PrivacyConfig, state_dir: Path | None, run_id: str,
                 server_round: int | None = None):
        self.site, self.pre, self.class_counts = site, pre, list(class_counts)
        self.weights, self.anchor, self.mu, self.seed = start, anchor, float(mu), int(seed)
        self.server_round = server_round
        self.lr = site.cfg.personalisation.lr or site.cfg.train.lr
        self.calls = 0
        self.dp = None
        if privacy.dp:
            self.dp = site_dp(site, pre, privacy, state_dir=state_dir, run_id=run_id,
                              rounds=site.cfg.federation.rounds,
                              epochs=site.cfg.federation.local_epochs, lr=self.lr)
        else:
            self._plain_setup()

    def _plain_setup(self) -> None:
        cfg = self.site.cfg
        torch.manual_seed(self.seed)
        self.model = make_model(self.pre.modalities, cfg.model, self.seed,
                                target=self.site.cohort.target)
        self.model.load_state_dict({k: torch.from_numpy(np.array(v))
                                    for k, v in self.weights.items()})
        self.anchor_params = (parameters_like(self.model, self.anchor)
                              if self.anchor is not None and self.mu > 0 else None)
        self.optimizer = make_optimizer(self.model,
                                        cfg.train.model_copy(update={"lr": self.lr}))
        self.loader = make_loader(self.site.arrays(self.pre, "train"), cfg.train.batch_size,
                                  self.seed)

    def train(self, epochs: int) -> dict[str, np.ndarray]:
        """``epochs`` more epochs; the weights after them. A DP site's refusal (budget,
        ledger) raises `PersonalRefused` before anything is trained or spent."""
        cfg = self.site.cfg
        self.calls += 1
        if self.dp is None:
            run_epochs(self.model, self.loader, self.optimizer, epochs, cfg.model,
                       self.class_counts, proximal_mu=self.mu if self.anchor_params else 0.0,
                       global_params=self.anchor_params,
                       after_step=lasso_step(self.model, self.optimizer, cfg.model.feature_lasso))
            self.weights = state_to_numpy(self.model)
            return self.weights
        from safn_core.privacy import PrivacyError  # Opacus: only where DP is used

        try:
            self.weights, _ = self.dp.train_round(
                self.weights, self.pre.modalities, cfg.model, self.class_counts,
                server_round=self.server_round, seed=self.seed + 7 * self.calls,
                proximal_mu=self.mu, epochs=epochs, kind="personal", anchor=self.anchor,
                target=self.site.cohort.target)
        except PrivacyError as exc:
            raise PersonalRefused(" ".join(str(exc).split())) from None
        return self.weights


def load_model(site: Site, pre: Preprocessor, weights: dict):
    """The site's model architecture with ``weights``."""
    model = make_model(pre.modalities, site.cfg.model, 0, target=site.cohort.target)
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in weights.items()})
    return model


def validation_scores(site: Site, pre: Preprocessor, weights: dict, class_counts
                      ) -> tuple[float, float | None]:
    """The site's validation loss (cross-entropy, as the federation's) and ROC-AUC."""
    data = site.arrays(pre, "val")
    return validation_metrics(load_model(site, pre, weights), data, site.cfg.model,
                              class_counts, loss="cross_entropy")


def unfit_validation(site: Site) -> dict | None:
    """Why the site's validation split cannot choose a personal model (None when it can), as
    ``{"code": "validation_too_small", "class_counts": [n0, n1, …], "min_cell": m}`` (one
    count per class of the site's target): the choice
    of epoch or round and the threshold are statistics of that split, and with fewer than
    ``min_cell`` people of a class they say nothing reliable (with one class, a model that
    predicts that class for everyone looks best). Such a site keeps the global model."""
    k = site.cohort.n_classes
    counts = np.bincount(site.cohort.table.loc[site.split.val, "label"].to_numpy(dtype=int),
                         minlength=k)[:k].tolist()
    if min(counts) < site.min_cell:
        return {"code": VALIDATION_TOO_SMALL, "class_counts": [int(c) for c in counts],
                "min_cell": int(site.min_cell)}
    return None


# ------------------------------------------------------------------------- the two methods


def fine_tune(site: Site, global_weights: dict, pre: Preprocessor, class_counts: list[int], *,
              privacy: PrivacyConfig, state_dir: Path | None, run_id: str, seed: int
              ) -> tuple[dict, dict]:
    """Fine-tune the global model on the site's training split; keep the epoch (0 included)
    its validation split prefers. Returns the kept weights and a record of the choice (with
    ``stopped``, a `refusal_code`, when the budget ran out after the first epoch)."""
    cfg = site.cfg
    selection = RoundSelection(cfg.federation.select, None)
    loss, auc = validation_scores(site, pre, global_weights, class_counts)
    selection.update(0, loss, auc)
    best, best_scores = global_weights, (loss, auc)
    trainer = _Trainer(site, pre, class_counts, global_weights, anchor=None, mu=0.0,
                       seed=personal_seed(seed), privacy=privacy, state_dir=state_dir,
                       run_id=run_id)
    stopped = None
    trained = 0
    for epoch in range(1, cfg.personalisation.epochs + 1):
        try:
            weights = trainer.train(1)
        except PersonalRefused as exc:
            if epoch == 1:
                raise
            stopped = refusal_code(exc)
            break
        trained = epoch
        loss, auc = validation_scores(site, pre, weights, class_counts)
        if selection.update(epoch, loss, auc):
            best, best_scores = weights, (loss, auc)
    return best, {"method": "fine_tune", "epoch": selection.selected_round,
                  "epochs_trained": trained, "select": selection.select,
                  "val_loss": best_scores[0], "val_roc_auc": best_scores[1],
                  **({"stopped": stopped} if stopped else {})}


@dataclass(frozen=True)
class DittoOutcome:
    """One round of Ditto at a site: whether it trained, the round its selection keeps, and
    why it did not train (a code: `unfit_validation`'s or `refusal_code`'s)."""

    trained: bool
    selected_round: int | None = None
    val_loss: float | None = None
    refusal: dict | None = None


def ditto_round(site: Site, global_weights: dict, pre: Preprocessor, class_counts: list[int],
                *, server_round: int, privacy: PrivacyConfig, state_dir: Path | None,
                run_id: str, seed: int) -> DittoOutcome:
    """Ditto's personal step of one round (see the module docstring). A round the site already
    trained (the coordinator redoing it after a crash) is not trained again."""
    cfg = site.cfg
    unfit = unfit_validation(site)
    if unfit is not None:  # the global model is this site's (`personalise`)
        return DittoOutcome(False, None, refusal=unfit)
    store = PersonalStore(state_dir, run_id)
    saved = store.selection_state() or {}
    if int(saved.get("last_round", 0)) >= int(server_round):
        sel = saved.get("selection") or {}
        return DittoOutcome(False, sel.get("best_round_"))
    selection = (RoundSelection.from_state(saved["selection"]) if saved.get("selection")
                 else RoundSelection(cfg.federation.select, None))
    start = store.current() or global_weights
    trainer = _Trainer(site, pre, class_counts, start, anchor=global_weights,
                       mu=cfg.personalisation.ditto_lambda, seed=personal_seed(seed),
                       privacy=privacy, state_dir=state_dir, run_id=run_id,
                       server_round=server_round)
    try:
        weights = trainer.train(cfg.federation.local_epochs)
    except PersonalRefused as exc:
        return DittoOutcome(False, selection.selected_round, refusal=refusal_code(exc))
    loss, auc = validation_scores(site, pre, weights, class_counts)
    store.save_current(weights)
    if selection.update(server_round, loss, auc):
        store.save_selected(weights, {"method": "ditto", "round": int(server_round),
                                      "select": selection.select, "val_loss": loss,
                                      "val_roc_auc": auc,
                                      "ditto_lambda": cfg.personalisation.ditto_lambda})
    # the commit point: written last, so a crash before it redoes the round's personal step
    store.save_selection_state({"last_round": int(server_round),
                                "selection": selection.state_dict()})
    return DittoOutcome(True, selection.selected_round, loss)
