"""Which site a ClientApp message is for, and how to read the model and settings it carries.

A site is found from the node config: in simulation ``partition-id`` (a virtual site written by
safn-sim into the run folder); in deployment ``site-config`` (the site's own site.yaml: data,
split seed, privacy, min_cell). The run's shared settings arrive in every message as
``safn-config``, so a site never reads the coordinator's files. Sites are cached per process: a
Ray actor builds each site's split and arrays once per run.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context

from client import secure_aggregation as secure
from safn_core.data.cohort_store import read_cohort
from safn_core.federation.protocol import MODEL, Config, Layout, NodeConfig
from safn_core.federation.run_folder import run_dir_from
from safn_core.federation.shared_config import shared_config, site_run_config
from safn_core.federation.site import Site, state_to_numpy
from safn_core.preprocess import Preprocessor
from safn_core.training.local import make_model


@lru_cache(maxsize=256)
def _sim_site(run_dir: Path, partition_id: int, shared_text: str) -> Site:
    """A virtual site: its table from the simulation's run folder (standing in for its disk)."""
    from simulations.virtual_sites import load_virtual_site

    name, cohort = load_virtual_site(run_dir, partition_id)
    return Site(name, cohort, shared_config(shared_text))


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


def site_for(context: Context, config: ConfigRecord) -> Site:
    """This node's site, from the node config, with the run's settings from the message.

    Deployment: ``site-config`` (the site's own site.yaml, set by safn-client). Simulation:
    ``partition-id`` (a virtual site written by safn-sim into the run folder).
    """
    import torch

    torch.set_num_threads(1)
    shared_text = str(config[Config.SAFN_CONFIG])
    node = context.node_config
    if NodeConfig.SITE_CONFIG in node:
        site = _deployed_site(str(node[NodeConfig.SITE_CONFIG]), shared_text)
    else:
        run_dir = run_dir_from(dict(context.run_config))
        site = _sim_site(run_dir, int(node[NodeConfig.PARTITION_ID]), shared_text)
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
    """Where a site keeps its harmonised training split: a virtual site in the simulation's run
    folder (its disk), ``harmonised/<site>.csv``; a deployed site in its state folder,
    ``harmonised/<run id>.csv``."""
    if site.cfg.site is not None:
        return Path(site.cfg.site.state_dir) / "harmonised" / f"{run_id or 'run'}.csv"
    return run_dir_from(dict(context.run_config)) / "harmonised" / f"{site.name}.csv"


def data_source(site: Site, context: Context) -> str:
    """The kind of data this site trains on (``data.source``: synthetic, ppmi or table), as its
    own configuration says: a deployed site's site.yaml; for a virtual site the simulation's
    config.yaml, whose cohort it is a part of (its settings from the messages carry no ``data``
    section beyond ``min_cell``, so ``site.cfg.data.source`` would be a default there)."""
    if NodeConfig.SITE_CONFIG in context.node_config:
        return str(site.cfg.data.source)
    from safn_core.federation.run_folder import load_run_config

    return str(load_run_config(run_dir_from(dict(context.run_config)).resolve()).data.source)


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
    settings), not by site: an actor serving hundreds of virtual sites builds it once."""
    key = (tuple((m.name, len(m.features), m.side) for m in site.cohort.modalities),
           site.cfg.model.model_dump_json(), fingerprint)
    if key not in _LAYOUTS:
        if len(_LAYOUTS) > 8:
            _LAYOUTS.clear()
        found = Layout.of(state_to_numpy(make_model(site.cohort.modalities, site.cfg.model, 0)))
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
    """Where the site keeps its own state (privacy ledger): a deployed site's
    ``site.state_dir``; a virtual site's folder outside the run folder
    (`simulations.virtual_sites`)."""
    if site.cfg.site is not None:
        return Path(site.cfg.site.state_dir)
    from simulations.virtual_sites import virtual_site_state_dir

    return virtual_site_state_dir(run_dir_from(dict(context.run_config)), site.name)
