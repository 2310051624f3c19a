"""The model bundle: weights + preprocessing + config + metrics, one folder, one format.

`safn-train`, `safn-sim` and `safn-server` write it; every later tool (`safn-validate`, reports)
reads it. A bundle is written to a temporary sibling folder and renamed into place, so a reader
never sees half a bundle and an existing bundle is never overwritten.

A **site bundle** (`save_site_bundle`, written by ``safn-validate --recalibrate``) is a bundle
with the same weights and preprocessing plus a calibration map and a new threshold fitted at one
site, recorded in ``bundle.json`` under ``recalibration`` (`safn_core.recalibration`).
safn-train's bundle may carry a temperature fitted at training on its validation split, under
``calibration`` (``train.temperature_scaling``); a site's map replaces it. `Bundle.predict`
applies the map in force, so every tool that predicts through it uses it.

A bundle of a model trained on harmonised features (``harmonisation.method: combat``) carries
the fitted harmonisation in ``harmonisation.json`` (`HarmonisationRecord`: the global ComBat fit
and how a site adjusts itself) and a summary of it in ``bundle.json`` under ``harmonisation``.
Before it predicts, the bundle harmonises the table it is given: each site in it estimates its
own adjustment from its own participants with the bundle's fit, without labels
(`Bundle.harmonise`, `Bundle.arrays`). `Bundle.scores` and `Bundle.predict` refuse arrays that
were not prepared that way, so a harmonised model is never fed raw features.

A bundle records its **target** in ``bundle.json`` (``target``: `Target.to_dict`, its name, K
classes in label order, whether they are ordered and the features that define it; a bundle
written before targets existed is ``pd_vs_hc``) and `load_bundle` rebuilds the model with K
outputs and the head its config names. For K > 2 `Bundle.scores` gives the K logits and the
class probabilities (n, K), a calibration map is a `MultiClassMap`, and the predicted class is
the argmax, or, where the bundle carries ordinal cut points (``decision.cutpoints``, fitted on
validation data), the class whose interval of the expected class index holds the participant
(`Bundle.decide`, `safn_core.multiclass.predict_classes`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml

from safn_core.config import SafnConfig, dump_config
from safn_core.data.cohort import SITE, Modality
from safn_core.errors import DataError, SafnError
from safn_core.harmonisation.combat import SiteAdjustment
from safn_core.harmonisation.record import HarmonisationRecord
from safn_core.model import SAFN
from safn_core.modelcard import model_card
from safn_core.preprocess import Preprocessor
from safn_core.recalibration import CalibrationMap, TrainingTemperature
from safn_core.bundle_target import bundle_target, build_model, kclass_scores, read_map
from safn_core.recalibration_multiclass import MultiClassMap
from safn_core.targets import PD_VS_HC, Target
from safn_core.training.local import Arrays, scores

FORMAT = "safn-bundle"
FORMAT_VERSION = 1
HARMONISATION_FILE = "harmonisation.json"


def _safn_version() -> str:
    try:
        return version("safn")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "unknown"


@dataclass
class HarmonisedArrays(Arrays):
    """Arrays a bundle prepared from a table through its harmonisation (``fit_id``) and
    preprocessing (`Bundle.arrays`): the only arrays a harmonising bundle predicts from."""

    fit_id: str = ""


def harmonisation_summary(record: HarmonisationRecord,
                          modalities: tuple[Modality, ...]) -> dict:
    """What ``bundle.json`` (and so the model card) says of a bundle's harmonisation."""
    spec = record.spec
    harmonised = set(spec.features)
    return {"method": record.method, "file": HARMONISATION_FILE, "fit_id": record.fit.fit_id,
            "n_features": len(spec.features),
            "modalities": [m.name for m in modalities if harmonised & set(m.features)],
            "covariates": {"continuous": list(spec.continuous),
                           "categorical": {c: list(v) for c, v in spec.categorical.items()}},
            "empirical_bayes": record.empirical_bayes, "parametric": record.parametric,
            "adjustment": record.adjustment_method, "fitted_on": record.fitted_on,
            "participants": int(record.fit.n)}


@dataclass
class Bundle:
    model: SAFN
    preprocessor: Preprocessor
    config: SafnConfig
    meta: dict
    harmonisation: HarmonisationRecord | None = None
    """The fitted harmonisation (``harmonisation.json``); None: the model takes raw features."""

    @property
    def threshold(self) -> float:
        """The binary decision threshold (NaN for a K-class bundle, which has none)."""
        t = self.meta.get("threshold")
        return float("nan") if t is None else float(t)

    @property
    def target(self) -> Target:
        """What the model predicts (`bundle_target`)."""
        return bundle_target(self.meta)

    @property
    def n_classes(self) -> int:
        return self.target.n_classes

    @property
    def label_names(self) -> tuple[str, ...]:
        return self.target.classes

    @property
    def cutpoints(self) -> list[float] | None:
        """The ordinal cut points of a K-class bundle's decision rule (None: argmax)."""
        cuts = (self.meta.get("decision") or {}).get("cutpoints")
        return None if cuts is None else [float(c) for c in cuts]

    @property
    def decision_rule(self) -> str:
        """``threshold`` (binary), ``argmax`` or ``cutpoints`` (K > 2)."""
        if self.n_classes == 2:
            return "threshold"
        return "cutpoints" if self.cutpoints is not None else "argmax"

    @property
    def calibration_map(self) -> CalibrationMap | MultiClassMap | None:
        """The map every prediction goes through: a site's recalibration map where the bundle
        was recalibrated (it replaces any map from training), else the temperature fitted at
        training (``calibration``), else None (the model's own probabilities)."""
        for key in ("recalibration", "calibration"):
            if self.meta.get(key):
                return read_map(self.meta[key].get("map"), f"bundle.json {key}.map",
                                self.n_classes)
        return None

    @property
    def min_cell(self) -> int:
        return int(self.config.data.min_cell)

    def adjust(self, table: pd.DataFrame, *, site_col: str = SITE,
               min_cell: int | None = None) -> dict[str, SiteAdjustment]:
        """Every site of ``table`` adjusted from its own participants with the bundle's fit
        (no labels; a table without site information is one site). Needs a harmonising
        bundle; ``min_cell`` defaults to the bundle's ``data.min_cell``."""
        if self.harmonisation is None:
            raise DataError("this model bundle has no harmonisation (no harmonisation.json): "
                            "its model takes the features as they are")
        return self.harmonisation.adjust_sites(
            table, site_col=site_col, min_cell=self.min_cell if min_cell is None else min_cell)

    def harmonise(self, table: pd.DataFrame, *, site_col: str = SITE,
                  min_cell: int | None = None,
                  adjustments: dict[str, SiteAdjustment] | None = None) -> pd.DataFrame:
        """``table`` as the model expects it: with a harmonisation, its MRI features harmonised
        per site (each site adjusted from its own participants, or by ``adjustments``) with
        the bundle's fit; without one, unchanged. Same rows, order and columns."""
        if self.harmonisation is None:
            return table
        if adjustments is None:
            adjustments = self.adjust(table, site_col=site_col, min_cell=min_cell)
        return self.harmonisation.harmonise(table, adjustments, site_col=site_col)

    def arrays(self, table: pd.DataFrame, *, site_col: str = SITE, min_cell: int | None = None,
               adjustments: dict[str, SiteAdjustment] | None = None) -> Arrays:
        """The participants of ``table`` (with its label column) as the model takes them:
        harmonised (`harmonise`), then through the bundle's preprocessing."""
        if self.harmonisation is None:
            return Arrays.from_table(self.preprocessor, table)
        harmonised = self.harmonise(table, site_col=site_col, min_cell=min_cell,
                                    adjustments=adjustments)
        a = Arrays.from_table(self.preprocessor, harmonised)
        return HarmonisedArrays(a.x, a.mask, a.y, self.harmonisation.fit.fit_id)

    def _model_input(self, data) -> Arrays:
        """Arrays to predict from: a table goes through `arrays`; arrays given directly must
        have been prepared by this bundle when it harmonises."""
        if isinstance(data, pd.DataFrame):
            return self.arrays(data)
        if self.harmonisation is not None and not (
                isinstance(data, HarmonisedArrays)
                and data.fit_id == self.harmonisation.fit.fit_id):
            raise DataError("this model was trained on harmonised MRI features: pass the table "
                            "(or Bundle.arrays(table)) so that each site's participants are "
                            "harmonised with the bundle's fit before they are scored")
        return data

    def scores(self, arrays, batch_size: int = 1024) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The model's own outputs, before any calibration map: the logit of P(PD) (float64,
        the difference of the two output logits), P(PD) as `training.local.predict` gives it
        (softmax, float32), and the gate weights α (n, M) (`training.local.scores`).
        K > 2 classes: the K logits (n, K) and their softmax, the class probabilities (n, K),
        both float64 (`kclass_scores`). ``arrays``: a table (harmonised and preprocessed here,
        `arrays`) or arrays from `arrays`."""
        data = self._model_input(arrays)
        if self.n_classes > 2:
            return kclass_scores(self.model, data, batch_size)
        return scores(self.model, data, batch_size)

    def calibrate(self, z: np.ndarray, p_raw: np.ndarray) -> np.ndarray:
        """P(PD) (K > 2: the class probabilities) as this bundle reports it: the map applied to
        the logits ``z``, or the model's own ``p_raw`` when there is no map."""
        cmap = self.calibration_map
        return p_raw if cmap is None else cmap(z)

    def predict(self, arrays) -> tuple[np.ndarray, np.ndarray]:
        """P(PD) (K > 2: the class probabilities (n, K)) with the bundle's calibration map (if
        any) and the gate weights α, for a table or arrays (as `scores`)."""
        z, p_raw, alpha = self.scores(arrays)
        return self.calibrate(z, p_raw), alpha

    def decide(self, p: np.ndarray) -> np.ndarray:
        """The predicted label of each participant: P(PD) ≥ the threshold (binary); for K > 2
        the argmax of the class probabilities, or the bundle's ordinal cut points."""
        p = np.asarray(p)
        if p.ndim == 1:
            return (p >= self.threshold).astype(int)
        from safn_core.multiclass import predict_classes

        cuts = self.cutpoints
        return np.asarray(predict_classes(p, rule="argmax" if cuts is None else "cutpoints",
                                          cutpoints=cuts)).astype(int)


def save_bundle(dest: Path, model: SAFN, preprocessor: Preprocessor, config: SafnConfig, *,
                threshold: float | None, class_counts, label_names=None, kind: str,
                metrics: dict | None = None, extra: dict | None = None,
                harmonisation: HarmonisationRecord | None = None,
                calibration: TrainingTemperature | None = None,
                target: Target | None = None, cutpoints=None) -> Path:
    """Write a bundle folder at ``dest`` (which must not exist).

    ``target``: what the model predicts (recorded under ``target``; its classes are the label
    names). None: ``pd_vs_hc`` under ``label_names`` (default HC, PD). ``cutpoints``: the
    ordinal cut points of a K-class bundle's decision rule, fitted on validation data
    (`safn_core.multiclass.fit_cutpoints`; None: argmax), under ``decision``. For K > 2
    ``threshold`` is not used (None is recorded as null).

    ``harmonisation``: the harmonisation the model's training features went through (fitted on
    training data only); written to ``harmonisation.json`` and applied before every prediction.
    ``calibration``: the temperature fitted at training on the validation split
    (``train.temperature_scaling``); recorded in ``bundle.json`` under ``calibration`` and
    applied to every prediction, so ``threshold`` must be on its scale.
    """
    dest = Path(dest)
    if harmonisation is not None and not isinstance(harmonisation, HarmonisationRecord):
        raise TypeError("save_bundle(harmonisation=...) takes a HarmonisationRecord, not a "
                        f"{type(harmonisation).__name__}")
    if calibration is not None and not isinstance(calibration, TrainingTemperature):
        raise TypeError("save_bundle(calibration=...) takes a TrainingTemperature, not a "
                        f"{type(calibration).__name__}")
    if target is None:
        names = tuple(label_names or PD_VS_HC.classes)
        target = PD_VS_HC if names == PD_VS_HC.classes else Target(PD_VS_HC.name, names)
    elif label_names is not None and tuple(label_names) != target.classes:
        raise ValueError(f"save_bundle: label_names {tuple(label_names)} are not the target's "
                         f"classes {target.classes}")
    if target.binary and threshold is None:
        raise ValueError("save_bundle: a binary bundle needs its decision threshold")
    k_out = getattr(model, "n_classes", target.n_classes)
    if k_out != target.n_classes:
        raise ValueError(f"save_bundle: the model has {k_out} outputs, the target "
                         f"{target.name!r} {target.n_classes} classes")
    if cutpoints is not None and len(cutpoints) != target.n_classes - 1:
        raise ValueError(f"save_bundle: {target.n_classes} classes need "
                         f"{target.n_classes - 1} cut points, got {list(cutpoints)}")
    if dest.exists():
        raise DataError(f"{dest}: a bundle already exists there; it was not overwritten")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        torch.save(state, tmp / "weights.pt")
        (tmp / "preprocessing.json").write_text(json.dumps(preprocessor.state_dict(), indent=1))
        (tmp / "config.yaml").write_text(dump_config(config))
        meta = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "kind": kind,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "safn_version": _safn_version(),
            "threshold": None if threshold is None else float(threshold),
            "class_counts": [int(c) for c in class_counts],
            "label_names": list(target.classes), "target": target.to_dict(),
            **({} if target.binary else {"decision": {
                "rule": "argmax" if cutpoints is None else "cutpoints",
                "cutpoints": None if cutpoints is None else [float(c) for c in cutpoints]}}),
            "modalities": [{"name": m.name, "n_features": len(m.features), "side": m.side}
                           for m in preprocessor.modalities],
            "n_parameters": int(sum(p.numel() for p in model.parameters())),
            "metrics": metrics or {}, **(extra or {}),
        }
        if calibration is not None:
            meta["calibration"] = calibration.to_dict()
        if harmonisation is not None:
            (tmp / HARMONISATION_FILE).write_text(
                json.dumps(harmonisation.to_dict(), indent=1, allow_nan=False))
            meta["harmonisation"] = harmonisation_summary(harmonisation, preprocessor.modalities)
        (tmp / "bundle.json").write_text(json.dumps(meta, indent=2, default=float))
        (tmp / "model_card.md").write_text(model_card(meta, config))
        os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


SHARED_FILES = ("weights.pt", "preprocessing.json", "config.yaml")
"""The files a site bundle copies unchanged from the bundle it recalibrates."""
OPTIONAL_SHARED_FILES = (HARMONISATION_FILE,)
"""Copied unchanged too where the bundle has them."""


def save_site_bundle(dest: Path, source: Path, meta: dict, card: str) -> Path:
    """Write a site bundle at ``dest`` (which must not exist): ``source``'s weights,
    preprocessing and config copied byte for byte, with ``meta`` as its ``bundle.json`` and
    ``card`` as its model card. ``source`` is only read."""
    dest, source = Path(dest), Path(source)
    if dest.exists():
        raise DataError(f"{dest}: a bundle already exists there; it was not overwritten")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        for name in SHARED_FILES:
            shutil.copyfile(source / name, tmp / name)
        for name in OPTIONAL_SHARED_FILES:
            if (source / name).is_file():
                shutil.copyfile(source / name, tmp / name)
        (tmp / "bundle.json").write_text(json.dumps(meta, indent=2, default=float))
        (tmp / "model_card.md").write_text(card)
        os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def load_bundle(path: Path) -> Bundle:
    """Read a bundle folder; errors name the folder and the missing or broken part."""
    path = Path(path)
    meta_file = path / "bundle.json"
    if not meta_file.is_file():
        raise DataError(f"{path}: not a safn model bundle (no bundle.json); pass the folder "
                        "that safn-train or safn-sim wrote as model/")
    try:
        meta = json.loads(meta_file.read_text())
        if meta.get("format") != FORMAT:
            raise ValueError("unknown format")
        pre = Preprocessor.from_state(json.loads((path / "preprocessing.json").read_text()))
        config = SafnConfig.model_validate(yaml.safe_load((path / "config.yaml").read_text()))
    except (OSError, ValueError, KeyError, RuntimeError, yaml.YAMLError) as exc:
        raise DataError(f"{path}: the model bundle is incomplete or damaged ({exc})") from None
    try:
        state = torch.load(path / "weights.pt", map_location="cpu", weights_only=True)
    except Exception as exc:  # any unpickling failure means a damaged file  # noqa: BLE001
        raise DataError(f"{path}: the model bundle is incomplete or damaged (weights.pt: "
                        f"{type(exc).__name__})") from None
    target = bundle_target(meta)
    model = build_model(pre, config, target)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise DataError(f"{path}: weights do not fit the bundle's model ({str(exc)[:200]})") from None
    model.eval()
    # a broken map is reported now, not at the first prediction
    for key in ("recalibration", "calibration"):
        rec = meta.get(key)
        if rec is not None:
            read_map(rec.get("map") if isinstance(rec, dict) else None,
                     f"{meta_file} {key}.map", target.n_classes)
    return Bundle(model, pre, config, meta, _load_harmonisation(path, meta))


def _load_harmonisation(path: Path, meta: dict) -> HarmonisationRecord | None:
    """The bundle's ``harmonisation.json``, checked against what ``bundle.json`` says of it;
    None for a bundle without one (also every bundle written before harmonisation existed)."""
    file, summary = path / HARMONISATION_FILE, meta.get("harmonisation")
    if not file.is_file():
        if summary:
            raise DataError(f"{path}: the model bundle is incomplete or damaged (bundle.json "
                            f"records a harmonisation but {HARMONISATION_FILE} is missing; the "
                            "model cannot be applied without it)")
        return None
    try:
        d = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{file}: the model bundle is incomplete or damaged ({exc})") from None
    try:
        record = HarmonisationRecord.from_dict(d, str(file))
    except (SafnError, ValueError, TypeError, KeyError) as exc:
        raise DataError(f"{path}: the model bundle is incomplete or damaged ({exc})") from None
    if isinstance(summary, dict) and summary.get("fit_id") not in (None, record.fit.fit_id):
        raise DataError(f"{path}: the model bundle is incomplete or damaged ({HARMONISATION_FILE}"
                        f" holds fit {record.fit.fit_id}, bundle.json records "
                        f"{summary['fit_id']})")
    return record
