"""Virtual sites' disks on a Ray cluster: the driver's run folder, served to ClientApps elsewhere.

On one machine a virtual site's ClientApp reads its table from the run folder and keeps its own
state (privacy ledger, secure-aggregation secret and cache, personal models, run end) in its
state folder, both on the driver's disk, found through ``SAFN_RUN_DIR``. A ClientApp on another
node of a Ray cluster has neither: Ray starts workers with the cluster's environment, not the
driver's, and nodes share no disk. So, on a cluster (`safn.simulations.ray_cluster`):

- the driver puts each virtual site's cohort files into Ray's object store and starts one
  `SiteDisks` actor on its own node; the actor's name reaches every worker in the job's runtime
  environment (``SAFN_SITE_DISKS``);
- `site_disk_mod` (a ClientApp mod; it does nothing without ``SAFN_SITE_DISKS``) keeps a mirror
  of the run on the worker's node: the run's config and site index once, a site's cohort when the
  node first serves that site, and before every message the site's state folder exactly as the
  driver has it. After the message, the files the ClientApp changed there (and its harmonised
  training split) go back to the actor, which writes them atomically on the driver's disk.

The driver's disk stays the only record: a site's ledger and secure-aggregation state are the
same whichever node runs its next message (Flower gives a site one message at a time), and the
run's results are written by the ServerApp, on the driver, as on one machine. The mirrors are
removed from every node at the end (`remove_mirrors`).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path, PurePosixPath

import yaml

from safn_core.io import write_atomic

DISKS_ENV = "SAFN_SITE_DISKS"
"""Names the run's `SiteDisks` actor; set in the job's runtime environment, never by hand."""
STATE = "sim-site-state"
"""The virtual sites' state folders in a mirror (one subfolder per site)."""
MIRROR_ROOT = "safn-mirrors"


def _files(folder: Path):
    """The files under ``folder`` a mirror keeps, by POSIX path relative to it (temporary
    files of an atomic write in progress skipped)."""
    folder = Path(folder)
    if folder.is_dir():
        for p in sorted(folder.rglob("*")):
            if p.is_file() and not p.name.endswith(".tmp"):
                yield p.relative_to(folder).as_posix(), p


def files_of(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder``, by POSIX path relative to it."""
    return {name: p.read_bytes() for name, p in _files(folder)}


def digests(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (what `files_of` would send)."""
    return {name: hashlib.sha256(p.read_bytes()).hexdigest() for name, p in _files(folder)}


def inside(folder: Path, relative: str) -> Path:
    """``folder / relative``, refusing a path that is absolute or climbs out of ``folder``."""
    rel = PurePosixPath(relative)
    if rel.is_absolute() or ".." in rel.parts or not rel.parts:
        raise ValueError(f"{relative!r}: not a path inside a site's folder")
    return Path(folder).joinpath(*rel.parts)


class SiteDisks:
    """The driver's side: serves the run's files and keeps each virtual site's state folder.

    A Ray actor pinned to the driver's node (`safn.simulations.ray_cluster.start_site_disks`). The
    cohorts are object references the driver put into the object store; ClientApps fetch them
    from there, node to node, not through this actor.
    """

    def __init__(self, run_dir: str, state_root: str, run_files: dict[str, bytes],
                 cohorts: dict[str, list], version: str):
        self.run_dir, self.state_root = Path(run_dir), Path(state_root)
        self.run_files, self.cohorts, self.version = run_files, cohorts, version
        self.messages: Counter = Counter()  # (site, node id) -> messages served

    def run(self) -> tuple[dict[str, bytes], str]:
        """The run's own files (``config.yaml``, ``sim/sites.json``) and the driver's safn."""
        return self.run_files, self.version

    def cohort(self, site: str) -> list:
        """``[ref]``: the site's cohort files in the object store (a list, so that Ray hands
        the reference over instead of resolving it here)."""
        if site not in self.cohorts:
            raise KeyError(f"no virtual site {site!r} in this run")
        return self.cohorts[site]

    def state_digests(self, site: str, node: str) -> dict[str, str]:
        """The site's state folder as the driver has it, before a message on ``node``."""
        self.messages[(site, node)] += 1
        return digests(self.state_root / site)

    def state_files(self, site: str, names: list[str]) -> dict[str, bytes]:
        return {n: inside(self.state_root / site, n).read_bytes() for n in names}

    def write_back(self, site: str, changed: dict[str, bytes], removed: list[str],
                   harmonised: bytes | None) -> None:
        """What a message changed in the site's state folder, written atomically on the
        driver's disk; the site's harmonised training split into the run folder."""
        folder = self.state_root / site
        for name, data in changed.items():
            write_atomic(inside(folder, name), data)
        for name in removed:
            inside(folder, name).unlink(missing_ok=True)
        split = inside(self.run_dir / "harmonised", f"{site}.csv")
        if harmonised is not None and not split.is_file():  # written once, as on one machine
            write_atomic(split, harmonised)

    def placement(self) -> dict[str, dict[str, int]]:
        """Messages served per site per node: where the ClientApps ran."""
        out: dict[str, dict[str, int]] = {}
        for (site, node), n in sorted(self.messages.items()):
            out.setdefault(site, {})[node] = n
        return out


def mirror_dir(disks_name: str, node_id: str) -> Path:
    """This node's mirror of the run, in the node's temporary folder; one per node, so that two
    Ray nodes on one machine keep theirs apart."""
    return Path(tempfile.gettempdir()) / MIRROR_ROOT / disks_name / node_id[:16]


class SiteMirror:
    """The worker's side: one run's mirror on this node, kept in step with `SiteDisks`."""

    def __init__(self, disks_name: str):
        import ray

        self.disks = ray.get_actor(disks_name)
        self.node = ray.get_runtime_context().get_node_id()
        self.root = mirror_dir(disks_name, self.node)
        files, version = ray.get(self.disks.run.remote())
        check_version(version)
        sites = files.pop("sim/sites.json")
        config = yaml.safe_load(files.pop("config.yaml"))
        config.setdefault("simulation", {})["site_state_dir"] = str(self.root / STATE)
        write_atomic(self.root / "config.yaml", yaml.safe_dump(config, sort_keys=False))
        write_atomic(self.root / "sim" / "sites.json", sites)
        self.names = {int(k): v for k, v in yaml.safe_load(sites)["sites"].items()}
        self.cohorts: set[str] = set()
        self.harmonised_sent: set[str] = set()

    def site(self, partition_id: int) -> str:
        if partition_id not in self.names:
            raise KeyError(f"partition-id {partition_id}: not one of this run's virtual sites")
        return self.names[partition_id]

    def pull(self, site: str) -> dict[str, str]:
        """The site's cohort (first time on this node) and its state folder as the driver has
        it; returns the state's digests, to find what the message changes."""
        import ray

        if site not in self.cohorts:
            ref = ray.get(self.disks.cohort.remote(site))[0]
            for name, data in ray.get(ref).items():
                write_atomic(inside(self.root / "sim" / site, name), data)
            self.cohorts.add(site)
        folder = self.root / STATE / site
        theirs = ray.get(self.disks.state_digests.remote(site, self.node))
        ours = digests(folder)
        for name in set(ours) - set(theirs):
            inside(folder, name).unlink()
        stale = [n for n, d in theirs.items() if ours.get(n) != d]
        if stale:
            for name, data in ray.get(self.disks.state_files.remote(site, stale)).items():
                write_atomic(inside(folder, name), data)
        return theirs

    def push(self, site: str, before: dict[str, str]) -> None:
        """Send back what the message changed in the site's state folder, and the site's
        harmonised training split when it wrote one."""
        import ray

        folder = self.root / STATE / site
        after = digests(folder)
        changed = {n: inside(folder, n).read_bytes() for n, d in after.items()
                   if before.get(n) != d}
        removed = sorted(set(before) - set(after))
        split = self.root / "harmonised" / f"{site}.csv"
        harmonised = None
        if split.is_file() and site not in self.harmonised_sent:
            harmonised = split.read_bytes()
            self.harmonised_sent.add(site)
        if changed or removed or harmonised is not None:
            ray.get(self.disks.write_back.remote(site, changed, removed, harmonised))


def safn_version() -> str:
    from importlib.metadata import version

    return version("safn")


def check_version(driver: str) -> None:
    """A node with another safn would answer with other code: refused, naming both."""
    ours = safn_version()
    if driver != ours:
        raise RuntimeError(f"this Ray node runs safn {ours}, the driver (safn-sim) {driver}: "
                           "install the same safn on every node of the cluster")


_MIRROR: SiteMirror | None = None


def site_disk_mod(msg, context, call_next):
    """The simulation's ClientApp mod (`safn.simulations.client_app`): on a Ray cluster, the virtual
    site's files from the driver before the message and its changed state back after it. Does
    nothing on one machine, where the run folder is on this disk."""
    from safn_core.federation.protocol import NodeConfig

    name = os.environ.get(DISKS_ENV)
    if not name:
        return call_next(msg, context)
    global _MIRROR
    if _MIRROR is None:
        from safn_core.federation.run_folder import RUN_DIR_ENV

        _MIRROR = SiteMirror(name)
        # the apps find the run folder through SAFN_RUN_DIR: here, this node's mirror
        os.environ[RUN_DIR_ENV] = str(_MIRROR.root)
    site = _MIRROR.site(int(context.node_config[NodeConfig.PARTITION_ID]))
    before = _MIRROR.pull(site)
    try:
        return call_next(msg, context)
    finally:  # also after a failure: a ledger entry the site wrote must not be lost
        _MIRROR.push(site, before)


def remove_mirror(disks_name: str) -> bool:
    """Remove this node's mirrors of the run (a Ray task on each node, at the run's end)."""
    import ray

    folder = mirror_dir(disks_name, ray.get_runtime_context().get_node_id())
    shutil.rmtree(folder, ignore_errors=True)
    parent = folder.parent
    if parent.is_dir() and not any(parent.iterdir()):
        parent.rmdir()
    return not folder.exists()
