"""Shared set-up of the federation benchmarks: a run folder with virtual sites, both engines."""

from __future__ import annotations

import json
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # safn's packages, tests/

from safn_core.config import SafnConfig, dump_config, load_config  # noqa: E402
from safn_core.data.sources import load_cohort  # noqa: E402
from safn.simulations.partition import partition  # noqa: E402
from safn_core.federation.run_folder import write_config  # noqa: E402
from safn.simulations.virtual_sites import load_virtual_site, write_virtual_sites  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def config(overrides: list[str]) -> SafnConfig:
    return load_config(ROOT / "configs" / "simulation.yaml", overrides)


def prepare(cfg: SafnConfig, cohort=None) -> tuple[Path, dict]:
    """A fresh run folder holding the config and the virtual sites; returns (folder, parts)."""
    cohort = cohort if cohort is not None else load_cohort(cfg.data, cfg.synth)
    s = cfg.simulation
    parts = partition(cohort, s.partition, s.n_sites, alpha=s.dirichlet_alpha,
                      size_alpha=s.size_skew, seed=s.seed)
    run_dir = Path(tempfile.mkdtemp(prefix="safn-bench-")).resolve()
    write_config(run_dir, dump_config(cfg))
    write_virtual_sites(run_dir, cohort, parts)
    return run_dir, parts


def sites_of(run_dir: Path, n: int) -> dict:
    return dict(load_virtual_site(run_dir, i) for i in range(n))


def flower(run_dir: Path, cfg: SafnConfig, n_sites: int) -> dict:
    """safn-sim's Flower run (same function); wall time and its breakdown."""
    from safn.simulations.engine import run_flower_simulation

    wall = run_flower_simulation(run_dir, cfg, n_sites)
    history = json.loads((run_dir / "history.json").read_text())
    timing = json.loads((run_dir / "timing.json").read_text())
    rounds = [e["seconds"] for e in history]
    return {"wall_s": wall, "rounds_s": sum(rounds), "per_round_s": sum(rounds) / len(rounds),
            "statistics_round_s": timing["statistics_round_s"],
            "startup_and_teardown_s": wall - sum(rounds) - timing["statistics_round_s"],
            "history": history}


def in_process(run_dir: Path, cfg: SafnConfig, n_sites: int) -> dict:
    """The plain loop over the same safn_core functions (sites loaded from the same files):
    the tests' reference loop, `tests/reference_loop.py`."""
    import torch

    from tests.reference_loop import run_in_process

    torch.set_num_threads(1)
    ckpt = Path(tempfile.mkdtemp(prefix="safn-bench-loop-"))
    t0 = time.perf_counter()
    # checkpoints every round as the ServerApp does: same work on both sides
    state = run_in_process(sites_of(run_dir, n_sites), cfg, ckpt, report=lambda line: None)
    wall = time.perf_counter() - t0
    import shutil

    shutil.rmtree(ckpt, ignore_errors=True)
    return {"wall_s": wall, "per_round_s": sum(e["seconds"] for e in state.history) / len(
        state.history), "state": state}


def peak_rss_mb(who=resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss / 1024


def tree_rss_mb(root: int) -> float:
    """Resident memory of a process and all its descendants (Ray's GCS, raylet, actors)."""
    import os

    from safn_core.processes import descendants

    total, page = 0, os.sysconf("SC_PAGE_SIZE")
    for pid in [root, *descendants(root)]:
        try:
            with open(f"/proc/{pid}/statm") as fh:
                total += int(fh.read().split()[1]) * page
        except OSError:
            pass
    return total / 2**20


class Sampler:
    """Calls ``sample()`` every ``interval`` seconds in a thread while the block runs."""

    def __init__(self, interval: float = 0.25):
        import threading

        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        raise NotImplementedError

    def _run(self):
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


class PeakMemory(Sampler):
    """Samples the process tree's resident memory in a thread; ``peak_mb`` after the block."""

    def __init__(self, interval: float = 0.25):
        import os

        super().__init__(interval)
        self.peak_mb, self.root = 0.0, os.getpid()

    def sample(self) -> None:
        self.peak_mb = max(self.peak_mb, tree_rss_mb(self.root))


def safn_sim(config: Path, out: Path, sets: list[str]) -> tuple[dict | None, float, str | None]:
    """One ``safn-sim --config config --out out --set …`` in a subprocess: (its results.json, or
    None, the wall seconds, and why it failed: the tail of its output, or None)."""
    import subprocess

    cmd = [str(Path(sys.executable).parent / "safn-sim"), "--config", str(config), "--out",
           str(out), *[x for s in sets for x in ("--set", s)]]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode or not (Path(out) / "results.json").is_file():
        tail = " ".join((proc.stderr.strip() or proc.stdout.strip()).split())[-600:]
        return None, seconds, tail or f"exit status {proc.returncode}"
    return json.loads((Path(out) / "results.json").read_text()), seconds, None
