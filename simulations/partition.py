"""Sharding one cohort into virtual sites, for simulation.

Every scheme assigns every participant to exactly one site:

- ``natural``: the cohort's own site column (real multi-site structure, scanner effects included);
- ``iid``: a stratified random split into equal sites;
- ``dirichlet``: label skew, each class spread over sites by Dirichlet(α) proportions;
- ``size_skew``: unequal site sizes from Dirichlet(α), class ratio kept.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from safn_core.data.cohort import Cohort
from safn_core.errors import ConfigError


def _spread(ids: np.ndarray, proportions: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
    """Split shuffled ``ids`` by ``proportions`` (cumulative cut points, every id used once)."""
    ids = rng.permutation(ids)
    cuts = np.round(np.cumsum(proportions)[:-1] * len(ids)).astype(int)
    return np.split(ids, cuts)


def partition(cohort: Cohort, scheme: str, n_sites: int = 5, *, alpha: float = 0.5,
              size_alpha: float = 1.0, seed: int = 0) -> dict[str, np.ndarray]:
    """Site name → participant ids."""
    rng = np.random.default_rng(seed)
    if scheme == "natural":
        sites = pd.Series(cohort.sites, index=cohort.ids)
        if sites.nunique() < 2:
            raise ConfigError("simulation.partition=natural needs a cohort with at least two "
                              "sites in its site column; use iid, dirichlet or size_skew")
        return {f"site_{s}" if not str(s).startswith("site") else str(s):
                sites.index[sites == s].to_numpy() for s in sorted(sites.unique())}
    if n_sites < 2:
        raise ConfigError("simulation.n_sites must be at least 2 for a federation")
    names = [f"site_{i + 1:02d}" for i in range(n_sites)]
    parts: list[list[np.ndarray]] = [[] for _ in range(n_sites)]
    y, classes = cohort.y, range(cohort.n_classes)  # each of the target's K classes
    if scheme == "iid":
        props = {c: np.full(n_sites, 1 / n_sites) for c in classes}
    elif scheme == "dirichlet":
        props = {c: rng.dirichlet(np.full(n_sites, alpha)) for c in classes}
    elif scheme == "size_skew":
        sizes = rng.dirichlet(np.full(n_sites, size_alpha))
        props = {c: sizes for c in classes}
    else:
        raise ConfigError(f"simulation.partition '{scheme}' is unknown; use natural, iid, "
                          "dirichlet or size_skew")
    for c in classes:
        for i, chunk in enumerate(_spread(cohort.ids[y == c], props[c], rng)):
            parts[i].append(chunk)
    return {name: np.sort(np.concatenate(p)) for name, p in zip(names, parts)}


def summary(cohort: Cohort, sites: dict[str, np.ndarray]) -> pd.DataFrame:
    """Participants, positives and negatives per site; with K > 2 classes, participants and
    the count and share of each class."""
    y = pd.Series(cohort.y, index=cohort.ids)
    if cohort.n_classes > 2:
        return _summary_k(y, cohort.label_names, sites)
    rows = []
    for name, ids in sites.items():
        pos = int(y.loc[ids].sum()) if len(ids) else 0
        rows.append({"site": name, "participants": len(ids), cohort.label_names[1]: pos,
                     cohort.label_names[0]: len(ids) - pos,
                     f"% {cohort.label_names[1]}": round(100 * pos / max(len(ids), 1), 1)})
    return pd.DataFrame(rows)


def _summary_k(y: pd.Series, names, sites: dict[str, np.ndarray]) -> pd.DataFrame:
    rows = []
    for name, ids in sites.items():
        counts = np.bincount(y.loc[ids].to_numpy(), minlength=len(names))[:len(names)]
        row = {"site": name, "participants": len(ids)}
        row.update({str(n): int(c) for n, c in zip(names, counts)})
        row.update({f"% {n}": round(100 * int(c) / max(len(ids), 1), 1)
                    for n, c in zip(names, counts)})
        rows.append(row)
    return pd.DataFrame(rows)
