"""What a federated run leaves behind: the model bundle of its selected round and its tables.

`save_federated_bundle` writes ``<run folder>/model`` (the same bundle format as safn-train:
weights, preprocessing, config, metrics, model card) for the selected round, with that round's
threshold and metrics, the privacy summary, and where the training and test data came from.
`rounds_table` is ``rounds.csv``. A run in which no site ever trained has no model:
`NoSiteTrained`.

A K-class run (K > 2) records its target in the bundle and the selected round's K-class
figures (`federation.aggregate_multiclass`): the scalar metrics with their intervals, the
confusion counts, the per-class figures and the majority-class baseline; its decision rule is
argmax (the sites' confusion counts), so it has no threshold.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from safn_core.config import SafnConfig
from safn_core.errors import SafnError
from safn_core.federation.aggregate import selected_entry
from safn_core.federation.checkpoint import RunState
from safn_core.federation.privacy_report import privacy_summary
from safn_core.federation.provenance import evaluation_basis
from safn_core.federation.run_folder import run_identity
from safn_core.metrics import METRICS
from safn_core.preprocess import Preprocessor
from safn_core.targets import PD_VS_HC, Target
from safn_core.training.local import make_model


class NoSiteTrained(SafnError):
    """No site trained in any round (each refused, failed or was rejected): there is no model,
    and the run ends as failed instead of writing an untrained bundle."""


@dataclass(frozen=True)
class FederatedRun:
    """What the bundle says of the run besides its state: the sites' own words about their
    data, who was held out, the DP statistics releases, the model selection."""

    label_names: tuple[str, ...]
    held_out: frozenset[str]
    sources: dict
    gaussian: dict
    withheld: dict  # site -> why it withheld its statistics
    selection_rule: str
    patience: int
    stopped_early: bool
    logistic_floor: dict | None = None  # `floor_summary`: the floor SAFN started from, or why not
    target: Target | None = None  # what the model predicts; None: from label_names

    def run_target(self) -> Target:
        """The run's target: ``target``, else ``pd_vs_hc`` under ``label_names``."""
        if self.target is not None:
            return self.target
        names = tuple(self.label_names)
        return PD_VS_HC if names == PD_VS_HC.classes else Target(PD_VS_HC.name, names)


def no_site_trained_reason(history: list[dict], withheld: dict[str, str], rounds: int) -> str:
    """One line: no site trained, and each site's last reason (refusal, rejected update,
    withheld statistics)."""
    from safn_core.federation.event_text import rejection_text

    why: dict[str, str] = {f"site {k}": f"withheld its statistics: {v}"
                           for k, v in withheld.items()}
    for e in history:
        for x in e.get("rejected", []):
            if x.get("site") not in (None, "-"):
                why[f"site {x['site']}"] = f"update rejected: {rejection_text(x)}"
        for x in e.get("refused", []):
            why[f"site {x['site']}"] = f"refused: {x['reason']}"
    return (f"no site trained in any of the {rounds} rounds, so there is no model (no bundle "
            "written)" + "".join(f"; {k} {v}" for k, v in sorted(why.items())))


def floor_summary(record: dict | None, history: list[dict]) -> dict | None:
    """The logistic regression floor for the bundle (``logistic.json``'s record): its penalty,
    Newton rounds and sites, round 0's pooled test metrics (the floor evaluated before any
    training), or why the run went without it; None when the model has no wide path."""
    if record is None:
        return None
    if not record.get("fit"):
        return {"skipped": record.get("skipped", "")}
    fit = record["fit"]
    round0 = next((e for e in history if e.get("round") == 0), {})
    return {"penalty": fit["penalty"], "newton_rounds": fit["iterations"],
            "converged": fit["converged"], "sites": record.get("sites", []),
            "secure_aggregation": bool(record.get("secure_aggregation")),
            "pooled_test": round0.get("pooled")}


def flower_run_ids(run_dir: Path) -> list[str]:
    """The Flower runs safn-server submitted for this run folder (``flower_runs.json``)."""
    try:
        runs = json.loads((Path(run_dir) / "flower_runs.json").read_text())["runs"]
    except (OSError, ValueError, KeyError):
        return []
    return [str(r["run_id"]) for r in runs]


def rounds_table(history: list[dict]) -> pd.DataFrame:
    """One row per round and site ('pooled' included): the metric history as a table."""
    rows = []
    for e in history:
        base = {"round": e["round"], "train_loss": e.get("train_loss"),
                "threshold": e.get("threshold")}
        if e.get("pooled"):
            rows.append({**base, "site": "pooled", "n_test": e.get("n_test"), **e["pooled"]})
        privacy = e.get("privacy") or {}
        for site, m in (e.get("sites") or {}).items():
            eps = (privacy.get(site) or {}).get("epsilon")
            rows.append({**base, "site": site, **(m or {"withheld": True}),
                         **({"epsilon": eps} if privacy else {})})
    return pd.DataFrame(rows)


def _scalars(m: dict, cis: dict) -> dict:
    """A figure dict's numbers as ``{key: {"value", "ci"}}`` (K-class dicts also hold the
    confusion counts and per-class figures, kept apart)."""
    return {k: {"value": v, "ci": cis.get(k)} for k, v in m.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "n"}


def kclass_metrics(last: dict) -> dict:
    """The bundle's metrics of a K-class run's selected round: the pooled test figures (with
    their confusion counts, per-class figures and majority baseline) and each held-out site's."""
    pooled = last.get("pooled") or {}
    out = {"federated_pooled_test": {
        **_scalars(pooled, last.get("pooled_ci") or {}),
        **{k: pooled[k] for k in ("confusion", "per_class", "majority") if k in pooled}}}
    for name, m in (last.get("held_out") or {}).items():
        if m:
            out[f"held_out_{name}"] = {**_scalars(m, m.get("ci") or {}),
                                       **{k: m[k] for k in ("confusion", "per_class") if k in m}}
    return out


def save_federated_bundle(run_dir: Path, cfg: SafnConfig, state: RunState, run: FederatedRun,
                          harmonisation=None) -> Path:
    """The selected round's model bundle at ``<run_dir>/model`` (which must not exist)."""
    from safn_core.bundle import save_bundle

    if not any(e.get("sites_trained") for e in state.history):
        raise NoSiteTrained(no_site_trained_reason(state.history, run.withheld,
                                                   cfg.federation.rounds))
    pre = Preprocessor.from_state(state.preprocessing)
    target = run.run_target()
    model = (make_model(pre.modalities, cfg.model, 0) if target.binary
             else make_model(pre.modalities, cfg.model, 0, target=target))
    model.load_state_dict({k: torch.as_tensor(v) for k, v in state.selected_weights().items()})
    last = selected_entry(state.history)  # the selected round: threshold, metrics
    pooled = last.get("pooled") or {}
    training_sites = sorted(set(state.sites.values()) - run.held_out)
    return save_bundle(
        Path(run_dir) / "model", model, pre, cfg, harmonisation=harmonisation,
        threshold=last.get("threshold", 0.5) if target.binary else None,
        class_counts=state.class_counts, target=target, kind="federated",
        # each figure with its 95 % interval from the pooled test histograms (round's pooled_ci)
        metrics={"federated_pooled_test": {k: {"value": v, "ci": (last.get("pooled_ci") or {})
                                               .get(k)} for k, v in pooled.items()},
                 **{f"held_out_{name}": {k: {"value": m[k], "ci": m["ci"][k]} for k in METRICS}
                    for name, m in (last.get("held_out") or {}).items() if m}}
        if target.binary else kclass_metrics(last),
        extra={"privacy": privacy_summary(state.history, run.gaussian),
               "run_id": run_identity(run_dir),
               # Flower's run ids of this run: one per submission (safn-server --resume submits
               # a new Flower run); none in a simulation
               "flower_run_ids": flower_run_ids(run_dir),
               "training": {
                   "participants": int(sum(state.class_counts)), "sites": training_sites,
                   "held_out_sites": sorted(run.held_out), "rounds": state.round,
                   # what the sites said their data is, not this coordinator's data.source
                   "data_sources": dict(sorted(run.sources.items())),
                   # participants and sites behind the metrics (no count below min_cell)
                   "test_evaluation": evaluation_basis(last, training_sites, cfg.data.min_cell),
                   "selected_round": last.get("round"),
                   "selection": {"rule": run.selection_rule, "patience": run.patience,
                                 "stopped_early": run.stopped_early},
                   "logistic_floor": run.logistic_floor,
                   "strategy": (f"distributed DP ({cfg.privacy.distributed.optimizer})"
                                if cfg.privacy.mode == "distributed"
                                else cfg.federation.strategy),
                   "local_epochs": (None if cfg.privacy.mode == "distributed"
                                    else cfg.federation.local_epochs)}})
