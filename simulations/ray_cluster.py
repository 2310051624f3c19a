"""safn-sim on an existing Ray cluster (``simulation.ray_address``, or ``--ray-address``).

What runs and travels where (docs/ray-cluster.md):

- the driver, safn-sim on a node of the cluster, runs the ServerApp and Flower's simulation
  engine and writes the run folder, exactly as on one machine;
- ClientApps run in Ray actors on any node with CPUs: Flower sizes its actor pool node by node
  from each node's CPUs and ``simulation.num_cpus_per_site``;
- the job's runtime environment carries one variable, the name of the run's `SiteDisks` actor
  (on the driver's node); the virtual sites' cohorts travel through Ray's object store and their
  state folders through that actor (`safn.simulations.site_disks`); no shared disk, no inherited
  environment;
- at the end, ``ray_cluster.json`` in the run folder records the cluster's nodes and how many
  messages each virtual site's ClientApp handled on which node, and every node's mirror of the
  run is removed.
"""

from __future__ import annotations

import socket
import uuid
from pathlib import Path

from safn_core.errors import ConfigError
from safn_core.io import write_json

KEY = "simulation.ray_address"
CONNECT_TIMEOUT_S = 5.0
RECORD = "ray_cluster.json"


def check_address(address: str) -> None:
    """'auto' or host:port, answering: refused early with what to do (Ray itself would retry
    an unreachable address for minutes)."""
    if address.startswith("ray://"):
        raise ConfigError(f"{KEY} = {address!r}: Ray Client addresses are not supported (the "
                          "simulation engine needs the driver on a node of the cluster). Run "
                          "safn-sim on the head node with ray_address 'auto', or submit it as "
                          "a job: ray job submit --address http://<head>:8265 -- safn-sim ...")
    if address == "auto":
        return
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ConfigError(f"{KEY} = {address!r}: expected 'auto' (the cluster this machine "
                          "belongs to) or the head's host:port, e.g. 10.0.0.5:6379")
    try:
        socket.create_connection((host.strip("[]"), int(port)), CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise ConfigError(f"{KEY} = {address!r}: nothing answers there ({exc.strerror or exc}). "
                          f"Start the cluster's head with `ray start --head --port={port}`, or "
                          "set the address `ray start` printed") from None


def join(address: str, **init_args) -> None:
    """``ray.init`` on the cluster at ``address``, or one clear error."""
    import ray

    check_address(address)
    try:
        ray.init(address=address, logging_level="ERROR", log_to_driver=False, **init_args)
    except Exception as exc:  # Ray's ConnectionError, or a driver off the cluster
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"{KEY} = {address!r}: cannot join the Ray cluster ({first}). "
                          "safn-sim must run on a node of the cluster (the head, or one "
                          "started with `ray start --address=...`)") from None


def preflight(address: str, cpus_per_site: float) -> None:
    """Join and leave the cluster once, before safn-sim prepares anything: a wrong address, or
    a cluster without a node that can hold a ClientApp, is then an error in seconds, not after
    the cohort and the sites are written."""
    import ray

    try:
        join(address)
        client_actors(ray.nodes(), cpus_per_site, address)
    finally:
        if ray.is_initialized():
            ray.shutdown()


def client_actors(nodes: list[dict], cpus_per_site: float, address: str) -> int:
    """How many ClientApp actors the cluster holds; none is an error naming the key to change."""
    alive = [n for n in nodes if n.get("Alive")]
    actors = pool_size(alive, cpus_per_site)
    if actors == 0:
        cpus = ", ".join(f"{n.get('Resources', {}).get('CPU', 0):g}" for n in alive)
        raise ConfigError(f"simulation.num_cpus_per_site = {cpus_per_site:g}: no node of the Ray "
                          f"cluster at {address} has that many CPUs (nodes' CPUs: {cpus}); "
                          "lower it, or add a node with more CPUs")
    return actors


def pool_size(nodes: list[dict], cpus_per_site: float) -> int:
    """ClientApp actors the cluster holds, node by node, as Flower's pool counts them."""
    return sum(int(n.get("Resources", {}).get("CPU", 0) // cpus_per_site)
               for n in nodes if n.get("Alive") and n.get("Resources"))


class ClusterRun:
    """One federation's connection to the cluster: its runtime environment, its `SiteDisks`,
    and at the end its record and clean-up."""

    def __init__(self, address: str, run_dir: Path, cpus_per_site: float):
        self.address, self.run_dir = address, Path(run_dir).resolve()
        self.cpus_per_site = cpus_per_site
        self.disks_name = f"safn-site-disks-{uuid.uuid4().hex[:12]}"
        self.nodes: list[dict] = []
        self.actors = 0
        self.disks = None  # the run's SiteDisks actor, once started
        self.driver_node: str | None = None

    def connect(self) -> None:
        """Join the cluster with this run's runtime environment; check its resources; start the
        sites' disks on this node."""
        import ray

        from safn.simulations.site_disks import DISKS_ENV

        join(self.address, namespace=self.disks_name,
             runtime_env={"env_vars": {DISKS_ENV: self.disks_name}})
        self.nodes = [n for n in ray.nodes() if n.get("Alive")]
        self.actors = client_actors(self.nodes, self.cpus_per_site, self.address)
        self._start_disks()

    def _start_disks(self) -> None:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from safn.simulations.site_disks import SiteDisks, files_of, safn_version
        from safn.simulations.virtual_sites import virtual_site_names, virtual_sites_state_root

        here = ray.get_runtime_context().get_node_id()
        run_files = {name: (self.run_dir / name).read_bytes()
                     for name in ("config.yaml", "sim/sites.json")}
        cohorts = {site: [ray.put(files_of(self.run_dir / "sim" / site))]
                   for site in virtual_site_names(self.run_dir)}
        self.disks = ray.remote(SiteDisks).options(
            name=self.disks_name, num_cpus=0,
            scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False),
        ).remote(str(self.run_dir), str(virtual_sites_state_root(self.run_dir)), run_files,
                 cohorts, safn_version())
        ray.get(self.disks.run.remote())  # up, and able to import safn on this node
        self.driver_node = here

    def describe(self) -> str:
        cpus = sum(n["Resources"].get("CPU", 0) for n in self.nodes)
        return (f"Ray cluster at {self.address}: {len(self.nodes)} nodes, {cpus:g} CPUs; "
                f"{self.actors} ClientApp actors of {self.cpus_per_site:g} CPU")

    def finish(self) -> dict:
        """Write ``ray_cluster.json`` (nodes, where each site's ClientApp ran) and remove every
        node's mirror of the run. Called while Ray is still up."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from safn.simulations.site_disks import remove_mirror

        placement = ray.get(self.disks.placement.remote())
        per_node: dict[str, int] = {}
        for counts in placement.values():
            for node, n in counts.items():
                per_node[node] = per_node.get(node, 0) + n
        task = ray.remote(num_cpus=0)(remove_mirror)
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        removed = ray.get([task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
            n["NodeID"], soft=False)).remote(self.disks_name) for n in nodes], timeout=120)
        record = {
            "address": self.address,
            "driver_node": self.driver_node,
            "nodes": [{"node_id": n["NodeID"], "address": n.get("NodeManagerAddress"),
                       "cpus": n["Resources"].get("CPU", 0)} for n in self.nodes],
            "client_actors": self.actors, "num_cpus_per_site": self.cpus_per_site,
            "messages_per_node": per_node, "sites": placement,
            "mirrors_removed": all(removed),
        }
        write_json(self.run_dir / RECORD, record)
        return record
