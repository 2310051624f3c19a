"""From the configuration to a `CombatSpec`: which features, which covariates, checked against
the cohort's structure (one place, for safn-train, the federation and safn-validate)."""

from __future__ import annotations

from safn_core.config import HarmonisationConfig
from safn_core.data.cohort import Modality
from safn_core.errors import ConfigError
from safn_core.harmonisation.design import CombatSpec


def combat_spec(cfg: HarmonisationConfig, modalities: tuple[Modality, ...]) -> CombatSpec:
    """The harmonised features (``harmonisation.modalities``, default every imaging-side
    modality) and covariates (``harmonisation.covariates``) of a cohort with ``modalities``."""
    names = [m.name for m in modalities]
    if cfg.modalities is None:
        chosen = [m for m in modalities if m.side == "imaging"]
        if not chosen:
            raise ConfigError("harmonisation.modalities: the cohort has no imaging-side "
                              f"modality (it has {names}); name the modalities to harmonise")
    else:
        unknown = [m for m in cfg.modalities if m not in names]
        if unknown:
            raise ConfigError(f"harmonisation.modalities: {unknown} not among the cohort's "
                              f"modalities {names}")
        chosen = [m for m in modalities if m.name in cfg.modalities]
    features = tuple(f for m in chosen for f in m.features)
    known = {f for m in modalities for f in m.features}
    missing = [c for c in cfg.covariates if c not in known]
    if missing:
        raise ConfigError(f"harmonisation.covariates: {missing} not among the cohort's features "
                          "(the covariates are columns of the data, e.g. AGE and SEX of the "
                          "demographics); name existing columns or set harmonisation.covariates")
    continuous = tuple(c for c, kind in cfg.covariates.items() if kind == "continuous")
    categorical = {c: tuple(kind) for c, kind in cfg.covariates.items() if kind != "continuous"}
    return CombatSpec(features, continuous, categorical)
