"""Experiment tracking with MLflow (#30; docs/tracking.md): safn-sim against a real ``mlflow
server`` process (parameters, per-round metrics equal to history.json, artifacts, nothing
per site), safn-train's folds as nested runs in the embedded SQLite store, a tracking server
that is down or killed mid-run (the run completes, one warning, results.json says what was not
logged), MLflow missing (one clear error), and the live round follower."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

from safn_core.cli.common import run_main
from safn_core.config import load_config
from safn_core.federation.events import EVENTS_FILE, Event, EventLog
from safn_core.processes import wait_until
from safn_core.tracking.guard import Guard
from safn_core.tracking.rounds import RoundFollower, round_metrics
from tests.helpers import SMALL_MODEL, write_toy

pytest.importorskip("mlflow")
from mlflow.tracking import MlflowClient  # noqa: E402

pytestmark = pytest.mark.timeout(300)
BIN = Path(sys.executable).parent
TRAIN = ["train.folds=2", "train.repeats=1", "train.max_epochs=4", "train.patience=2",
         "train.workers=1", "model.ensemble_size=2", "model.d_model=16", "model.n_heads=2",
         "model.encoder_hidden=16", "model.ffn_hidden=16", "model.head_hidden=8",
         "train.baselines=[majority]", "train.feature_sets=[all]", "train.modality_drop=false"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=1) as r:
            return r.status == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    csv, mapping = write_toy(tmp_path_factory.mktemp("cohort"), n=240)
    return ["data.source=table", f"data.path={csv}", f"data.mapping={mapping}"]


@contextmanager
def serve_mlflow(folder: Path):
    """A real tracking server on a free local port: (its URL, its process), its process group
    ended on leaving (also when a test has killed it already)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with open(folder / "server.log", "w") as log:
        proc = subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
             "--workers", "1", "--backend-store-uri", f"sqlite:///{folder / 'server.db'}",
             "--artifacts-destination", str(folder / "artifacts")],
            cwd=folder, stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
    try:
        assert wait_until(lambda: healthy(url) or proc.poll() is not None, 90), "no server"
        assert proc.poll() is None, (folder / "server.log").read_text()[-2000:]
        yield url, proc
    finally:
        end_group(proc)


def end_group(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    """End ``proc``'s process group (``sig``, then SIGKILL after 20 s) and reap it."""
    try:
        os.killpg(proc.pid, sig)
        proc.wait(timeout=20)
    except ProcessLookupError:
        proc.wait()
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    with serve_mlflow(tmp_path_factory.mktemp("mlflow_server")) as (url, _):
        yield url


def sets(*overrides: str) -> list[str]:
    return [x for s in overrides for x in ("--set", s)]


def metric_values(client: MlflowClient, run_id: str, key: str) -> dict[int, float]:
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


def lookup(entry: dict, key: str):
    value = entry
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def test_safn_sim_logs_to_a_tracking_server(table, mlflow_server, tmp_path):
    out = tmp_path / "sim"
    proc = subprocess.run(
        [str(BIN / "safn-sim"), "--out", str(out), "--tracking", mlflow_server,
         *sets(*table, *SMALL_MODEL, "train.max_epochs=5", "federation.rounds=2",
               "simulation.num_cpus_per_site=1", f"simulation.site_state_dir={tmp_path / 's'}",
               "tracking.experiment=sim-test")],
        capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "warning" not in proc.stderr.lower()
    note = json.loads((out / "results.json").read_text())["tracking"]
    assert note["uri"] == mlflow_server and note["not_logged"] == [] and note["error"] is None
    client = MlflowClient(mlflow_server)
    run = client.get_run(note["run_id"])
    assert client.get_experiment(run.info.experiment_id).name == "sim-test"
    params, tags = run.data.params, run.data.tags
    assert params["config.federation.rounds"] == "2" and params["data_source"] == "table"
    assert {"version.safn", "version.flwr", "version.torch", "version.opacus"} <= set(params)
    assert params["data_source.site_A"] == "table"
    assert tags["safn.mode"] == "simulation" and tags["safn.target"] == "pd_vs_hc"
    assert tags["safn.run_folder"] == str(out.resolve())
    assert tags["safn.run_id"] == (out / "run_id").read_text().strip()
    # every round's metrics equal history.json's, under the entry's own dotted path
    history = json.loads((out / "history.json").read_text())
    by_round = {e["round"]: e for e in history}
    round_keys = set().union(*(round_metrics(e) for e in history))
    assert {"val_loss", "val_roc_auc", "selected_round", "pooled.roc_auc",
            "secure_sum.retries"} <= round_keys
    for key in round_keys:
        logged = metric_values(client, run.info.run_id, key)
        expected = {r: v for r, e in by_round.items() if (v := round_metrics(e).get(key))
                    is not None}
        assert logged == pytest.approx(expected), key
    # nothing per site: every metric is a pooled round figure of history.json or the
    # comparison table's (models on the pooled test set); no site's own metric
    sites = set(history[-1]["sites"])
    for key in run.data.metrics:
        if key.startswith("comparison."):
            continue
        assert key in round_keys and not key.startswith("sites."), key
        assert not any(site in key for site in sites), key
        for r, v in metric_values(client, run.info.run_id, key).items():
            assert lookup(by_round[r], key) == pytest.approx(v) or (
                key == "secure_sum.retries" and len(by_round[r]["secure_sum"]["retries"]) == v)
    assert run.data.metrics["comparison.pooled.roc_auc"] == pytest.approx(
        next(r["roc_auc"] for r in json.loads((out / "results.json").read_text())
             ["comparison"]["rows"] if r["kind"] == "pooled"))
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"report.html", "comparison.csv", "history.json", "model"} <= artifacts
    assert [a.path for a in client.list_artifacts(run.info.run_id, "model")] == \
        ["model/model_card.md"]


def test_safn_train_folds_are_nested_runs_in_the_embedded_store(table, tmp_path,
                                                                   monkeypatch):
    from safn_core.cli.train import run as train

    out = tmp_path / "runs" / "train"
    assert run_main(train, ["--out", str(out), "--tracking", *sets(*table, *TRAIN)]) == 0
    note = json.loads((out / "results.json").read_text())["tracking"]
    db = tmp_path / "runs" / "mlflow.db"
    assert note["uri"] == f"sqlite:///{db}" and db.is_file() and note["not_logged"] == []
    client = MlflowClient(note["uri"])
    parent = client.get_run(note["run_id"])
    assert parent.data.tags["safn.mode"] == "centralised"
    assert parent.data.params["config.train.folds"] == "2"
    assert parent.data.metrics["cv.all.SAFN.roc_auc_mean"] == pytest.approx(
        next(r["roc_auc_mean"] for r in json.loads((out / "results.json").read_text())
             ["summary"] if r["model"] == "SAFN"))
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{note['run_id']}'")
    assert sorted(c.info.run_name for c in children) == ["repeat 1 fold 1", "repeat 1 fold 2"]
    import pandas as pd

    folds = pd.read_csv(out / "folds.csv")
    for child in children:
        fold = int(child.data.tags["safn.fold"]) - 1
        row = folds[(folds.fold == fold) & (folds.model == "SAFN")].iloc[0]
        assert child.data.metrics["test.all.SAFN.roc_auc"] == pytest.approx(row.roc_auc)
        assert child.info.status == "FINISHED"
    artifacts = {a.path for a in client.list_artifacts(note["run_id"])}
    assert {"report.html", "results.csv", "folds.csv", "model", "mlflow_model"} <= artifacts
    assert (tmp_path / "runs" / "mlartifacts").is_dir()  # next to the run folders, not in cwd
    # the bundle as an MLflow model in the run: the same probabilities as the bundle
    import mlflow

    from safn_core.bundle import load_bundle
    from safn_core.bundle_frame import predict_frame
    from safn_core.mlflow_model import input_example

    monkeypatch.setenv("MLFLOW_TRACKING_URI", note["uri"])
    loaded = mlflow.pyfunc.load_model(f"runs:/{note['run_id']}/mlflow_model")
    bundle = load_bundle(out / "model")
    rows = input_example(bundle)
    expected = predict_frame(bundle, rows)
    got = loaded.predict(rows)
    prob = [c for c in expected.columns if c.startswith("p_")]
    assert prob and list(got[prob].columns) == prob
    assert got[prob].to_numpy() == pytest.approx(expected[prob].to_numpy(), abs=1e-6)


def test_a_tracking_server_that_is_down_never_fails_the_run(table, tmp_path):
    out = tmp_path / "train"
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    proc = subprocess.run([str(BIN / "safn-train"), "--out", str(out), "--tracking", down,
                           *sets(*table, *TRAIN)], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.stderr.count("warning: MLflow tracking at") == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    note = json.loads((out / "results.json").read_text())["tracking"]
    assert note["uri"] == down and note["run_id"] is None and note["error"]
    assert {"the run", "parameters", "the artifact report.html"} <= set(note["not_logged"])
    assert (out / "model" / "model_card.md").is_file() and (out / "report.html").is_file()


def booked_rounds(run_dir: Path) -> list[int]:
    """The rounds of ``run_dir/events.jsonl``'s round events (each line is written whole)."""
    path = run_dir / EVENTS_FILE
    lines = path.read_text().splitlines() if path.is_file() else []
    return [e["entry"]["round"] for e in map(json.loads, lines) if e.get("event") == "round"]


def logged_rounds(client: MlflowClient, experiment: str) -> set[int]:
    """The rounds whose val_loss the server holds for the experiment's run (none yet: empty)."""
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id]) if exp is not None else []
    return {m.step for r in runs for m in client.get_metric_history(r.info.run_id, "val_loss")}


@pytest.mark.slow
def test_a_server_killed_mid_run_leaves_a_completed_run_and_one_warning(table, tmp_path):
    """The server is killed (SIGKILL) once it holds round 0 (the start), while the federation
    goes on: the run completes, one warning, and results.json names what was not logged."""
    rounds, out = 20, tmp_path / "sim"
    folder = tmp_path / "server"
    folder.mkdir()
    with serve_mlflow(folder) as (url, server), \
            open(tmp_path / "sim.out", "w") as stdout, open(tmp_path / "sim.err", "w") as stderr:
        sim = subprocess.Popen(
            [str(BIN / "safn-sim"), "--out", str(out), "--tracking", url,
             *sets(*table, *SMALL_MODEL, "train.max_epochs=5", f"federation.rounds={rounds}",
                   "federation.patience=null", "simulation.compare=false",
                   "simulation.num_cpus_per_site=1", f"simulation.site_state_dir={tmp_path / 's'}",
                   "tracking.experiment=killed")],
            stdout=stdout, stderr=stderr, start_new_session=True)
        try:
            client = MlflowClient(url)
            # the event: the server holds the run's first round, round 0 (its REST API, polled)
            assert wait_until(lambda: bool(logged_rounds(client, "killed")) or
                              sim.poll() is not None, 240, interval=0.1), "no round logged"
            assert sim.poll() is None, (tmp_path / "sim.err").read_text()[-3000:]
            end_group(server, signal.SIGKILL)
            # read after the kill: the rounds booked when it happened are at most these
            at_kill = booked_rounds(out)
            assert at_kill and max(at_kill) < rounds, f"all rounds were booked: {at_kill}"
            code = sim.wait(timeout=300)
        finally:
            if sim.poll() is None:
                end_group(sim)
    err = (tmp_path / "sim.err").read_text()
    output = (tmp_path / "sim.out").read_text() + err
    assert code == 0, output[-4000:]
    assert output.count("warning: MLflow tracking at") == 1, output[-4000:]
    assert "Traceback" not in err
    history = json.loads((out / "history.json").read_text())
    assert [e["round"] for e in history] == list(range(rounds + 1))  # round 0: the start
    note = json.loads((out / "results.json").read_text())["tracking"]
    assert note["uri"] == url and note["run_id"] and note["error"]
    missing = set(note["not_logged"])
    assert {f"metrics of round {rounds}", "the artifact report.html", "the run's end",
            "the MLflow model mlflow_model"} <= missing
    assert "the run" not in missing and "metrics of round 0" not in missing


def test_tracking_on_without_mlflow_is_one_clear_error(table, tmp_path, monkeypatch, capsys):
    from safn_core.cli.train import run as train

    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow fails as if not installed
    out = tmp_path / "train"
    assert run_main(train, ["--out", str(out), "--tracking", *sets(*table, *TRAIN)]) == 2
    err = capsys.readouterr().err
    assert "pip install -e '.[tracking]'" in err and "Traceback" not in err
    assert not out.exists()  # refused before anything was written


def test_tracking_off_never_imports_mlflow():
    code = ("import sys; from safn_core.config.tracking import TrackingConfig\n"
            "from safn_core.tracking import Tracker\n"
            "t = Tracker(TrackingConfig(), '.'); t.start('x', {}, {}); t.log_round({'round': 1})\n"
            "assert t.finish() is None and 'mlflow' not in sys.modules\n"
            "import safn.simulations.cli, safn_core.cli.train\n"
            "assert 'mlflow' not in sys.modules")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=Path(__file__).parents[1])
    assert proc.returncode == 0, proc.stderr


def test_the_guard_warns_once_then_notes_what_was_not_logged():
    warnings: list[str] = []
    guard = Guard("http://x", warnings.append)
    assert guard.call("a", lambda: 1) == 1

    def fail():
        raise ConnectionError("refused")

    assert guard.call("b", fail) is None and guard.call("c", lambda: 1) is None
    assert len(warnings) == 1 and "refused" in warnings[0]
    assert guard.not_logged == ["b", "c"]


def test_rounds_are_logged_as_the_coordinator_books_them(tmp_path):
    events = EventLog(tmp_path / "events.jsonl")
    seen: list[dict] = []
    follower = RoundFollower(tmp_path, seen.append).start()
    try:
        events.emit(Event.ROUND, entry={"round": 1, "val_loss": 0.5, "sites": {"A": None}})
        # logged while the run goes on (before round 2 exists), not at its end
        assert wait_until(lambda: len(seen) == 1, 30, interval=0.05)
        events.emit(Event.ROUND, entry={"round": 2, "val_loss": 0.4})
    finally:
        follower.stop()
    assert [e["round"] for e in seen] == [1, 2]
    assert round_metrics(seen[0]) == {"val_loss": 0.5}  # never a site's own figures


def test_tracking_config_from_the_flag():
    cfg = load_config(None, ["tracking.enabled=true"])
    assert cfg.tracking.enabled and cfg.tracking.uri is None


def test_leave_one_site_out_federations_are_nested_runs(tmp_path):
    """safn-sim's end of run on a folder as LOSO leaves it (the federations themselves:
    tests/test_federation_flower.py): one nested run per held-out site."""
    import pandas as pd

    from safn_core.config.tracking import TrackingConfig
    from safn_core.tracking import Tracker
    from safn.simulations import tracking

    run_dir = tmp_path / "runs" / "sim"
    for held, loss in (("site_A", 0.6), ("site_B", 0.7)):
        (run_dir / "loso" / held).mkdir(parents=True)
        (run_dir / "loso" / held / "history.json").write_text(json.dumps(
            [{"round": 1, "val_loss": loss, "sites": {"site_C": {"roc_auc": 0.9, "n": 4}}}]))
    loso = pd.DataFrame({"held_out": ["site_A", "site_B"], "n": [50, 60],
                         "roc_auc": [0.8, 0.7], "roc_auc_ci": [[0.7, 0.9], [0.6, 0.8]]})
    tracker = Tracker(TrackingConfig(enabled=True), run_dir)
    tracker.start("sim", {}, {})
    note = tracking.finish(tracker, run_dir, None, loso)
    client = MlflowClient(note["uri"])
    children = client.search_runs([tracker.experiment_id],
                                  f"tags.mlflow.parentRunId = '{note['run_id']}'")
    by_site = {c.data.tags["safn.held_out"]: c for c in children}
    assert set(by_site) == {"site_A", "site_B"}
    assert by_site["site_B"].data.metrics == {"held_out.site_B.roc_auc": 0.7, "val_loss": 0.7}


@pytest.mark.slow
def test_safn_server_logs_a_deployed_run_from_the_coordinator_only(tmp_path):
    """A real deployment (SuperLink, three safn-client sites with TLS): the coordinator's
    process logs to the embedded store next to its run folder; the sites have no say."""
    from tests.deploy_harness import SITES, federations, make_material

    material = make_material(tmp_path / "material")
    with federations(material, tmp_path / "fed") as make:
        fed = make(rounds=2)
        server = fed.server("--tracking")
        server.wait_for_output(r"run \d+ submitted", 240)
        sites = [fed.site(s) for s in SITES]
        assert server.wait(300) == 0, server.output()[-4000:]
        assert all(site.wait(120) == 0 for site in sites)
    note = json.loads((fed.run_dir / "results.json").read_text())["tracking"]
    assert note["uri"] == f"sqlite:///{fed.folder.resolve() / 'mlflow.db'}"
    assert note["not_logged"] == []
    client = MlflowClient(note["uri"])
    run = client.get_run(note["run_id"])
    tags = run.data.tags
    assert tags["safn.mode"] == "deployment" and run.info.status == "FINISHED"
    flower_runs = json.loads((fed.run_dir / "flower_runs.json").read_text())["runs"]
    assert tags["safn.flower_runs"] == ", ".join(str(r["run_id"]) for r in flower_runs)
    assert run.data.params["data_source.site_a"] == "ppmi"
    history = json.loads((fed.run_dir / "history.json").read_text())
    for key in ("val_loss", "val_roc_auc", "selected_round"):
        assert metric_values(client, run.info.run_id, key) == pytest.approx(
            {e["round"]: e[key] for e in history if e.get(key) is not None}), key
    assert not any(k.startswith("sites.") for k in run.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"report.html", "history.json", "model"} <= artifacts
