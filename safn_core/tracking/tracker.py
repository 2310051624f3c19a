"""`Tracker`: one MLflow run (and its nested runs) for a safn command; a no-op when tracking is off.

Every call to MLflow goes through a `Guard` (one warning on the first failure, nothing more sent
after it, what was not logged noted); `finish` returns the note the command writes under
``tracking`` in ``results.json``. Logged through `MlflowClient` with explicit run ids (no global
active run): the round follower's thread and nested runs need no MLflow state.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from safn_core.tracking.guard import Guard
from safn_core.tracking.rounds import RoundFollower, round_metrics
from safn_core.tracking.store import require_mlflow, resolve

PARAMS_PER_BATCH = 100  # MLflow's limits per log_batch
METRICS_PER_BATCH = 1000


class Tracker:
    """``cfg``: the run's `TrackingConfig`; ``run_dir``: its run folder (the embedded store is
    next to it); ``warn``: how the one warning is shown (stderr by default)."""

    def __init__(self, cfg, run_dir: Path, warn=None):
        self.enabled = bool(cfg is not None and cfg.enabled)
        self.run_dir = Path(run_dir)
        self.experiment = cfg.experiment if cfg is not None else None
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.uri = self.guard = self.client = self._follower = None
        self._logged: dict[str | None, set[int]] = {}
        if self.enabled:
            require_mlflow()
            self.uri, self._artifact_location = resolve(cfg.uri, run_dir)
            self.guard = Guard(self.uri, warn)

    @staticmethod
    def check(cfg) -> None:
        """Before anything is written: MLflow is there when tracking is on (one clear error)."""
        if cfg is not None and cfg.enabled:
            require_mlflow()

    def _call(self, what: str, fn, *args, **kwargs):
        return self.guard.call(what, fn, *args, **kwargs) if self.enabled else None

    # the run -----------------------------------------------------------------------------
    def start(self, name: str, params: dict[str, str], tags: dict[str, str]) -> None:
        if not self.enabled:
            return
        self._call("the run", self._start, name, tags)
        self.log_params(params)

    def _start(self, name: str, tags: dict[str, str]) -> None:
        import logging

        from mlflow.tracking import MlflowClient

        for name in ("mlflow.store.db.utils", "alembic"):  # a new store's schema set-up lines
            logging.getLogger(name).setLevel(logging.WARNING)
        self.client = MlflowClient(tracking_uri=self.uri)
        exp = self.client.get_experiment_by_name(self.experiment)
        exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(
            self.experiment, artifact_location=self._artifact_location)
        self.experiment_id = exp_id
        self.run_id = self.client.create_run(exp_id, run_name=name, tags=tags).info.run_id

    def child(self, name: str, tags: dict[str, str] | None = None) -> str | None:
        """A nested run under this one (a fold, a held-out site); its id, or None."""
        return self._call(f"the nested run {name}", lambda: self.client.create_run(
            self.experiment_id, run_name=name,
            tags={"mlflow.parentRunId": self.run_id, **(tags or {})}).info.run_id)

    def end(self, run_id: str | None, status: str = "FINISHED") -> None:
        if run_id is not None:
            self._call("the end of a nested run", self.client.set_terminated, run_id, status)

    def finish(self, status: str = "FINISHED", tags: dict[str, str] | None = None) -> dict | None:
        """End the run; the note for ``results.json`` (None when tracking is off)."""
        if not self.enabled:
            return None
        self.stop_following()
        for key, value in (tags or {}).items():
            self._call(f"the tag {key}", self.client.set_tag, self.run_id, key, value)
        self._call("the run's end", self.client.set_terminated, self.run_id, status)
        return {"uri": self.uri, "experiment": self.experiment, "run_id": self.run_id,
                "not_logged": list(self.guard.not_logged), "error": self.guard.error}

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, kind, exc, tb) -> None:
        if exc is not None and self.enabled and self.run_id is not None:
            self.finish("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")

    # what is logged ----------------------------------------------------------------------
    def log_params(self, params: dict[str, str], run_id: str | None = None) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)) for k, v in params.items()]
        for i in range(0, len(items), PARAMS_PER_BATCH):
            self._call("parameters", lambda batch=items[i:i + PARAMS_PER_BATCH]:
                       self.client.log_batch(run_id or self.run_id, params=batch))

    def log_metrics(self, metrics: dict[str, float], step: int = 0, run_id: str | None = None,
                    what: str = "metrics") -> None:
        if not self.enabled or not metrics:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, int(step)) for k, v in metrics.items()]
        for i in range(0, len(items), METRICS_PER_BATCH):
            self._call(what, lambda batch=items[i:i + METRICS_PER_BATCH]:
                       self.client.log_batch(run_id or self.run_id, metrics=batch))

    def log_round(self, entry: dict, run_id: str | None = None) -> None:
        """One round's entry (`rounds.round_metrics`, step = the round); each round once."""
        r = int(entry.get("round", 0))
        done = self._logged.setdefault(run_id, set())
        if r in done:
            return
        done.add(r)
        self.log_metrics(round_metrics(entry), r, run_id, f"metrics of round {r}")

    def log_history(self, path: Path, run_id: str | None = None) -> None:
        """The rounds of a ``history.json`` not logged yet."""
        if self.enabled and Path(path).is_file():
            for entry in json.loads(Path(path).read_text()):
                self.log_round(entry, run_id)

    def follow_rounds(self) -> None:
        """Log each round as the coordinator books it (`rounds.RoundFollower`)."""
        if self.enabled and self._follower is None:
            self._follower = RoundFollower(self.run_dir, self.log_round).start()

    def stop_following(self) -> None:
        """Stop following; then any round of ``history.json`` the follower did not see."""
        if self._follower is not None:
            self._follower.stop()
            self._follower = None
            self.log_history(self.run_dir / "history.json")

    def log_model(self, bundle: str = "model") -> None:
        """The run folder's bundle ``bundle`` (where there is one) as an MLflow model
        (`safn_core.tracking.model`), under the artifact path ``mlflow_model``."""
        path = self.run_dir / bundle
        if self.enabled and path.is_dir():
            from safn_core.tracking.model import ARTIFACT_PATH, log_model

            self._call(f"the MLflow model {ARTIFACT_PATH}", log_model, self.client, self.run_id,
                       path)

    def log_artifacts(self, paths, run_id: str | None = None) -> None:
        """The files of ``paths`` that exist (relative to the run folder)."""
        for rel in paths:
            path = self.run_dir / rel
            if self.enabled and path.is_file():
                parent = str(Path(rel).parent) if Path(rel).parent != Path(".") else None
                self._call(f"the artifact {rel}", self.client.log_artifact,
                           run_id or self.run_id, str(path), parent)
