"""safn-sim on an existing Ray cluster (`safn.simulations.ray_cluster`, `safn.simulations.site_disks`).

The end-to-end test starts a real three-node Ray cluster on this machine (`ray start` for a head
without CPUs and two worker nodes of one CPU each: every ClientApp runs on a worker node, a
site's messages on either), runs safn-sim on it with secure aggregation, DP-SGD and federated
ComBat, and runs the same configuration on a local Ray: the cluster run must reach the same
model, the same per-round figures and the same privacy ledgers, which it can only do when each
site's state (ledger, secure-aggregation caches) followed it from node to node. The nodes
inherit nothing from safn-sim's environment and keep their mirrors in their own temporary
folder, which must be empty at the end.

The units below test the mirror protocol against a real local Ray, and the errors.
"""

from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path

import pytest
import torch

from safn_core.errors import ConfigError
from safn.simulations import ray_cluster as joining
from safn.simulations.site_disks import digests, files_of, inside
from tests.helpers import SMALL_MODEL
from tests.deploy_harness import BIN, free_port
from tests.ray_cluster_harness import ray_cluster

RUN = [*SMALL_MODEL, "federation.rounds=3", "simulation.compare=false",
       "federation.patience=null", "privacy.mode=dp-sgd", "privacy.epsilon=8",
       "harmonisation.method=combat"]


def safn_sim(cwd: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "safn-sim"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=1800)


def comparable(history: list[dict]) -> list[dict]:
    """A round's figures without its wall-clock seconds."""
    return [{k: v for k, v in e.items() if k not in ("seconds",)} for e in history]


def ledger_entries(state: Path, site: str) -> list[dict]:
    entries = []
    for path in sorted((state / site).rglob("*ledger*.json")):
        data = json.loads(path.read_text())
        for e in data.get("entries", []):
            entries.append({k: e.get(k) for k in ("seq", "kind", "round", "noise_multiplier",
                                                  "sample_rate", "steps", "steps_taken",
                                                  "status")})
    return entries


@pytest.mark.slow
def test_safn_sim_on_a_three_node_ray_cluster_equals_a_local_run(tmp_path):
    with ray_cluster(worker_cpus=(1, 1)) as cluster:
        env = cluster.env()
        env["TMPDIR"] = str(tmp_path)  # the driver's own temporary folder
        sets = [a for s in RUN for a in ("--set", s)]
        far = safn_sim(tmp_path, env, "--ray-address", cluster.address, "--out", "cluster",
                       *sets, "--set", f"simulation.site_state_dir={tmp_path / 'state_cluster'}")
        assert far.returncode == 0, far.stdout[-3000:] + far.stderr[-3000:]
        assert f"Ray cluster at {cluster.address}: 3 nodes, 2 CPUs; 2 ClientApp actors" \
            in far.stdout

        # a wrong resource request is refused before anything is prepared
        big = safn_sim(tmp_path, env, "--ray-address", cluster.address, "--out", "too_big",
                       *sets, "--set", "simulation.num_cpus_per_site=2")
        assert big.returncode != 0 and "Traceback" not in big.stderr
        assert "simulation.num_cpus_per_site = 2: no node of the Ray cluster" in big.stderr
        assert not (tmp_path / "too_big").exists()
        mirrors = list((cluster.temp / "tmp").rglob("cohort.parquet"))

    record = json.loads((tmp_path / "cluster" / "ray_cluster.json").read_text())
    workers = {n["node_id"] for n in record["nodes"] if n["cpus"] == 1}
    assert len(record["nodes"]) == 3 and len(workers) == 2
    assert set(record["messages_per_node"]) <= workers  # nothing ran on the head
    assert record["driver_node"] not in record["messages_per_node"]
    assert record["mirrors_removed"] and mirrors == []  # no copy of a site left on a node
    sites = json.loads((tmp_path / "cluster" / "sim" / "sites.json").read_text())["sites"]
    assert sorted(record["sites"]) == sorted(sites.values())

    env.pop("TMPDIR")  # a local Ray's sockets need a short temporary folder
    near = safn_sim(tmp_path, env, "--out", "local", *sets,
                    "--set", f"simulation.site_state_dir={tmp_path / 'state_local'}")
    assert near.returncode == 0, near.stdout[-3000:] + near.stderr[-3000:]
    assert not (tmp_path / "local" / "ray_cluster.json").exists()

    history = {k: json.loads((tmp_path / k / "history.json").read_text())
               for k in ("cluster", "local")}
    assert len(history["cluster"]) == 3
    assert comparable(history["cluster"]) == comparable(history["local"])
    weights = {k: torch.load(tmp_path / k / "model" / "weights.pt") for k in history}
    assert weights["cluster"].keys() == weights["local"].keys()
    for name, value in weights["cluster"].items():
        assert torch.equal(value, weights["local"][name]), name
    for site in sites.values():
        # each site's state came back to the driver: the same ledger, the same harmonised split
        far_ledger = ledger_entries(tmp_path / "state_cluster", site)
        assert far_ledger and far_ledger == ledger_entries(tmp_path / "state_local", site)
        assert (tmp_path / "cluster" / "harmonised" / f"{site}.csv").read_bytes() == \
            (tmp_path / "local" / "harmonised" / f"{site}.csv").read_bytes()


# -- the mirror protocol against a real local Ray --------------------------------------------

@pytest.fixture(scope="module")
def local_ray():
    import ray

    ray.init(num_cpus=1, include_dashboard=False, logging_level="ERROR", log_to_driver=False,
             object_store_memory=100 * 1024 * 1024)
    yield ray
    ray.shutdown()


def _run_folder(tmp_path: Path) -> Path:
    """A run folder as safn-sim writes it: config.yaml, two virtual sites, their index."""
    from safn_core.config import dump_config, load_config
    from safn_core.data.sources import load_cohort
    from safn_core.federation.run_folder import write_config
    from safn.simulations.compare import build_sites
    from safn.simulations.virtual_sites import write_virtual_sites

    run = tmp_path / "run"
    cfg = load_config(None, ["synth.n_pd=60", "synth.n_hc=30", "simulation.partition=iid",
                             "simulation.n_sites=2",
                             f"simulation.site_state_dir={tmp_path / 'state'}"])
    cohort = load_cohort(cfg.data, cfg.synth)
    run.mkdir()
    write_config(run, dump_config(cfg))
    write_virtual_sites(run, cohort, build_sites(cohort, cfg))
    return run


def _worker_round(disks_name: str, partition_id: int, write: dict, remove: list,
                  harmonised: str | None):
    """What `site_disk_mod` does around a message, in a Ray task (a worker process)."""
    from safn.simulations.site_disks import SiteMirror, STATE as state, inside as within
    from safn_core.data.cohort_store import read_cohort

    mirror = SiteMirror(disks_name)
    site = mirror.site(partition_id)
    before = mirror.pull(site)
    folder = mirror.root / state / site
    seen = {p.relative_to(folder).as_posix(): p.read_text()
            for p in folder.rglob("*") if p.is_file()}
    cohort = read_cohort(mirror.root / "sim" / site / "cohort.json")
    for name, text in write.items():
        within(folder, name).parent.mkdir(parents=True, exist_ok=True)
        within(folder, name).write_text(text)
    for name in remove:
        within(folder, name).unlink()
    if harmonised is not None:
        (mirror.root / "harmonised").mkdir(exist_ok=True)
        (mirror.root / "harmonised" / f"{site}.csv").write_text(harmonised)
    mirror.push(site, before)
    return site, seen, len(cohort), str(mirror.root)


def test_a_worker_reads_a_site_from_the_object_store_and_its_state_comes_back(
        local_ray, tmp_path):
    import shutil

    from safn_core.data.cohort_store import read_cohort
    from safn.simulations.ray_cluster import ClusterRun
    from safn.simulations.virtual_sites import virtual_site_names

    ray = local_ray
    run = _run_folder(tmp_path)
    names = virtual_site_names(run)
    n_first = len(read_cohort(run / "sim" / names[0] / "cohort.json"))
    state = tmp_path / "state" / names[0]
    (state / "ledger").mkdir(parents=True)
    (state / "ledger" / "privacy_ledger.json").write_text("driver v1")
    (state / "old.bin").write_text("to remove")

    cluster = ClusterRun("local-test", run, 1.0)
    cluster._start_disks()
    shutil.rmtree(run / "sim" / names[0])  # the driver's copy is not what the worker reads
    task = ray.remote(num_cpus=0)(_worker_round)
    site, seen, n, root = ray.get(task.remote(
        cluster.disks_name, 0, {"ledger/privacy_ledger.json": "worker v2", "secagg/x.npz": "x"},
        ["old.bin"], "a,b\n1,2\n"))
    assert site == names[0] and n == n_first
    assert seen == {"ledger/privacy_ledger.json": "driver v1", "old.bin": "to remove"}
    assert (state / "ledger" / "privacy_ledger.json").read_text() == "worker v2"
    assert (state / "secagg" / "x.npz").read_text() == "x" and not (state / "old.bin").exists()
    assert (run / "harmonised" / f"{site}.csv").read_text() == "a,b\n1,2\n"
    assert not any(p.name.endswith(".tmp") for p in state.rglob("*"))  # atomic writes

    # the driver's state wins at the next message: a stale file on the node is replaced
    (state / "ledger" / "privacy_ledger.json").write_text("driver v3")
    _, seen, _, _ = ray.get(task.remote(cluster.disks_name, 0, {}, [], "other"))
    assert seen["ledger/privacy_ledger.json"] == "driver v3"
    assert (run / "harmonised" / f"{site}.csv").read_text() == "a,b\n1,2\n"  # written once

    record = cluster.finish()
    assert record["sites"] == {names[0]: {ray.get_runtime_context().get_node_id(): 2}}
    assert record["mirrors_removed"] and not Path(root).exists()


def test_paths_from_a_worker_stay_inside_the_site_folder(tmp_path):
    for bad in ("../other/ledger.json", "/etc/passwd", "a/../../b", ""):
        with pytest.raises(ValueError, match="not a path inside"):
            inside(tmp_path, bad)
    assert inside(tmp_path, "secagg/train.npz") == tmp_path / "secagg" / "train.npz"
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "f.json").write_text("1")
    (tmp_path / "a" / ".f.json.x.tmp").write_text("half-written")
    assert files_of(tmp_path) == {"a/f.json": b"1"} and list(digests(tmp_path)) == ["a/f.json"]


def test_a_node_with_another_safn_is_refused(monkeypatch):
    from safn.simulations import site_disks

    monkeypatch.setattr(site_disks, "safn_version", lambda: "0.0.1")
    with pytest.raises(RuntimeError, match="this Ray node runs safn 0.0.1, the driver"):
        site_disks.check_version("0.1.0")


# -- errors -------------------------------------------------------------------------------------

def test_addresses_that_cannot_be_a_cluster_are_refused_quickly():
    with pytest.raises(ConfigError, match="Ray Client addresses are not supported"):
        joining.check_address("ray://head:10001")
    for bad in ("head", "head:port", ":6379"):
        with pytest.raises(ConfigError, match="expected 'auto'"):
            joining.check_address(bad)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ConfigError, match=f"nothing answers there.*--port={port}"):
        joining.check_address(f"127.0.0.1:{port}")


def test_safn_sim_with_an_unreachable_cluster_says_so_and_writes_nothing(tmp_path):
    port = free_port()
    done = safn_sim(tmp_path, {"PATH": f"{BIN}:/usr/bin:/bin", "HOME": str(tmp_path)},
                    "--ray-address", f"127.0.0.1:{port}", "--out", "run")
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert f"simulation.ray_address = '127.0.0.1:{port}': nothing answers there" in done.stderr
    assert not (tmp_path / "run").exists()


def test_the_cluster_decides_its_cpus():
    from safn_core.config import load_config

    with pytest.raises(Exception, match="ray_num_cpus = 2 with ray_address 'auto'"):
        load_config(None, ["simulation.ray_address=auto", "simulation.ray_num_cpus=2"])


def test_pool_size_counts_node_by_node():
    nodes = [{"Alive": True, "Resources": {"CPU": 3.0}}, {"Alive": True, "Resources": {}},
             {"Alive": False, "Resources": {"CPU": 8.0}}, {"Alive": True,
                                                           "Resources": {"CPU": 1.0}}]
    assert joining.pool_size(nodes, 1.0) == 4
    assert joining.pool_size(nodes, 2.0) == 1  # 3 CPUs hold one 2-CPU actor, not 1.5
    with pytest.raises(ConfigError, match="num_cpus_per_site = 4: no node .* CPUs: 3, 0, 1"):
        joining.client_actors(nodes, 4.0, "x:1")


def test_the_ray_backend_patch_ends_the_actors_and_leaves_ray_running(monkeypatch):
    import ray
    from flwr.server.superlink.fleet.vce.backend.raybackend import RayBackend

    from safn_flower.patches import core, simulation

    assert core.check([simulation.RAY_LEFT_RUNNING]) == []
    stock = RayBackend.terminate
    ended, shut = [], []
    monkeypatch.setattr(ray, "shutdown", lambda: shut.append(True))

    class Pool:
        def terminate_all_actors(self):
            ended.append(True)

    backend = RayBackend.__new__(RayBackend)
    backend.pool = Pool()
    core.apply([(simulation.RAY_LEFT_RUNNING, {})], announce=False)
    try:
        RayBackend.terminate(backend)
        assert ended == [True] and shut == []
    finally:
        core.restore(["sim_ray_left_running"])
    assert RayBackend.terminate is stock
    RayBackend.terminate(backend)  # stock Flower shuts Ray down
    assert shut == [True]
