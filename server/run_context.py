"""What every phase of a coordinator's run works with: one frozen `RunContext`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from safn_core.config import SafnConfig
from safn_core.federation.events import EventLog
from safn_core.federation.run_folder import run_identity
from safn_core.federation.shared_config import shared_config_text


@dataclass(frozen=True)
class RunContext:
    """The Grid, the run's configuration and folder, where its events go, and whether it is
    deployed (a simulation seeds central DP's noise from the run's seed; a deployment never
    does: the seed is public, and noise anyone can regenerate could be subtracted)."""

    grid: object
    cfg: SafnConfig
    run_dir: Path
    events: EventLog
    deployed: bool
    shared_text: str  # the shared settings every message tells the sites
    run_id: str  # stable across a resume (unlike Flower's run id)

    @classmethod
    def of(cls, grid, cfg: SafnConfig, run_dir: Path, events: EventLog,
           deployed: bool) -> RunContext:
        run_dir = Path(run_dir)
        return cls(grid, cfg, run_dir, events, deployed, shared_config_text(cfg),
                   run_identity(run_dir))
