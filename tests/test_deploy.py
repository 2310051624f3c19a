"""Deployment on 127.0.0.1: real safn-server (flower-superlink with TLS and SuperNode
authentication) and real safn-client processes (flower-supernode with the site's app approval),
with certificates and keys from deploy/make_certs.py. Each test ends every process it started."""

from __future__ import annotations

import json
import stat
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import yaml

from tests.deploy_harness import (BIN, SITES, Federation, env, federations, kill_coordinator,
                                  kill_site, make_material)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def material(tmp_path_factory):
    return make_material(tmp_path_factory.mktemp("federation"))


@pytest.fixture
def federation(material, tmp_path):
    with federations(material, tmp_path) as make:
        yield make


def _audit(fed: Federation, site: str) -> list[dict]:
    path = fed.folder / f"state_{site}" / "audit" / "outgoing.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_three_sites_with_tls_and_authentication_train_to_a_bundle(federation):
    fed = federation(rounds=2)
    server = fed.server()
    server.wait_for_output(r"run \d+ submitted", 240)
    sites = [fed.site("site_a"), fed.site("site_b"), fed.site("site_c", "--stay")]
    assert server.wait(300) == 0, server.output()[-4000:]
    out = server.output()
    assert "TLS, site authentication on" in out
    assert "run completed after round 2 (run id run-" in out
    assert "did not acknowledge" not in out  # every site answered the run's end
    # the sites learn that the run completed: two leave by themselves (exit 0); the one that
    # stays up for the next run says so and keeps serving
    for site in sites[:2]:
        assert site.wait(120) == 0, site.output()[-3000:]
        said = site.output()
        assert "done, the run completed" in said
        assert "run end: the run (run id run-" in said and "completed at the coordinator " \
            "after round 2" in said
        # one line per round on the terminal, Flower's own output in the site's log only
        assert [line for line in said.splitlines() if " trained on " in line] == [
            line for line in said.splitlines() if line.startswith(f"site {site.name}: round ")]
        assert len([line for line in said.splitlines() if ": round " in line]) == 2
        assert "Connection attempt failed" not in said and "Receiving:" not in said
        assert "Receiving:" in (fed.folder / f"state_{site.name}" / "supernode.log").read_text()
    sites[2].wait_for_output(r"staying connected for the coordinator's next run", 120)
    assert sites[2].proc.poll() is None
    # ... and serves it: a new coordinator (a new run folder, so a new SuperLink database that
    # knows nothing of the site's session) on the same address, with the two others back; this
    # run is harmonised (federated ComBat) and personalised (fine-tuning): each site keeps its
    # harmonised training split and its personal model in its own state folder
    again = fed.server("--set", f"server.run_dir={fed.folder / 'run2'}",
                       "--set", "harmonisation.method=combat",
                       "--set", "personalisation.method=fine_tune",
                       "--set", "personalisation.epochs=2")
    again.wait_for_output(r"run \d+ submitted", 240)
    back = [fed.site("site_a"), fed.site("site_b")]
    assert again.wait(300) == 0, again.output()[-4000:]
    assert all(site.wait(120) == 0 for site in back)
    stayed = sites[2].wait_for_output(r"run end: the run \(run id (run2-\w+)", 120)
    assert stayed.group(1) in again.output() and sites[2].proc.poll() is None
    assert "waiting for its next run (--stay)" in sites[2].output()
    assert "personalisation (fine_tune): pooled balanced accuracy" in again.output()
    assert "personalisation (fine_tune, kept epoch" in sites[2].output()
    personal = json.loads((fed.folder / "run2" / "personalisation.json").read_text())
    assert sorted(personal["sites"]) == list(SITES) and not personal["refused"]
    assert personal["pooled_basis"] == "secure sum over 3 sites with a personal model"
    for site in SITES:
        kept = list((fed.folder / f"state_{site}" / "personal").glob(f"{stayed.group(1)}/*"))
        assert {p.name for p in kept} >= {"selected.npz", "selected.json", "evaluation.json"}
        harmonised = fed.folder / f"state_{site}" / "harmonised" / f"{stayed.group(1)}.csv"
        assert "label" not in pd.read_csv(harmonised).columns
    assert "harmonisation: ComBat fitted on the training splits of 3 sites" in again.output()
    assert "securely summed" in again.output()
    from safn_core.bundle import load_bundle as _load

    assert _load(fed.folder / "run2" / "model").harmonisation is not None
    # secure aggregation (the default): the coordinator saw sums only, and each site's audit
    # log records masked vectors by shape and public keys, no per-site counts or histograms
    assert "secure aggregation: statistics summed over 3 sites" in out
    for site in SITES:
        for e in _audit(fed, site):
            for rec in e.get("records", {}).values():
                if rec["kind"] == "arrays":
                    assert list(rec["arrays"]) == ["masked"]
                    assert rec["arrays"]["masked"]["dtype"] == "uint64"
                if rec["kind"] == "metrics":
                    assert not {"num-examples", "train-loss", "val-neg", "test-neg",
                                "class-0"} & set(rec["values"])
    assert "round 2 sites:" in out  # progress per site
    history = fed.history()
    # round 0 evaluates the exact federated logistic regression SAFN starts from, untrained
    assert [e["round"] for e in history] == [0, 1, 2]
    assert all(sorted(e["sites_trained"]) == list(SITES) for e in history[1:])
    assert "sites_trained" not in history[0] and history[0]["pooled"] is not None
    assert ("logistic regression floor: fitted on the training splits of 3 sites in" in out
            and "securely summed" in out)
    floor = json.loads((fed.run_dir / "logistic.json").read_text())
    assert floor["secure_aggregation"] and floor["fit"]["converged"]
    assert sorted(floor["sites"]) == list(SITES)

    from safn_core.bundle import load_bundle

    bundle = load_bundle(fed.run_dir / "model")
    assert bundle.meta["kind"] == "federated"
    assert sorted(bundle.meta["training"]["sites"]) == list(SITES)

    # the run folder records the Flower run and the app the sites approved
    runs = json.loads((fed.run_dir / "flower_runs.json").read_text())["runs"]
    assert runs[0]["app_sha256"] == fed.m["app_hash"]

    # nothing participant-level left a site: every reply a site sent is a masked vector of one
    # of the run's secure sums (statistics, scaled statistics, the floor's Newton rounds, training
    # update, evaluation)
    n_params = sum(v.numel() for v in bundle.model.state_dict().values())
    n_features = len(bundle.preprocessor.mean_)
    from safn_core.config import load_config
    from safn_core.federation import secure_records as sr
    from safn_core.logistic import PENALTIES
    from safn_core.logistic.packing import newton_packing

    fed_cfg = load_config(fed.server_yaml).federation
    sums = [sr.statistics_packing(n_features, fed_cfg, 3).size,
            sr.scaled_packing(n_features, fed_cfg, 3).size,
            sr.train_packing(n_params, fed_cfg, 3).size,
            sr.evaluate_packing(fed_cfg.histogram_bins, fed_cfg, 3).size,
            sr.personalise_packing(3).size,  # the second run's personalised comparison
            *harmonise_sizes(fed_cfg, bundle),  # ... and its ComBat sums
            # the logistic regression floor's Newton rounds (its size: features, candidates)
            newton_packing(n_features, len(PENALTIES), (1.0, 1.0), fed_cfg.secagg.max_site_examples,
                           3).size]
    for site in SITES:
        entries = _audit(fed, site)
        assert {e["type"] for e in entries} >= {"query", "train", "evaluate"}
        assert any(e.get("records", {}).get("arrays", {}).get("arrays", {}).get("masked", {})
                   .get("shape") == [sr.personalise_packing(3).size] for e in entries)
        for e in entries:
            assert "error" not in e, e
            for name, rec in e["records"].items():
                if rec["kind"] == "arrays":
                    for k, a in rec["arrays"].items():
                        assert a["shape"][0] in sums and a["dtype"] == "uint64", (site, k, a)
                elif rec["kind"] == "metrics":
                    for k, v in rec["values"].items():
                        if isinstance(v, dict):
                            assert v["list_length"] == 1000, (site, k, v)
                        else:
                            assert isinstance(v, (int, float)), (site, k, v)
                else:
                    for k, v in rec["values"].items():
                        if isinstance(v, dict):  # lists: labels, features, modality layout
                            assert v["list_length"] <= max(n_features, 2), (site, k, v)

    status = subprocess.run([str(BIN / "safn-server"), "--config", str(fed.server_yaml),
                             "--status"], capture_output=True, text=True, env=env())
    assert status.returncode == 0 and "completed" in status.stdout


def test_a_site_with_an_unlisted_key_is_refused(federation):
    fed = federation(listed=("site_a", "site_b"), secure_aggregation=False)
    server = fed.server()
    intruder = fed.site("site_c", activation_wait=4)  # site_c's key is not in server.sites
    assert intruder.wait(240) != 0
    said = intruder.output()
    # the SuperLink answered with the right TLS, so the key is the cause, named with its
    # fingerprint (as ssh-keygen -lf prints it for site_c.pub)
    from safn.server.superlink import openssh_fingerprint

    fingerprint = openssh_fingerprint(fed.m["certs"] / "sites" / "site_c.pub")
    # (it may first have found nothing answering, if it started before the SuperLink did)
    final = [line for line in said.splitlines() if line.startswith("error:")]
    assert len(final) == 1 and "refused to activate this site (key " in final[0], said[-3000:]
    assert fingerprint in final[0]
    # the coordinator names the refused key once it follows its SuperLink's log
    refused = server.wait_for_output(r"REFUSED a site: key SHA256:\S+ is not registered", 240)
    assert refused


def test_a_site_killed_mid_run_does_not_stop_it_and_rejoins(federation):
    # plain aggregation: with 3 sites, one killed leaves 2, too few to sum securely (a secure
    # run needs 4 sites to ride out a dropout; tests/test_secure_federation.py covers that)
    fed = federation(rounds=5, secure_aggregation=False, rejoin_wait=300)
    server, sites = fed.start()
    fed.wait_for_round(1, 240, server)
    # the stock Flower CLI works against the coordinator's SuperLink while the run goes on
    listed = subprocess.run([str(BIN / "flwr"), "list", "safn", "--format", "json"],
                            capture_output=True, text=True, timeout=60,
                            env={**env(), "FLWR_HOME": str(fed.run_dir / "flower")})
    run_id = json.loads((fed.run_dir / "flower_runs.json").read_text())["runs"][0]["run_id"]
    runs = json.loads(listed.stdout[listed.stdout.index("{"):])["runs"]
    assert [r["status"] for r in runs if r["run-id"] == run_id] == ["running"]
    kill_site(fed, sites[2])  # site_c's host dies: SIGKILL to safn-client and its SuperNode
    # once the SuperLink has seen site_c go (missed heartbeats), the next training round waits
    # for it (federation.rejoin_wait) ...
    waiting = server.wait_for_output(r"round (\d+): waiting up to \d+ s for site_c to reconnect",
                                     300)
    r = int(waiting.group(1))
    assert r <= 5
    fed.site("site_c")  # ... site_c comes back (same key, same state folder) ...
    server.wait_for_output(rf"round {r}: site_c reconnected after \d+ s", 300)  # ... and rejoins
    assert server.wait(600) == 0, server.output()[-4000:]
    history = fed.history()
    assert [e["round"] for e in history] == [0, 1, 2, 3, 4, 5]  # 0: the floor, untrained
    trained = {e["round"]: set(e["sites_trained"]) for e in history if e["round"]}
    evaluated = {e["round"]: set(e.get("sites") or {}) for e in history if e["round"]}
    assert all({"site_a", "site_b"} <= trained[i] for i in trained)
    # away between the kill and its return: some round went on without its update or its test
    away = [i for i in trained if not {"site_c"} <= trained[i] & evaluated[i]]
    assert away and max(away) < r, (r, trained, evaluated)
    # from the round it came back for to the end, it trained and was evaluated every round
    assert all("site_c" in trained[i] and "site_c" in evaluated[i] for i in range(r, 6)), \
        (r, trained, evaluated)


def test_a_killed_coordinator_resumes_without_losing_or_repeating_a_round(federation):
    fed = federation(rounds=3)
    server, sites = fed.start()
    fed.wait_for_round(1, 240, server)
    kill_coordinator(fed, server)  # the coordinator host dies: safn-server, SuperLink, ServerApp
    from safn_core.federation.checkpoint import load_checkpoint

    done = load_checkpoint(fed.run_dir).round  # the last complete round on disk
    assert 1 <= done < 3
    resumed = fed.server("--resume")
    assert resumed.wait(600) == 0, resumed.output()[-4000:]
    assert f"resuming after round {done}" in resumed.output()
    assert [e["round"] for e in fed.history()] == [0, 1, 2, 3]
    ckpts = sorted(p.name for p in (fed.run_dir / "checkpoints").iterdir())
    assert len(ckpts) >= 3


POISON = '''#!{python}
"""flwr-clientapp of a malicious site: honest training, then NaN in every array it returns."""
import sys
import numpy as np
from flwr.app import Array, ArrayRecord
import safn.client.app as ca

key = next(k for k in ca.app._registered_funcs if k.startswith("train"))
honest = ca.app._registered_funcs[key]

def poisoned(msg, ctx):
    reply = honest(msg, ctx)
    arrays = reply.content["arrays"]
    reply.content["arrays"] = ArrayRecord(
        {{k: Array(np.full(a.shape, np.nan, dtype=a.numpy().dtype)) for k, a in arrays.items()}})
    return reply

ca.app._registered_funcs[key] = poisoned
from flwr.supernode.cli import flwr_clientapp
sys.argv[0] = "flwr-clientapp"
flwr_clientapp()
'''


def test_a_nan_update_is_rejected_and_reported_by_site(federation, tmp_path):
    shim = tmp_path / "poison-bin"
    shim.mkdir()
    script = shim / "flwr-clientapp"
    script.write_text(POISON.format(python=sys.executable))
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    # plain aggregation: the coordinator screens updates it can see (under secure aggregation
    # a site screens its own, safn.client.app)
    fed = federation(rounds=2, secure_aggregation=False)
    server = fed.server()
    fed.site("site_a")
    fed.site("site_b")
    # site_c's SuperNode starts the poisoned ClientApp (found first on its PATH)
    from tests.deploy_harness import Proc

    path = f"{shim}:{BIN}:{env()['PATH']}"
    fed.procs.append(Proc("site_c", [str(BIN / "safn-client"), "--site",
                                     str(fed.site_yaml("site_c"))],
                          fed.folder / "site_c_poisoned.log", {"PATH": path}))
    assert server.wait(300) == 0, server.output()[-4000:]
    out = server.output()
    assert "rejected update from site site_c: non-finite values" in out
    for entry in fed.history()[1:]:  # round 0 evaluates the floor; nothing trains there
        assert [x["site"] for x in entry["rejected"]] == ["site_c"]
        assert "site_c" not in entry.get("sites_trained", [])
    from safn_core.bundle import load_bundle

    weights = load_bundle(fed.run_dir / "model").model.state_dict()
    assert all(np.isfinite(v.numpy()).all() for v in weights.values())


def test_a_held_out_site_only_evaluates_and_a_dp_site_reports_its_epsilon(federation):
    fed = federation(rounds=2, secure_aggregation=False)  # 2 training sites
    cfg = yaml.safe_load(fed.server_yaml.read_text())
    cfg["server"]["held_out_sites"] = ["site_c"]
    fed.server_yaml.write_text(yaml.safe_dump(cfg))
    # site_a decides on DP-SGD in its own site.yaml; site_b does not (a mixed federation)
    fed.site_yaml("site_a", privacy={"mode": "dp-sgd", "epsilon": 8.0, "delta": 1e-5})
    server, _ = fed.start()
    assert server.wait(300) == 0, server.output()[-4000:]
    out = server.output()
    assert "held-out sites (evaluation only): site_c" in out
    assert "held-out site_c: ROC-AUC" in out
    # a DP-SGD site never sends the floor's exact sums: the run goes without it, and says why
    assert "logistic regression floor: not fitted, site site_a cannot take part: this site " \
        "trains under DP-SGD" in out
    history = fed.history()
    assert [e["round"] for e in history] == [1, 2]
    n_c = len(pd.read_parquet(fed.folder / "state_site_c" / "cohort" / "cohort.parquet"))
    for entry in history:
        assert "site_c" not in entry["sites_trained"]
        assert "site_c" not in (entry.get("sites") or {})  # not in the pooled test set
        external = entry["held_out"]["site_c"]
        assert external["n"] == n_c  # all its participants
        lo, hi = external["ci"]["roc_auc"]  # bootstrap 95 % CI from its histograms
        assert lo <= external["roc_auc"] <= hi
    # the held-out site sent no statistics and was never asked to train
    audit = _audit(fed, "site_c")
    assert {e["type"] for e in audit} == {"query", "evaluate"}
    assert all("stats" not in e["records"] for e in audit)
    from safn_core.bundle import load_bundle

    meta = load_bundle(fed.run_dir / "model").meta
    assert set(meta["metrics"]["held_out_site_c"]["roc_auc"]) == {"value", "ci"}
    assert "held out site c" in (fed.run_dir / "model" / "model_card.md").read_text()
    assert sorted(meta["training"]["sites"]) == ["site_a", "site_b"]
    assert (fed.run_dir / "report.html").is_file()

    # ε per site per round: site_a's own budget, spent from its ledger on its own disk
    eps = [e["privacy"]["site_a"]["epsilon"] for e in history]
    assert 0 < eps[0] < eps[1] <= 8.0
    assert all(not e["privacy"]["site_b"]["dp"] for e in history)
    assert (fed.folder / "state_site_a" / "privacy_ledger.json").is_file()
    assert not (fed.folder / "state_site_b" / "privacy_ledger.json").exists()
    assert "Differential privacy" in (fed.run_dir / "report.html").read_text()


def harmonise_sizes(fed_cfg, bundle) -> list[int]:
    """The sizes of federated ComBat's two secure sums for this federation's data."""
    from safn_core.config import load_config
    from safn_core.federation.site_harmonisation import means_packing, residuals_packing
    from safn_core.harmonisation.setup import combat_spec

    spec = combat_spec(load_config(None, ["harmonisation.method=combat"]).harmonisation,
                       bundle.preprocessor.modalities)
    n = fed_cfg.secagg.max_site_examples
    return [means_packing(spec, n, 3).size, residuals_packing(spec, n, 3).size]


def test_distributed_dp_across_deployed_sites_with_noise_shares(federation):
    """privacy.mode: distributed through real processes, harmonised: site_a has DP off (the
    request turns it on), site_b asks for distributed DP with a smaller budget of its own,
    site_c has its default. σ is the largest the sites need; every site's ledger records the
    same mechanism per round; what leaves a site in training is one masked vector."""
    fed = federation(rounds=2, min_sites=3)
    cfg = yaml.safe_load(fed.server_yaml.read_text())
    cfg["privacy"] = {"mode": "distributed", "epsilon": 4.0, "delta": 1e-5,
                      "distributed": {"sample_rate": 0.3}}
    cfg["harmonisation"] = {"method": "combat"}
    fed.server_yaml.write_text(yaml.safe_dump(cfg))
    fed.site_yaml("site_b", privacy={"mode": "distributed", "epsilon": 2.0, "delta": 1e-5})
    server, sites = fed.start()
    assert server.wait(300) == 0, server.output()[-4000:]
    out = server.output()
    assert "distributed DP: σ" in out and "against the coordinator with up to 1 colluding" in out
    plan = json.loads((fed.run_dir / "distributed_dp.json").read_text())
    assert plan["sites"] == list(SITES)
    history = fed.history()
    assert [e["round"] for e in history] == [1, 2]
    for entry in history:
        assert entry["distributed_dp"]["shares"] == 3
        assert entry["distributed_dp"]["noise_multiplier"] == plan["noise_multiplier"]
    last = history[-1]["privacy"]
    assert last["site_b"]["epsilon"] <= 2.0 and last["site_b"]["epsilon_budget"] == 2.0
    assert last["site_a"]["epsilon_budget"] == 4.0
    for site in SITES:
        ledger = json.loads((fed.folder / f"state_{site}" / "privacy_ledger.json").read_text())
        assert [(e["round"], e["noise_multiplier"], e["sample_rate"], e["steps"])
                for e in ledger["entries"] if e["kind"] == "distributed"] == [
            (1, plan["noise_multiplier"], 0.3, 1), (2, plan["noise_multiplier"], 0.3, 1)]
        trained = [e for e in _audit(fed, site) if e["type"] == "train"]
        assert len(trained) == 2
        for e in trained:  # one masked vector, and no per-site count or loss beside it
            assert set(e["records"]) <= {"arrays", "metrics", "secagg"}, e
            assert list(e["records"]["arrays"]["arrays"]) == ["masked"]
            assert not {"num-examples", "train-loss"} & set(e["records"]["metrics"]["values"])
    assert all(site.wait(120) == 0 for site in sites)
    from safn_core.bundle import load_bundle

    weights = load_bundle(fed.run_dir / "model").model.state_dict()
    assert all(np.isfinite(v.numpy()).all() for v in weights.values())
