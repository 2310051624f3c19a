"""The federation's plumbing for K-class targets (issue #32): class counts through the plain and
the secure statistics round and the Gaussian release, the target each site names and the
coordinator checks, and one K-class federation end to end."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from safn_core.config import SafnConfig, load_config
from safn_core.data.cohort import Cohort, LoadReport, Modality
from safn_core.federation.protocol import (Metric, class_counts_from_metrics,
                                           class_counts_to_metrics, evaluation_from_metrics,
                                           evaluation_to_metrics)
from safn_core.federation.site import Site, SmallCell
from safn_core.targets import HC_PRODROMAL_PD, HY_STAGE, PD_VS_HC, Target

BIN = Path(sys.executable).parent


def kclass_cohort(n: int = 150, target: Target = HC_PRODROMAL_PD, seed: int = 0,
                  site: str = "a", probs=None) -> Cohort:
    """A small in-memory cohort whose labels are ``target``'s classes."""
    rng = np.random.default_rng(seed)
    k = target.n_classes
    y = rng.choice(k, n, p=probs) if probs is not None else np.arange(n) % k
    table = pd.DataFrame({"site": site, "label": y.astype(np.int64),
                          "ct_0": rng.normal(2.5, 0.2, n) + 0.1 * y,
                          "cl_0": rng.normal(10, 3, n) + 2 * y},
                         index=[f"{site}{i:04d}" for i in range(n)])
    mods = (Modality("imaging", ("ct_0",), "imaging"), Modality("clinical", ("cl_0",)))
    return Cohort(table, mods, LoadReport("synthetic"), target.classes,
                  {"ct_0": (0.0, 5.0), "cl_0": (-10.0, 40.0)}, target=target)


# ------------------------------------------------------------------ the wire


def test_binary_class_counts_keep_their_keys_and_k_classes_add_theirs():
    assert class_counts_to_metrics([12, 30]) == {Metric.CLASS_0: 12, Metric.CLASS_1: 30}
    assert list(class_counts_to_metrics([12, 30])) == ["class-0", "class-1"]
    m = class_counts_to_metrics([4.5, 6.0, 7.25], float)
    assert list(m) == ["class-0", "class-1", "class-2"]
    assert class_counts_from_metrics(m) == [4.5, 6.0, 7.25]
    assert class_counts_from_metrics({"n-train": 3, **class_counts_to_metrics([1, 2])}) == [1, 2]


def test_plain_evaluation_keys_binary_as_before_and_k_classes_round_trip():
    binary = {"val": np.arange(8).reshape(2, 4), "test": np.ones((2, 4), int), "withheld": False,
              "val_loss_sum": 1.5, "val_examples": 28}
    m = evaluation_to_metrics(binary)
    assert list(m) == ["num-examples", "val-neg", "val-pos", "test-neg", "test-pos", "withheld",
                       "val-loss-sum", "val-examples"]
    assert m["num-examples"] == 8
    back = evaluation_from_metrics(m)
    assert np.array_equal(back["val"], binary["val"]) and back["val_examples"] == 28
    k, bins = 3, 4
    test = np.zeros((k, k, bins), int)
    test[:, :, 0] = [[5, 5, 5], [2, 2, 2], [7, 7, 7]]  # 14 participants, each in every slice
    res = {"val": test.copy(), "test": test, "withheld": False, "val_loss_sum": 3.0,
           "val_examples": 14, "val_confusion": np.eye(3, dtype=int),
           "test_confusion": 2 * np.eye(3, dtype=int)}
    m = evaluation_to_metrics(res)
    assert m[Metric.N_CLASSES] == 3 and m["num-examples"] == 14 and "val-neg" not in m
    back = evaluation_from_metrics(m)
    assert back["test"].shape == (3, 3, 4) and np.array_equal(back["test"], test)
    assert np.array_equal(back["test_confusion"], 2 * np.eye(3))


# ------------------------------------------------------------------ a site's statistics


def test_a_site_describes_k_class_counts_and_names_a_small_class():
    cohort = kclass_cohort(150)
    site = Site("a", cohort, SafnConfig())
    stats, counts = site.describe()
    assert len(counts) == 3 and sum(counts) == len(site.split.train)
    # few prodromal participants: the site withholds its statistics and names the class
    small = kclass_cohort(150, probs=[0.49, 0.02, 0.49], seed=1)
    site = Site("a", small, load_config(None, ["data.min_cell=5"]))
    with pytest.raises(SmallCell, match=r"HC \d+ / Prodromal \d / PD \d+ participants per "
                                        r"class; Prodromal fewer than min_cell = 5"):
        site.describe()
    # binary: the message as before
    binary = kclass_cohort(150, PD_VS_HC, probs=[0.97, 0.03], seed=2)
    with pytest.raises(SmallCell, match=r"has \d+ / \d participants per class, fewer than "
                                        r"min_cell = 5$"):
        Site("a", binary, SafnConfig()).describe()


def test_gaussian_statistics_release_k_class_counts():
    from safn_core.privacy import exact_clipped_statistics, privatise_statistics

    cohort = kclass_cohort(90)
    frame, y = cohort.table, cohort.y
    *_, k, _, _ = exact_clipped_statistics(frame, ["ct_0", "cl_0"], y, cohort.plausible_ranges,
                                           n_classes=3)
    assert k.tolist() == [30, 30, 30]
    _, counts = privatise_statistics(frame, ["ct_0", "cl_0"], y, cohort.plausible_ranges, 1e-9,
                                     np.random.default_rng(0), n_classes=3)
    assert np.allclose(counts, [30, 30, 30], atol=1e-3)
    _, binary = privatise_statistics(frame, ["ct_0", "cl_0"], (y > 0).astype(int),
                                     cohort.plausible_ranges, 1e-9, np.random.default_rng(0))
    assert np.allclose(binary, [30, 60], atol=1e-3)


def test_the_secure_statistics_sum_carries_k_class_counts():
    from safn_core.federation.secure_records import (scaled_packing, scaled_values,
                                                     scales_from_sum, statistics_from_sum,
                                                     statistics_packing, statistics_values)

    fed = SafnConfig().federation
    assert statistics_packing(2, fed, 3).field("class_counts").shape == (2,)  # binary as before
    sites = [Site(s, kclass_cohort(120, seed=i, site=s), SafnConfig())
             for i, s in enumerate("abc")]
    packing = statistics_packing(2, fed, 3, n_classes=3)
    first, frames, expected = [], [], np.zeros(3, int)
    for site in sites:
        stats, counts = site.describe(check_cells=False)
        frame = site.cohort.table.loc[site.split.train, ["ct_0", "cl_0"]]
        frames.append(frame)
        first.append(packing.encode(statistics_values(stats, counts, frame)).vector)
        expected += counts
    total = packing.decode(np.sum(first, axis=0, dtype=np.uint64))
    scales = scales_from_sum(total)
    second = scaled_packing(2, fed, 3)
    scaled = second.decode(np.sum([second.encode(scaled_values(f, scales)).vector
                                   for f in frames], axis=0, dtype=np.uint64))
    _, counts, _ = statistics_from_sum(("ct_0", "cl_0"), total, scaled, scales, 5)
    assert counts == expected.tolist() and len(counts) == 3


# ------------------------------------------------------------------ the statistics round


class _Grid:
    """The coordinator's Grid over in-process sites: each QUERY answered by the ClientApp's
    ``describe`` for the site of its node."""

    def __init__(self, sites: dict[int, Site], monkeypatch):
        from flwr.supercore.task_identity import TaskIdentity

        import safn.client.site_context as sc

        for key, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
            monkeypatch.setattr(TaskIdentity, key, value)
        self.sites, self.sc = sites, sc

    def get_node_ids(self):
        return sorted(self.sites)

    def send_and_receive(self, messages, timeout=None):
        from flwr.app import Context, Message, RecordDict
        from flwr.app import Metadata

        from safn.client.app import describe

        out = []
        for msg in messages:
            nid = msg.metadata.dst_node_id
            site = self.sites[nid]

            class Source:
                def site(self, context, shared_text):
                    return site

                def state_dir(self, s, context):
                    return None

                def data_source(self, s, context):
                    return "synthetic"

            token = self.sc._SOURCE.set(Source())
            try:
                reply = describe(msg, Context(run_id=1, node_id=nid, node_config={},
                                              state=RecordDict(), run_config={}))
            finally:
                self.sc._SOURCE.reset(token)
            meta = Metadata(run_id=1, message_id=f"m{nid}", src_node_id=nid, dst_node_id=0,
                            reply_to_message_id="", group_id="1", created_at=time.time(),
                            ttl=60.0, message_type="query")
            out.append(Message(reply.content, metadata=meta))
        return out


def _round(sites: dict[int, Site], monkeypatch, configured: Target | None):
    from safn_core.federation.shared_config import shared_config_text
    from safn.server.statistics_round import statistics_round

    cfg = SafnConfig()
    return statistics_round(_Grid(sites, monkeypatch), sorted(sites), 10.0,
                            shared_config_text(cfg), 1, configured=configured)


def test_the_plain_statistics_round_carries_k_class_counts_and_the_target(monkeypatch):
    sites = {i + 1: Site(s, kclass_cohort(120, seed=i, site=s), SafnConfig())
             for i, s in enumerate("abc")}
    desc = _round(sites, monkeypatch, HC_PRODROMAL_PD)
    assert desc.target == HC_PRODROMAL_PD
    assert [len(c) for c in desc.counts] == [3, 3, 3]
    assert desc.counts[0] == [float(c) for c in sites[1].describe()[1]]
    from safn_core.federation.aggregate import global_preprocessing

    _, counts = global_preprocessing(sites[1].cohort.modalities, desc.stats, desc.counts)
    assert len(counts) == 3
    # binary sites: two counts, as before
    binary = {i + 1: Site(s, kclass_cohort(120, PD_VS_HC, seed=i, site=s), SafnConfig())
              for i, s in enumerate("ab")}
    desc = _round(binary, monkeypatch, PD_VS_HC)
    assert [len(c) for c in desc.counts] == [2, 2] and desc.target == PD_VS_HC


def test_sites_with_other_targets_stop_the_run_with_one_line(monkeypatch):
    from safn.server.site_targets import TargetMismatch

    mixed = {1: Site("a", kclass_cohort(120, site="a"), SafnConfig()),
             2: Site("b", kclass_cohort(120, HY_STAGE, site="b"), SafnConfig()),
             3: Site("c", kclass_cohort(120, site="c"), SafnConfig())}
    with pytest.raises(TargetMismatch) as err:
        _round(mixed, monkeypatch, None)
    text = str(err.value)
    assert "\n" not in text
    assert text == ("the sites predict different targets (a, c: hc_prodromal_pd (HC / "
                    "Prodromal / PD, ordered); b: hy_stage (HC / H&Y 1 / H&Y >=2, ordered)): "
                    "every site's data.target (or its table mapping's label) must be the same")
    same = {i + 1: Site(s, kclass_cohort(120, seed=i, site=s), SafnConfig())
            for i, s in enumerate("ab")}
    with pytest.raises(TargetMismatch, match=r"^the sites \(a, b\) predict hc_prodromal_pd "
                       r"\(HC / Prodromal / PD, ordered\) but the coordinator's configuration "
                       r"has data.target: pd_vs_hc \(HC / PD\): set data.target: "
                       r"hc_prodromal_pd in the coordinator's configuration, or each site's "
                       r"data.target to pd_vs_hc$"):
        _round(same, monkeypatch, PD_VS_HC)


def test_the_coordinator_checks_its_own_target_unless_it_reads_a_table():
    from safn.server.site_targets import TargetMismatch, configured_target, run_target

    assert configured_target(load_config(None, ["data.target=hy_stage"])) == HY_STAGE
    table = load_config(None, ["data.source=table", "data.path=x.csv", "data.mapping=m.yaml"])
    assert configured_target(table) is None
    labelled = Target("label", ("HC", "early", "late"), ordered=True)
    assert run_target({"a": labelled, "b": labelled}, None) == labelled
    # a binary table's sites and the default binary coordinator agree, as before targets
    binary_table = Target("label", ("HC", "PD"))
    assert run_target({"a": binary_table}, PD_VS_HC) == binary_table
    with pytest.raises(TargetMismatch, match="give the coordinator the sites' table"):
        run_target({"a": labelled}, PD_VS_HC)
    from safn.server.app import RUN_STOPPERS

    assert any(issubclass(TargetMismatch, s) for s in RUN_STOPPERS)


# ------------------------------------------------------------------ personalisation's codes


def test_a_validation_split_too_small_is_named_with_every_class():
    from safn.client.personal_replies import reason_text

    binary = {"code": "validation_too_small", "class_counts": [3, 12], "min_cell": 5}
    assert reason_text(binary, short=True) == ("its validation split has 3 / 12 participants "
                                               "per class, fewer than min_cell = 5")
    three = dict(binary, class_counts=[9, 2, 14])
    assert reason_text(three, short=True).startswith("its validation split has 9 / 2 / 14 ")


def test_a_k_class_personal_comparison_travels_and_pools_as_k_by_k_counts():
    from safn_core.federation.personal_comparison import Comparison, pooled_from_confusion
    from safn_core.federation.personal_wire import (comparison_from_metrics,
                                                    comparison_to_metrics)
    from safn_core.federation.secure_records import personalise_packing, personalise_values

    assert personalise_packing(3).field("global").shape == (4,)  # binary as before
    assert personalise_packing(3, n_classes=3).field("global").shape == (9,)
    c = np.array([[5, 1, 0], [1, 6, 1], [0, 1, 9]])
    metrics = {"balanced_accuracy": 0.8, "accuracy": 0.83, "qwk": 0.9, "roc_auc": 0.95}
    comp = Comparison("a", "fine_tune", [6, 8, 10], True, {"global": metrics,
                                                          "personal": metrics},
                      {"global": c.ravel().tolist(), "personal": c.ravel().tolist()}, {})
    m = comparison_to_metrics(comp, secure=False)
    assert "global-sensitivity" not in m and m["global-qwk"] == 0.9
    back = comparison_from_metrics(m)
    assert back["personal"] == metrics and back["confusion"]["global"] == c.ravel().tolist()
    refused = Comparison.refused("b", "fine_tune", "no budget", 3)
    assert comparison_to_metrics(refused, secure=False)["global-confusion"] == [0] * 9
    assert personalise_values(refused.confusion, False, 3)["global"].shape == (9,)
    pooled = pooled_from_confusion({"global": (2 * c).ravel().tolist(),
                                    "personal": c.ravel().tolist()}, 5, ordered=True)
    assert pooled["n"] == 48 and pooled["global"]["qwk"] is not None
    assert pooled["global"]["balanced_accuracy"] == pytest.approx(
        np.mean([5 / 6, 6 / 8, 9 / 10]))
    assert pooled_from_confusion({"global": c.ravel().tolist(),
                                  "personal": c.ravel().tolist()}, 7) is None  # HC: 6 < 7
    binary = pooled_from_confusion({"global": [8, 2, 9, 1], "personal": [9, 1, 9, 1]}, 5)
    assert set(binary["global"]) == {"balanced_accuracy", "sensitivity", "specificity"}


def test_the_partition_summary_counts_every_class():
    from safn.simulations.partition import partition, summary

    cohort = kclass_cohort(300)
    parts = partition(cohort, "dirichlet", 3, alpha=1.0, seed=0)
    assert sum(len(v) for v in parts.values()) == 300
    table = summary(cohort, parts)
    assert list(table.columns) == ["site", "participants", "HC", "Prodromal", "PD", "% HC",
                                   "% Prodromal", "% PD"]
    assert table[["HC", "Prodromal", "PD"]].sum().tolist() == [100, 100, 100]
    binary = kclass_cohort(100, PD_VS_HC)
    assert list(summary(binary, partition(binary, "iid", 2)).columns) == [
        "site", "participants", "PD", "HC", "% PD"]


# ------------------------------------------------------------------ end to end


SMALL = ["model.d_model=16", "model.n_heads=2", "model.encoder_hidden=16", "model.ffn_hidden=16",
         "model.head_hidden=16", "federation.local_epochs=1", "data.min_cell=3"]


def test_a_three_class_federation_runs_end_to_end_on_flower(tmp_path):
    """safn-sim with ``data.target: hc_prodromal_pd`` on 5 natural sites, under secure
    aggregation (the default): the sites' summed class counts, K-output models on both ends,
    K-class pooled metrics per round, the bundle's target and the comparison's K-class rows."""
    out = tmp_path / "run"
    sets = ["data.target=hc_prodromal_pd", "synth.n_prodromal=300", "federation.rounds=2",
            f"simulation.site_state_dir={tmp_path / 'state'}", *SMALL]
    proc = subprocess.run([str(BIN / "safn-sim"), "--out", str(out),
                           *[x for s in sets for x in ("--set", s)]],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "securely summed" in proc.stdout and "QWK" in proc.stdout
    results = json.loads((out / "results.json").read_text())
    assert list(results["sites"][0])[:5] == ["site", "participants", "HC", "Prodromal", "PD"]
    history = json.loads((out / "history.json").read_text())
    assert [e["round"] for e in history] == [0, 1, 2]  # round 0: the logistic floor
    for entry in history:
        pooled = entry["pooled"]
        assert np.array(pooled["confusion"]).shape == (3, 3)
        assert list(pooled["per_class"]) == ["HC", "Prodromal", "PD"]
        assert 0.5 < pooled["roc_auc"] <= 1 and pooled["qwk"] is not None
    chosen = results["federated_selected_round"]["pooled"]
    assert chosen["qwk"] is not None and chosen["balanced_accuracy"] > 1 / 3
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    stats = next(e for e in events if e["event"] == "statistics")
    assert len(stats["class_counts"]) == 3
    bundle = json.loads((out / "model" / "bundle.json").read_text())
    assert bundle["target"]["name"] == "hc_prodromal_pd"
    rows = {r["kind"]: r for r in results["comparison"]["rows"]}
    assert {"pooled", "federated", "federated-lr", "pooled-lr"} <= set(rows)
    assert all(rows[k]["qwk"] is not None and rows[k]["roc_auc_ci"] for k in
               ("pooled", "federated"))


@pytest.mark.slow  # ~90 s: certificates, three downloads, a SuperLink and three SuperNodes
def test_a_three_class_federation_through_real_flower_processes(tmp_path):
    """safn-server (flower-superlink, TLS, site authentication) and three safn-client sites
    (flower-supernode), each with ``data.target: hc_prodromal_pd`` on its own PPMI-format
    download, as is the coordinator: the run completes with K-class metrics and bundle."""
    import yaml

    from tests.deploy_harness import ROOT, SITES, env, federations

    root = tmp_path / "material"
    subprocess.run([sys.executable, str(ROOT / "deploy" / "make_certs.py"), "--out",
                    str(root / "certs"), "--sites", *SITES, "--hosts", "127.0.0.1",
                    "localhost"], check=True, capture_output=True, env=env())
    subprocess.run([str(BIN / "safn-synth"), "--out", str(root / "data"), "--per-site",
                    "--set", "synth.n_sites=3", "--set", "synth.min_site_size=60",
                    "--set", "synth.n_prodromal=150"], check=True, capture_output=True,
                   env=env())
    app_hash = subprocess.run([str(BIN / "safn-server"), "--app-hash"], check=True,
                              capture_output=True, text=True, env=env()).stdout.strip()
    material = {"root": root, "certs": root / "certs", "app_hash": app_hash,
                "downloads": dict(zip(SITES, sorted(p for p in (root / "data").iterdir()
                                                    if p.is_dir())))}

    def with_target(path: Path) -> None:
        tree = yaml.safe_load(path.read_text())
        tree.setdefault("data", {})["target"] = "hc_prodromal_pd"
        path.write_text(yaml.safe_dump(tree))

    with federations(material, tmp_path / "deploy") as make:
        fed = make(rounds=2)
        with_target(fed.server_yaml)
        for name in SITES:
            with_target(fed.site_yaml(name))
        server = fed.server()
        server.wait_for_output(r"run \d+ submitted", 240)
        sites = [fed.site(name) for name in SITES]
        assert server.wait(300) == 0, server.output()[-4000:]
        assert all(site.wait(120) == 0 for site in sites)
    assert all(re.search(r"class counts HC \d+ / Prodromal \d+ / PD \d+\)", site.output())
               for site in sites)
    out = server.output()
    assert "run completed after round 2" in out and "QWK" in out
    history = fed.history()
    assert [e["round"] for e in history] == [0, 1, 2]
    assert all(list(e["pooled"]["per_class"]) == ["HC", "Prodromal", "PD"] for e in history)
    bundle = json.loads((fed.run_dir / "model" / "bundle.json").read_text())
    assert bundle["target"]["classes"] == ["HC", "Prodromal", "PD"]


def test_leave_one_site_out_summarises_k_class_metrics_leaving_undefined_ones_out():
    from safn.simulations.loso import LOSO_KCLASS, summarise_loso

    df = pd.DataFrame({"held_out": ["a", "b", "c"], "n": [10, 12, 9],
                       "roc_auc": [0.9, 0.8, 0.7], "balanced_accuracy": [0.6, 0.7, 0.8],
                       "qwk": [0.5, None, 0.7], "macro_f1": [0.5, 0.6, 0.7],
                       "mae": [0.2, 0.3, 0.4]})
    summary = summarise_loso(df)
    assert list(summary) == list(LOSO_KCLASS)
    assert summary["qwk"]["mean"] == pytest.approx(0.6)
    assert summary["roc_auc"]["sd"] == pytest.approx(0.1)
    assert summarise_loso(df, "floor_") == {}
