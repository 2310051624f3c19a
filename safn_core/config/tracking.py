"""Experiment tracking with MLflow (optional: ``pip install -e '.[tracking]'``; docs/tracking.md)."""

from __future__ import annotations

from pydantic import Field

from safn_core.config.base import Section


class TrackingConfig(Section):
    """Where the coordinator's or the researcher's process logs a run (never a site's).

    Off by default; ``--tracking [URI]`` on safn-sim, safn-train and safn-server switches it on.
    ``uri`` None with tracking on: the embedded store next to the run folders.
    """

    enabled: bool = Field(False, description="log runs to MLflow (needs the tracking extra)")
    uri: str | None = Field(None, description="MLflow tracking URI (http://host:port, "
                                              "sqlite:///file.db, …); None = the embedded "
                                              "store next to the run folders")
    experiment: str = Field("safn", min_length=1, description="MLflow experiment name")
