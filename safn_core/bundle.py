"""The model bundle: weights + preprocessing + config + metrics, one folder, one format.

`safn-train`, `safn-sim` and `safn-server` write it; every later tool (`safn-validate`, reports)
reads it. A bundle is written to a temporary sibling folder and renamed into place, so a reader
never sees half a bundle and an existing bundle is never overwritten.
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

import torch
import yaml

from safn_core.config import SafnConfig, dump_config
from safn_core.errors import DataError
from safn_core.model import SAFN
from safn_core.modelcard import model_card
from safn_core.preprocess import Preprocessor

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
    return Bundle(model, pre, config, meta)
