"""The simulation engine: the ServerApp/ClientApp pair on Flower's Simulation Engine (Ray).

How Flower is launched, and why: `flwr.simulation.run_simulation` with the app objects, in this
process. `flwr run` would start a detached SuperLink that outlives the run, build and ship an app
bundle and poll every few seconds (7-10 s fixed cost per run on this machine); `run_simulation`
runs the ServerApp in a thread next to an in-memory Grid and the ClientApps in Ray actors, with
nothing left running afterwards. Its run config is empty, so the apps find the run folder (and its
resolved ``config.yaml``) through the ``SAFN_RUN_DIR`` environment variable, which Ray's workers
inherit; a deployment passes ``run-dir`` in the run config instead. The app code is the same.
With ``simulation.fast_polling`` the ServerApp's Grid polls every 10 ms instead of Flower's 0.1 s
(a Grid wrapper, `safn_flower.patches.simulation`); ``simulation.many_sites_dispatcher`` patches
Flower's dispatcher for hundreds of sites.

On an existing Ray cluster (``simulation.ray_address``) the workers inherit nothing from this
process and share no disk with it: `safn.simulations.ray_cluster` joins the cluster with the run's
runtime environment, and the virtual sites' files reach the ClientApps through Ray
(`safn.simulations.site_disks`).
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from pathlib import Path

from safn_core.config import SafnConfig
from safn_core.federation.run_folder import RUN_DIR_ENV
from safn_flower.patches import simulation as sim_patches


def quiet_flower() -> None:
    """Flower and Ray log every message at INFO; the user wants one line per round."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    os.environ.setdefault("RAY_DISABLE_USAGE_STATS", "1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    for name in ("flwr", "ray", "filelock"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # Flower's own DeprecationWarnings stay visible: they may be about the internals patched in
    # `safn_flower.patches`. Only a known, harmless NumPy notice from Ray is hidden.
    warnings.filterwarnings("ignore", message=".*NumPy array is not writable.*")


def backend_config(cfg: SafnConfig) -> dict:
    """Ray backend: one CPU per ClientApp actor, a small object store, no dashboard (the
    ``init_args`` apply to a Ray started here; a cluster has its own)."""
    s = cfg.simulation
    init_args = {"logging_level": "ERROR", "log_to_driver": False, "include_dashboard": False,
                 "object_store_memory": int(s.ray_object_store_mb) * 1024 * 1024}
    if s.ray_num_cpus:
        init_args["num_cpus"] = int(s.ray_num_cpus)
    return {"client_resources": {"num_cpus": s.num_cpus_per_site, "num_gpus": 0.0},
            "init_args": init_args}


def run_flower_simulation(run_dir: Path, cfg: SafnConfig, n_sites: int) -> float:
    """Run the ServerApp/ClientApp pair on the Ray backend; returns wall seconds."""
    quiet_flower()
    os.environ[RUN_DIR_ENV] = str(Path(run_dir).resolve())
    from flwr.simulation import run_simulation

    from safn.simulations.client_app import app as client_app
    from safn.server.app import simulation_app as server_app

    quiet_flower()  # again: importing Flower resets its logger to INFO
    t0 = time.perf_counter()
    backend = backend_config(cfg)
    cluster = None
    saved_path = os.environ.get("PYTHONPATH")  # start_ray widens it for Ray's workers
    with sim_patches.prepare(server_app, fast_polling=cfg.simulation.fast_polling,
                             many_sites_dispatcher=cfg.simulation.many_sites_dispatcher,
                             ray_cluster=bool(cfg.simulation.ray_address)) as app:
        try:
            if cfg.simulation.ray_address:  # an existing cluster: `safn.simulations.ray_cluster`
                from safn_core.cli.common import console
                from safn.simulations.ray_cluster import ClusterRun

                cluster = ClusterRun(cfg.simulation.ray_address, run_dir,
                                     cfg.simulation.num_cpus_per_site)
                cluster.connect()
                console.print(cluster.describe())
            else:
                start_ray(backend["init_args"])
            run_simulation(server_app=app, client_app=client_app, num_supernodes=n_sites,
                           backend_config=backend, verbose_logging=False)
        finally:
            try:
                if cluster is not None and cluster.disks is not None:
                    cluster.finish()
            except Exception as exc:  # never hide the run's own outcome behind the clean-up's
                print(f"safn-sim: the cluster's record ({cluster.run_dir / 'ray_cluster.json'}) "
                      f"was not written or its nodes' mirrors not removed: {exc}",
                      file=sys.stderr)
            finally:
                _stop_ray()
                # the caller's environment as it was: a later subprocess of this process
                # (a test's, an embedding program's) must not inherit the checkout's path
                if saved_path is None:
                    os.environ.pop("PYTHONPATH", None)
                else:
                    os.environ["PYTHONPATH"] = saved_path
    return time.perf_counter() - t0


def start_ray(init_args: dict) -> None:
    """Start Ray as Flower would, but pass the import path by environment, not runtime_env.

    Why: Flower's backend calls ``ray.init(runtime_env={"env_vars": {"PYTHONPATH": ...}})``,
    and a runtime_env costs ~1 s more at start-up and ~0.5 s more per actor on this machine;
    Ray's workers inherit the driver's environment anyway. Flower skips its own ``ray.init``
    when Ray is already running, and shuts it down at the end as usual.
    """
    import ray

    if ray.is_initialized():
        return
    paths = [p for p in (*sys.path, os.environ.get("PYTHONPATH", "")) if p]
    os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    ray.init(**init_args)


def _stop_ray() -> None:
    """Flower shuts Ray down at the end; make sure, even after an error."""
    try:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    except ImportError:  # pragma: no cover
        pass
