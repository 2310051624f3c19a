"""A site's personal model (``personalisation``): trained on its own data, kept on its own disk,
compared with the global model on its own test split. No Flower here.

Two methods (`safn_core.config.PersonalisationConfig`):

- ``fine_tune``, once after the federation (`personalise`): from the selected global model,
  up to ``personalisation.epochs`` epochs on the site's training split; after each epoch the
  site's validation split scores the model by the run's ``federation.select`` rule, and the
  best epoch is kept, epoch 0 (the global model itself) included: fine-tuning that does not
  help on the site's own validation data is not kept.
- ``ditto`` (Li et al., "Ditto: fair and robust federated learning through personalization",
  ICML 2021), in every round (`ditto_round`, after the round's global training): the personal
  model ``v`` takes ``federation.local_epochs`` epochs on the training split with the proximal
  pull (λ/2)·‖v − w‖² towards the round's global model ``w``, and the round its validation
  split prefers is kept. The global update the site sends is computed before, from ``w``, and
  is the same as without Ditto.

A site whose validation split has fewer than ``min_cell`` people of a class cannot choose a
personal model (`unfit_validation`): the choice of epoch or round and the threshold would be
statistics of too few people (with one class, a model predicting that class for everyone looks
best). It keeps the global model at the federation's threshold, trains no personal model (a DP
site spends nothing on it) and says so.

The personal model's threshold is the one that maximises balanced accuracy on the site's
validation split (``personalisation.threshold: site``), or the federation's. At the end both
models are evaluated on the site's test split (`compare_on_test`): the site keeps every figure
(`personal_store`), and only the metrics of a test split whose classes both have at least
``min_cell`` people may leave it; the confusion counts behind the pooled comparison go through
secure aggregation where the run uses it.

A DP site trains its personal model with DP-SGD from the same ledger: the run's plan (σ) counts
the personal epochs too (`planned_personal_epochs`), and each personal training is a ledger
entry of kind ``personal``. A budget that cannot pay for it refuses the personal model (the
federation goes on).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from safn_core.config import PrivacyConfig, SafnConfig
from safn_core.errors import SafnError
from safn_core.federation.personal_store import PersonalStore
from safn_core.federation.site import Site, state_to_numpy
from safn_core.metrics import binary_metrics, choose_threshold
from safn_core.preprocess import Preprocessor
from safn_core.training.local import (make_loader, make_model, make_optimizer,
                                      parameters_like, predict, run_epochs,
                                      validation_metrics)
from safn_core.training.selection import RoundSelection

PERSONAL_SEED_OFFSET = 500
"""Personal training's seeds are the round's site seed plus this (distinct from the global
training's, which stay as without personalisation)."""

COMPARED = ("balanced_accuracy", "sensitivity", "specificity", "roc_auc")
"""The metrics of the global-vs-personal comparison."""


def planned_personal_epochs(cfg: SafnConfig) -> int:
    """Epochs of personal training a run plans at each site (for a DP site's plan)."""
    method = cfg.personalisation.method
    if method == "ditto":
        return cfg.federation.rounds * cfg.federation.local_epochs
    if method == "fine_tune":
        return cfg.personalisation.epochs
    return 0


def personal_seed(round_seed: int) -> int:
    return int(round_seed) + PERSONAL_SEED_OFFSET


class PersonalRefused(SafnError):
    """The site has no personal model for this run (its privacy budget or ledger refused the
    training, or it trained in no round); the reason is one line."""


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
        if privacy.mode == "dp-sgd":
            from safn_core.federation.site_privacy import site_dp

            self.dp = site_dp(site, pre, privacy, state_dir=state_dir, run_id=run_id,
                              rounds=site.cfg.federation.rounds,
                              epochs=site.cfg.federation.local_epochs, lr=self.lr)
        else:
            self._plain_setup()

    def _plain_setup(self) -> None:
        cfg = self.site.cfg
        torch.manual_seed(self.seed)
        self.model = make_model(self.pre.modalities, cfg.model, self.seed)
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
                       global_params=self.anchor_params)
            self.weights = state_to_numpy(self.model)
            return self.weights
        from safn_core.privacy import PrivacyError

        try:
            self.weights, _ = self.dp.train_round(
                self.weights, self.pre.modalities, cfg.model, self.class_counts,
                server_round=self.server_round, seed=self.seed + 7 * self.calls,
                proximal_mu=self.mu, epochs=epochs, kind="personal", anchor=self.anchor)
        except PrivacyError as exc:
            raise PersonalRefused(" ".join(str(exc).split())) from None
        return self.weights


def _model(site: Site, pre: Preprocessor, weights: dict):
    model = make_model(pre.modalities, site.cfg.model, 0)
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in weights.items()})
    return model


def validation_scores(site: Site, pre: Preprocessor, weights: dict, class_counts
                      ) -> tuple[float, float | None]:
    """The site's validation loss (cross-entropy, as the federation's) and ROC-AUC."""
    data = site.arrays(pre, "val")
    return validation_metrics(_model(site, pre, weights), data, site.cfg.model, class_counts,
                              loss="cross_entropy")


def unfit_validation(site: Site) -> str | None:
    """Why the site's validation split cannot choose a personal model (None when it can):
    the choice of epoch or round and the threshold are statistics of that split, and with fewer
    than ``min_cell`` people of a class they say nothing reliable (with one class, a model that
    predicts that class for everyone looks best). Such a site keeps the global model."""
    counts = np.bincount(site.cohort.table.loc[site.split.val, "label"].to_numpy(dtype=int),
                         minlength=2).tolist()
    if min(counts) < site.min_cell:
        return (f"its validation split has {counts[0]} / {counts[1]} participants per class, "
                f"fewer than min_cell = {site.min_cell}, too few to choose a personal model: "
                "it keeps the global model")
    return None


# ------------------------------------------------------------------------- the two methods


def fine_tune(site: Site, global_weights: dict, pre: Preprocessor, class_counts: list[int], *,
              privacy: PrivacyConfig, state_dir: Path | None, run_id: str, seed: int
              ) -> tuple[dict, dict]:
    """Fine-tune the global model on the site's training split; keep the epoch (0 included)
    its validation split prefers. Returns the kept weights and a record of the choice."""
    cfg = site.cfg
    selection = RoundSelection(cfg.federation.select, None)
    loss, auc = validation_scores(site, pre, global_weights, class_counts)
    selection.update(0, loss, auc)
    best, best_scores = global_weights, (loss, auc)
    trainer = _Trainer(site, pre, class_counts, global_weights, anchor=None, mu=0.0,
                       seed=personal_seed(seed), privacy=privacy, state_dir=state_dir,
                       run_id=run_id)
    note = None
    trained = 0
    for epoch in range(1, cfg.personalisation.epochs + 1):
        try:
            weights = trainer.train(1)
        except PersonalRefused as exc:
            if epoch == 1:
                raise
            note = f"stopped after {trained} epochs: {exc}"
            break
        trained = epoch
        loss, auc = validation_scores(site, pre, weights, class_counts)
        if selection.update(epoch, loss, auc):
            best, best_scores = weights, (loss, auc)
    return best, {"method": "fine_tune", "epoch": selection.selected_round,
                  "epochs_trained": trained, "select": selection.select,
                  "val_loss": best_scores[0], "val_roc_auc": best_scores[1],
                  **({"note": note} if note else {})}


@dataclass
class DittoOutcome:
    """One round of Ditto at a site: whether it trained, the round its selection keeps."""

    trained: bool
    selected_round: int | None = None
    val_loss: float | None = None
    refusal: str | None = None


def ditto_round(site: Site, global_weights: dict, pre: Preprocessor, class_counts: list[int],
                *, server_round: int, privacy: PrivacyConfig, state_dir: Path | None,
                run_id: str, seed: int) -> DittoOutcome:
    """Ditto's personal step of one round (see the module docstring). A round the site already
    trained (the coordinator redoing it after a crash) is not trained again."""
    cfg = site.cfg
    if unfit_validation(site) is not None:  # the global model is this site's (`personalise`)
        return DittoOutcome(False, None, refusal=unfit_validation(site))
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
        return DittoOutcome(False, selection.selected_round, refusal=str(exc))
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


# ------------------------------------------------------------------------- the comparison


@dataclass
class Comparison:
    """The global and the personal model on a site's test split.

    ``reported``: both classes of the test split have at least ``min_cell`` people, so the
    metrics may leave the site. ``confusion``: [TP, FN, TN, FP] of each model at its threshold
    (for the pooled comparison). ``record``: everything, for the site's own disk.
    """

    site: str
    method: str
    class_counts: list[int]
    reported: bool
    metrics: dict[str, dict[str, float]]
    confusion: dict[str, list[int]]
    thresholds: dict[str, float]
    selected: dict = field(default_factory=dict)
    refusal: str | None = None

    @classmethod
    def refused(cls, site: str, method: str, reason: str) -> "Comparison":
        """A site without a personal model: nothing compared, its one-line reason."""
        return cls(site, method, [0, 0], False, {}, {"global": [0] * 4, "personal": [0] * 4},
                   {}, refusal=reason)

    def record(self) -> dict:
        return {"site": self.site, "method": self.method, "test_class_counts": self.class_counts,
                "reported": self.reported, "metrics": self.metrics, "confusion": self.confusion,
                "thresholds": self.thresholds, "selected": self.selected,
                "refusal": self.refusal}


def confusion(y: np.ndarray, p: np.ndarray, threshold: float) -> list[int]:
    pred = np.asarray(p) >= threshold
    y = np.asarray(y).astype(bool)
    return [int((pred & y).sum()), int((~pred & y).sum()), int((~pred & ~y).sum()),
            int((pred & ~y).sum())]


def compare_on_test(site: Site, pre: Preprocessor, global_weights: dict, personal_weights: dict,
                    thresholds: dict[str, float]) -> tuple[dict, dict, list[int]]:
    """Both models' metrics and confusion counts on the site's test split."""
    data = site.arrays(pre, "test")
    metrics, counts = {}, {}
    for which, weights in (("global", global_weights), ("personal", personal_weights)):
        p, _ = predict(_model(site, pre, weights), data)
        full = binary_metrics(data.y, p, thresholds[which])
        metrics[which] = {k: float(full[k]) for k in COMPARED}
        counts[which] = confusion(data.y, p, thresholds[which])
    return metrics, counts, np.bincount(data.y, minlength=2).tolist()


def personal_threshold(site: Site, pre: Preprocessor, weights: dict,
                       federation_threshold: float) -> tuple[float, str]:
    """The personal model's decision threshold and where it comes from."""
    if site.cfg.personalisation.threshold == "global":
        return float(federation_threshold), "the federation's"
    data = site.arrays(pre, "val")
    if len(np.unique(data.y)) < 2:
        return float(federation_threshold), ("the federation's (the site's validation split "
                                             "has one class)")
    p, _ = predict(_model(site, pre, weights), data)
    return float(choose_threshold(data.y, p)), "the site's validation split"


def personalise(site: Site, global_weights: dict, pre: Preprocessor, class_counts: list[int], *,
                federation_threshold: float, privacy: PrivacyConfig, state_dir: Path | None,
                run_id: str, seed: int) -> Comparison:
    """The end of a personalised run at a site: its personal model (fine-tuned now, or Ditto's
    kept one), its threshold, and the comparison with the global model on the test split. The
    personal model and the full comparison are written to the site's state folder."""
    method = site.cfg.personalisation.method
    store = PersonalStore(state_dir, run_id)
    unfit = unfit_validation(site)
    try:
        if unfit is not None:  # nothing to choose with: the global model, its threshold
            weights, chosen = global_weights, {"method": method, "epoch": 0,
                                               "kept": "global", "note": unfit}
        elif method == "fine_tune":
            weights, chosen = fine_tune(site, global_weights, pre, class_counts,
                                        privacy=privacy, state_dir=state_dir, run_id=run_id,
                                        seed=seed)
        else:
            weights, chosen = store.selected()
            if weights is None:
                raise PersonalRefused("no personal model: the site trained its personal model "
                                      "in no round of this run")
    except PersonalRefused as exc:
        out = Comparison.refused(site.name, method, str(exc))
        store.save_evaluation(out.record())
        return out
    if unfit is not None:
        threshold, source = float(federation_threshold), "the federation's (" + unfit + ")"
    else:
        threshold, source = personal_threshold(site, pre, weights, federation_threshold)
    chosen = {**chosen, "threshold": threshold, "threshold_from": source}
    if method == "fine_tune" or unfit is not None:
        store.save_selected(weights, chosen)
    thresholds = {"global": float(federation_threshold), "personal": threshold}
    metrics, counts, n = compare_on_test(site, pre, global_weights, weights, thresholds)
    reported = min(n) >= site.cfg.data.min_cell
    out = Comparison(site.name, method, n, reported, metrics, counts, thresholds,
                     {k: chosen.get(k) for k in ("epoch", "round", "epochs_trained", "kept",
                                                 "note") if chosen.get(k) is not None})
    store.save_evaluation(out.record())
    return out


def comparison_line(c: Comparison) -> str:
    """The site's terminal line for its comparison (its own figures: it may see them all)."""
    if c.refusal is not None:
        return f"personalisation: no personal model: {c.refusal}"
    g, p = c.metrics["global"], c.metrics["personal"]
    which = ("the global model: " + c.selected["note"].split(", too few")[0]
             if c.selected.get("kept") == "global" else
             f"epoch {c.selected['epoch']}" if "epoch" in c.selected
             else f"round {c.selected.get('round')}")
    line = (f"personalisation ({c.method}, kept {which}): balanced accuracy on this site's "
            f"test split {g['balanced_accuracy']:.3f} global, {p['balanced_accuracy']:.3f} "
            f"personal ({sum(c.class_counts)} participants)")
    if not c.reported:
        line += "; not sent (a class below min_cell)"
    return line


# ------------------------------------------------------------------------- on the wire


def comparison_to_metrics(c: Comparison, secure: bool) -> dict:
    """What the site's reply carries (`protocol.Metric`): the same keys from every site; the
    metrics only where its test split passes ``min_cell`` (else `WITHHELD`); the confusion
    counts beside them only in plain runs (under secure aggregation they are masked)."""
    from safn_core.federation.protocol import WITHHELD, Metric

    sent = c.reported and c.refusal is None
    out = {Metric.PERSONAL_REPORTED: int(sent), Metric.PERSONAL_REFUSED: int(c.refusal is not None),
           Metric.PERSONAL_N: int(sum(c.class_counts)) if sent else WITHHELD,
           Metric.PERSONAL_SELECTED: int(c.selected.get("epoch", c.selected.get("round", -1))
                                         if c.selected else -1),
           Metric.PERSONAL_IS_GLOBAL: int(c.selected.get("kept") == "global")}
    for which, prefix in (("global", Metric.GLOBAL_PREFIX), ("personal", Metric.PERSONAL_PREFIX)):
        for k in COMPARED:
            value = c.metrics.get(which, {}).get(k) if sent else None
            out[prefix + k.replace("_", "-")] = (float(value) if value is not None
                                                 and np.isfinite(value) else WITHHELD)
    if not secure:
        zeros = [0, 0, 0, 0]
        out[Metric.GLOBAL_CONFUSION] = list(c.confusion["global"]) if sent else zeros
        out[Metric.PERSONAL_CONFUSION] = list(c.confusion["personal"]) if sent else zeros
    return out


def comparison_from_metrics(m) -> dict:
    """The coordinator's reading of one site's reply: ``reported``, ``refused``, ``n``,
    ``selected``, ``global`` / ``personal`` metrics (None where withheld) and, in plain runs,
    the confusion counts."""
    from safn_core.federation.protocol import Metric, is_withheld

    out = {"reported": bool(m[Metric.PERSONAL_REPORTED]),
           "refused": bool(m[Metric.PERSONAL_REFUSED]),
           "n": None if is_withheld(m[Metric.PERSONAL_N]) else int(m[Metric.PERSONAL_N]),
           "selected": None if int(m[Metric.PERSONAL_SELECTED]) < 0
           else int(m[Metric.PERSONAL_SELECTED]),
           "kept_global": bool(m.get(Metric.PERSONAL_IS_GLOBAL, 0))}
    for which, prefix in (("global", Metric.GLOBAL_PREFIX), ("personal", Metric.PERSONAL_PREFIX)):
        values = {k: m[prefix + k.replace("_", "-")] for k in COMPARED}
        out[which] = (None if not out["reported"] else
                      {k: (None if is_withheld(v) else float(v)) for k, v in values.items()})
    if Metric.GLOBAL_CONFUSION in m:
        out["confusion"] = {"global": [int(x) for x in m[Metric.GLOBAL_CONFUSION]],
                            "personal": [int(x) for x in m[Metric.PERSONAL_CONFUSION]]}
    return out


def pooled_from_confusion(total: dict[str, list[int]], min_cell: int) -> dict | None:
    """Pooled balanced accuracy, sensitivity and specificity of each model from summed
    confusion counts; None when a class of the pooled test participants is below min_cell."""
    g = np.asarray(total["global"], dtype=float)
    pos, neg = g[0] + g[1], g[2] + g[3]
    if min(pos, neg) < min_cell:
        return None
    out = {"n": int(pos + neg)}
    for which in ("global", "personal"):
        tp, fn, tn, fp = (float(x) for x in total[which])
        sens, spec = tp / (tp + fn), tn / (tn + fp)
        out[which] = {"balanced_accuracy": (sens + spec) / 2, "sensitivity": sens,
                      "specificity": spec}
    return out
