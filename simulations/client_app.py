"""The simulation's ClientApp: the deployed site's handlers (`safn.client.app`) over virtual sites.

Only the site lookup differs from a deployment (`safn.client.site_context.SiteSource`): Flower's
``partition-id`` names a virtual site, whose table safn-sim wrote into the run folder and whose
own state lives in its folder outside it (`safn.simulations.virtual_sites`); the run folder is found
through ``SAFN_RUN_DIR`` (`safn_core.federation.run_folder`). On a Ray cluster,
`safn.simulations.site_disks.site_disk_mod` first brings the virtual site's files to the worker's node
and takes its changed state back.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

from flwr.app import Context
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod

from safn.client.app import make_client_app
from safn_core.federation.protocol import NodeConfig
from safn_core.federation.run_folder import load_run_config, run_dir_from
from safn_core.federation.shared_config import shared_config
from safn_core.federation.site import Site
from safn.simulations.site_disks import site_disk_mod
from safn.simulations.virtual_sites import load_virtual_site, virtual_site_state_dir


@lru_cache(maxsize=256)
def _virtual_site(run_dir: Path, partition_id: int, shared_text: str) -> Site:
    """A virtual site: its table from the simulation's run folder (standing in for its disk)."""
    name, cohort = load_virtual_site(run_dir, partition_id)
    return Site(name, cohort, shared_config(shared_text))


def _run_dir(context: Context) -> Path:
    return run_dir_from(dict(context.run_config))


class VirtualSites:
    """A simulation's virtual sites (a `safn.client.site_context.SiteSource`), by ``partition-id``."""

    def site(self, context: Context, shared_text: str) -> Site:
        partition_id = int(context.node_config[NodeConfig.PARTITION_ID])
        return _virtual_site(_run_dir(context), partition_id, shared_text)

    def state_dir(self, site: Site, context: Context) -> Path:
        """The virtual site's folder outside the run folder (`virtual_site_state_dir`)."""
        return virtual_site_state_dir(_run_dir(context), site.name)

    def harmonised_file(self, site: Site, run_id: str, context: Context) -> Path:
        """``<run folder>/harmonised/<site>.csv`` (the run folder is its disk)."""
        return _run_dir(context) / "harmonised" / f"{site.name}.csv"

    def data_source(self, site: Site, context: Context) -> str:
        """The simulation's own ``data.source`` (config.yaml), whose cohort the virtual site is
        a part of: its settings from the messages carry no ``data`` section beyond
        ``min_cell``, so ``site.cfg.data.source`` would be a default here."""
        return str(load_run_config(_run_dir(context).resolve()).data.source)


def simulation_client_app(mods: Sequence[Mod] = ()) -> ClientApp:
    """The simulation's ClientApp; ``mods`` (e.g. a benchmark's instruments) run inside
    `site_disk_mod`, around the handlers."""
    return make_client_app(VirtualSites(), mods=[site_disk_mod, *mods])


# what `safn.simulations.engine` runs
app = simulation_client_app()
