"""The model bundle: weights + preprocessing + config + metrics, one folder, one format.

`safn-train`, `safn-sim` and `safn-server` write it; every later tool (`safn-validate`, reports)
reads it. A bundle is written to a temporary sibling folder and renamed into place, so a reader
never sees half a bundle and an existing bundle is never overwritten.

A **site bundle** (`save_site_bundle`, written by ``safn-validate --recalibrate``) is a bundle
with the same weights and preprocessing plus a calibration map and a new threshold fitted at one
site, recorded in ``bundle.json`` under ``recalibration`` (`safn_core.recalibration`).
`Bundle.predict` applies the map, so every tool that predicts through it uses it.
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
import torch
import yaml

from safn_core.config import SafnConfig, dump_config
from safn_core.errors import DataError
from safn_core.model import SAFN
from safn_core.modelcard import model_card
from safn_core.preprocess import Preprocessor
from safn_core.recalibration import CalibrationMap

FORMAT = "safn-bundle"
FORMAT_VERSION = 1


def _safn_version() -> str:
    try:
        return version("safn")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "unknown"


@dataclass
class Bundle:
    model: SAFN
    preprocessor: Preprocessor
    config: SafnConfig
    meta: dict

    @property
    def threshold(self) -> float:
        return float(self.meta["threshold"])

    @property
    def label_names(self) -> tuple[str, str]:
        return tuple(self.meta.get("label_names", ("HC", "PD")))

    @property
    def calibration_map(self) -> CalibrationMap | None:
        """The site's calibration map of a recalibrated bundle; None (identity) otherwise."""
        rec = self.meta.get("recalibration")
        return CalibrationMap.from_dict(rec.get("map"), "bundle.json recalibration.map") \
            if rec else None

    @torch.no_grad()
    def scores(self, arrays, batch_size: int = 1024) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The model's own outputs, before any calibration map: the logit of P(PD) (float64,
        the difference of the two output logits), P(PD) as `training.local.predict` gives it
        (softmax, float32), and the gate weights α (n, M)."""
        self.model.eval()
        x, m = torch.from_numpy(arrays.x), torch.from_numpy(arrays.mask)
        z, p, alpha = [], [], []
        for i in range(0, len(arrays), batch_size):
            logits, a = self.model(x[i:i + batch_size], m[i:i + batch_size], return_weights=True)
            z.append((logits[:, 1].double() - logits[:, 0].double()).numpy())
            p.append(torch.softmax(logits, dim=1)[:, 1].numpy())
            alpha.append(a.numpy())
        if not z:
            return np.zeros(0), np.zeros(0), np.zeros((0, arrays.mask.shape[1]))
        return np.concatenate(z), np.concatenate(p), np.concatenate(alpha)

    def calibrate(self, z: np.ndarray, p_raw: np.ndarray) -> np.ndarray:
        """P(PD) as this bundle reports it: the map applied to the logits ``z``, or the model's
        own ``p_raw`` when there is no map."""
        cmap = self.calibration_map
        return p_raw if cmap is None else cmap(z)

    def predict(self, arrays) -> tuple[np.ndarray, np.ndarray]:
        """P(PD) with the bundle's calibration map (if any) and the gate weights α."""
        z, p_raw, alpha = self.scores(arrays)
        return self.calibrate(z, p_raw), alpha


def save_bundle(dest: Path, model: SAFN, preprocessor: Preprocessor, config: SafnConfig, *,
                threshold: float, class_counts, label_names=("HC", "PD"), kind: str,
                metrics: dict | None = None, extra: dict | None = None) -> Path:
    """Write a bundle folder at ``dest`` (which must not exist)."""
    dest = Path(dest)
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
            "safn_version": _safn_version(), "threshold": float(threshold),
            "class_counts": [int(c) for c in class_counts], "label_names": list(label_names),
            "modalities": [{"name": m.name, "n_features": len(m.features), "side": m.side}
                           for m in preprocessor.modalities],
            "n_parameters": int(sum(p.numel() for p in model.parameters())),
            "metrics": metrics or {}, **(extra or {}),
        }
        (tmp / "bundle.json").write_text(json.dumps(meta, indent=2, default=float))
        (tmp / "model_card.md").write_text(model_card(meta, config))
        os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


SHARED_FILES = ("weights.pt", "preprocessing.json", "config.yaml")
"""The files a site bundle copies unchanged from the bundle it recalibrates."""


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
    model = SAFN([(m.name, len(m.features), m.side) for m in pre.modalities], config.model)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise DataError(f"{path}: weights do not fit the bundle's model ({str(exc)[:200]})") from None
    model.eval()
    rec = meta.get("recalibration")
    if rec is not None:  # a broken map is reported now, not at the first prediction
        CalibrationMap.from_dict(rec.get("map") if isinstance(rec, dict) else None,
                                 f"{meta_file} recalibration.map")
    return Bundle(model, pre, config, meta)
