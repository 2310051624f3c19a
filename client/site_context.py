"""Which site a ClientApp message is for, and how to read the model and settings it carries.

What differs between a deployment and a simulation is one object, a `SiteSource`, given to
`safn.client.app.make_client_app`: how a message's site and its cohort are found, where the site
keeps its own state, where its harmonised training split goes and what kind of data it says it
has. A deployed SuperNode serves its own site (`DeployedSite`: ``site-config`` in the node
config, the site's own site.yaml: data, split seed, privacy, min_cell); a simulation serves
virtual sites by Flower's ``partition-id`` (`safn.simulations.client_app.VirtualSites`). The app's
`SiteSourceMod` makes its source the one the functions below use for each message; everything
else here is the same code in both. The run's shared settings arrive in every message as
``safn-config``, so a site never reads the coordinator's files. Sites are cached per process:
a Ray actor builds each site's split and arrays once per run.
"""

from __future__ import annotations

from contextvars import ContextVar
from functools import lru_cache
from pathlib import Path
from typing import Protocol

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context

from safn.client import secure_aggregation as secure
from safn_core.data.cohort_store import read_cohort
from safn_core.federation.protocol import MODEL, Config, Layout, NodeConfig
from safn_core.federation.shared_config import shared_config, site_run_config
from safn_core.federation.site import Site, state_to_numpy
from safn_core.preprocess import Preprocessor
from safn_core.training.local import make_model


class SiteSource(Protocol):
    """Where a ClientApp finds the site a message is for, and that site's own folders."""

    def site(self, context: Context, shared_text: str) -> Site:
        """The message's site, with the run's shared settings (``safn-config``)."""

    def state_dir(self, site: Site, context: Context) -> Path:
        """Where the site keeps its own state (privacy ledger, secure-aggregation secret,
        personal models, run end)."""

    def harmonised_file(self, site: Site, run_id: str, context: Context) -> Path:
        """Where the site writes its harmonised training split (federated ComBat)."""

    def data_source(self, site: Site, context: Context) -> str:
        """The kind of data the site trains on (``data.source``: synthetic, ppmi or table), as
        its own configuration says."""


@lru_cache(maxsize=4)
def _deployed_site(site_file: str, shared_text: str) -> Site:
    """A real site: its own file (split seed, privacy, min_cell) + the run's settings, and the
    cohort that safn-client checked against the data contract and prepared at start."""
    from safn_core.config import load_config

    own = load_config(site_file)
    if own.site is None:
        raise ValueError(f"{site_file}: no 'site:' section; a SuperNode's site-config must be "
                         "the site's own site.yaml")
    cfg = site_run_config(shared_config(shared_text), own)
    cohort = read_cohort(Path(own.site.state_dir).resolve() / "cohort" / "cohort.json")
    return Site(own.site.name, cohort, cfg)


class DeployedSite:
    """A SuperNode's own site: ``site-config`` in its node config (set by safn-client) names
    the site's site.yaml, whose ``site.state_dir`` holds the prepared cohort and the site's
    state."""

    def site(self, context: Context, shared_text: str) -> Site:
        node = context.node_config
        if NodeConfig.SITE_CONFIG not in node:
            raise ValueError(f"this SuperNode's node config has no {NodeConfig.SITE_CONFIG!r}: "
                             "a site's SuperNode is started by safn-client")
        return _deployed_site(str(node[NodeConfig.SITE_CONFIG]), shared_text)

    def state_dir(self, site: Site, context: Context) -> Path:
        return Path(site.cfg.site.state_dir)

    def harmonised_file(self, site: Site, run_id: str, context: Context) -> Path:
        """``<state_dir>/harmonised/<run id>.csv``."""
        return self.state_dir(site, context) / "harmonised" / f"{run_id or 'run'}.csv"

    def data_source(self, site: Site, context: Context) -> str:
        return str(site.cfg.data.source)


_SOURCE: ContextVar[SiteSource] = ContextVar("safn_site_source")


class SiteSourceMod:
    """A ClientApp mod: the handlers it wraps find the message's site through ``sites``.

    A class, not a closure: Flower's simulation pickles the ClientApp for its Ray actors, and
    an instance of an importable class travels by reference to its code."""

    def __init__(self, sites: SiteSource):
        self.sites = sites

    def __call__(self, msg, context: Context, call_next):
        token = _SOURCE.set(self.sites)
        try:
            return call_next(msg, context)
        finally:
            _SOURCE.reset(token)


def site_source() -> SiteSource:
    """The source of the ClientApp answering the current message (its `SiteSourceMod`'s)."""
    try:
        return _SOURCE.get()
    except LookupError:
        raise RuntimeError("no site source for this message: a ClientApp's handlers run under "
                           "the `SiteSourceMod` of `safn.client.app.make_client_app`") from None


def site_for(context: Context, config: ConfigRecord) -> Site:
    """The message's site (from the app's `SiteSource`), with the run's settings from the
    message; under federated ComBat, its harmonised data."""
    import torch

    torch.set_num_threads(1)
    site = site_source().site(context, str(config[Config.SAFN_CONFIG]))
    if Config.HARMONISATION_FIT in config:  # federated ComBat: the site's harmonised data
        held_out = site.name in list(config.get(Config.HELD_OUT_SITES, []))
        site = _harmonised(site, str(config[Config.HARMONISATION_FIT]), held_out,
                           str(config.get(Config.RUN_ID, "")), context)
    return site


_HARMONISED: dict = {}


def _harmonised(site: Site, fit_text: str, held_out: bool, run_id: str,
                context: Context) -> Site:
    """The site with its whole cohort harmonised by its own adjustment to the run's fit
    (`safn_core.federation.site_harmonisation`); once per process and fit. A training site
    writes its harmonised training split to its own disk (`harmonised_file`)."""
    import hashlib
    import json

    from safn_core.federation.site_harmonisation import harmonise_site, training_split_frame
    from safn_core.harmonisation import CombatFit

    key = (id(site), hashlib.sha256(fit_text.encode()).hexdigest(), held_out)
    if key not in _HARMONISED:
        if len(_HARMONISED) > 64:
            _HARMONISED.clear()
        fit = CombatFit.from_dict(json.loads(fit_text))
        done = harmonise_site(site, fit, site.cfg.harmonisation, held_out)
        harmonised = Site(site.name, done.cohort, site.cfg)
        if not held_out:
            path = harmonised_file(site, run_id, context)
            if not path.is_file():
                from safn_core.io import write_atomic

                frame = training_split_frame(harmonised, fit.spec)
                write_atomic(path, frame.to_csv(index=False))
        _HARMONISED[key] = harmonised
    return _HARMONISED[key]


def harmonised_file(site: Site, run_id: str, context: Context) -> Path:
    """Where a site keeps its harmonised training split (`SiteSource.harmonised_file`)."""
    return site_source().harmonised_file(site, run_id, context)


def data_source(site: Site, context: Context) -> str:
    """The kind of data this site trains on (`SiteSource.data_source`)."""
    return site_source().data_source(site, context)


def run_id(msg, config: ConfigRecord) -> str:
    """The run's own id (stable across a resume), or Flower's when the message has none."""
    return str(config.get(Config.RUN_ID, f"flower-run-{msg.metadata.run_id}"))


def partition(context: Context) -> int:
    return int(context.node_config.get(NodeConfig.PARTITION_ID, 0))


_PRE_CACHE: dict = {}


def preprocessor(site: Site, config: ConfigRecord) -> Preprocessor:
    """The global preprocessing sent with the model; one object per parameters, so the site's
    preprocessed arrays are computed once per run, not once per round."""
    mean = np.asarray(config[Config.PRE_MEAN], dtype=np.float64)
    scale = np.asarray(config[Config.PRE_SCALE], dtype=np.float64)
    if len(mean) != len(site.cohort.features):
        raise ValueError(f"site {site.name}: the server's preprocessing has {len(mean)} features, "
                         f"this site {len(site.cohort.features)}")
    key = (site.name, mean.tobytes(), scale.tobytes())
    if key not in _PRE_CACHE:
        if len(_PRE_CACHE) > 64:
            _PRE_CACHE.clear()
        pre = Preprocessor(site.cohort.modalities)
        pre.mean_, pre.scale_ = mean, scale
        _PRE_CACHE[key] = pre
    return _PRE_CACHE[key]


_LAYOUTS: dict = {}


def layout(site: Site, fingerprint: str) -> Layout:
    """This site's model layout (built from its own model), checked against the coordinator's.

    Cached by what a layout depends on (the modalities' names, sizes and sides, the model
    settings, the target's classes and order), not by site: an actor serving hundreds of virtual sites builds it once."""
    target = site.cohort.target  # K outputs and the head: the coordinator's model must match
    key = (tuple((m.name, len(m.features), m.side) for m in site.cohort.modalities),
           site.cfg.model.model_dump_json(), target, fingerprint)
    if key not in _LAYOUTS:
        if len(_LAYOUTS) > 8:
            _LAYOUTS.clear()
        found = Layout.of(state_to_numpy(make_model(site.cohort.modalities, site.cfg.model, 0,
                                                    target=target)))
        found.check(fingerprint)
        _LAYOUTS[key] = found
    return _LAYOUTS[key]


def global_weights(site: Site, record: ArrayRecord, config: ConfigRecord
                   ) -> dict[str, np.ndarray]:
    """The global model from the message's one vector (`safn_core.federation.wire`)."""
    return layout(site, str(config[Config.MODEL_LAYOUT])).unflatten(record[MODEL].numpy())


def model_record(site: Site, weights: dict[str, np.ndarray], config: ConfigRecord
                 ) -> ArrayRecord:
    return ArrayRecord({MODEL: Array(layout(site, str(config[Config.MODEL_LAYOUT]))
                                     .flatten(weights))})


def session(site: Site, context: Context):
    return secure.session(state_dir(site, context), context.node_id)


def state_dir(site: Site, context: Context) -> Path:
    """Where the site keeps its own state (`SiteSource.state_dir`)."""
    return site_source().state_dir(site, context)
