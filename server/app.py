"""The SAFN ServerApp: the coordinator's side of a run, thin over `safn_core.federation`.

A run: wait (bounded) for ``min_sites`` sites, a statistics round (Grid QUERY messages; the sites'
training-split sums build one global preprocessing and the loss's class counts), then the
strategy's rounds; after each round, pooled and per-site metrics from the sites' score
histograms and a checkpoint. A run folder that already holds checkpoints is resumed from its
last complete round. At the end the model bundle (same format as safn-train) is written to
``<run folder>/model``.

The run folder comes from the run config key ``run-dir`` (deployment: ``flwr run --run-config``)
or the ``SAFN_RUN_DIR`` environment variable (``run_simulation``, whose run config is empty); it
holds the resolved ``config.yaml``.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from safn_core.config import SafnConfig
from safn_core.federation.aggregate import (global_preprocessing, held_out_metrics,
                                            modalities_from_record, round_line,
                                            round_metrics)
from safn_core.federation.checkpoint import RunState, load_checkpoint, save_checkpoint
from safn_core.federation.privacy_report import central_entry, privacy_entry, privacy_summary
from safn_core.federation.run_folder import (expected_sites, load_run_config, run_dir_from,
                                            run_identity)
from safn_core.federation.shared_config import shared_config_text
from safn_core.federation.site import state_to_numpy
from safn_core.federation.wire import KEY as WIRE_KEY
from safn_core.federation.wire import Layout
from safn_core.io import write_json
from safn_core.metrics import METRICS
from safn_core.preprocess import FeatureStats, Preprocessor
from safn_core.training.local import make_model
from server.strategies import SitesMissing, make_strategy, wait_for_nodes, with_central_dp

app = ServerApp()


def wait_for_sites(grid: Grid, expected: int, min_sites: int, timeout: float,
                   report=print) -> list[int]:
    """Node ids once all ``expected`` sites are connected, or, when ``timeout`` passes first,
    the ``min_sites`` or more that are; Flower's own wait has no upper bound."""
    try:
        return wait_for_nodes(grid, expected, timeout, lambda nid: True,
                              "at the start of the run")
    except SitesMissing:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) < min_sites:
            raise
        report(f"{len(nodes)} of {expected} expected sites connected after {timeout:.0f} s; "
               f"starting with them (min_sites = {min_sites})")
        return nodes


class Described:
    """What the statistics round returned: per-site sums, names, data structure, refusals."""

    def __init__(self):
        self.stats: list[FeatureStats] = []
        self.counts: list[list[int]] = []
        self.names: dict[int, str] = {}
        self.eligible: set[int] = set()
        self.refused: dict[str, str] = {}
        self.structure: ConfigRecord | None = None
        self.held_out: set[int] = set()  # nodes that only evaluate (external validation)


def statistics_round(grid: Grid, nodes: list[int], timeout: float, shared_text: str,
                     min_sites: int = 1, held_out_sites: tuple[str, ...] = ()) -> Described:
    """Ask every site for its training-split statistics (a QUERY message, before training)."""
    config = {"task": "describe", "safn-config": shared_text,
              "held-out-sites": list(held_out_sites)}
    messages = [Message(RecordDict({"config": ConfigRecord(config)}),
                        dst_node_id=nid, message_type=MessageType.QUERY) for nid in nodes]
    out = Described()
    for reply in grid.send_and_receive(messages, timeout=timeout):
        nid = reply.metadata.src_node_id
        if reply.has_error():
            out.refused[f"node {nid}"] = reply.error.reason
            continue
        site = reply.content["site"]
        out.names[nid] = name = str(site["name"])
        if not site["ok"]:
            out.refused[name] = str(site["reason"])
            continue
        if out.structure is None:
            out.structure = site
        elif list(site["features"]) != list(out.structure["features"]):
            raise SitesMissing(f"site {name} describes other features than the first site; "
                               "sites must share one data contract to federate")
        if site.get("held-out", False):
            out.held_out.add(nid)
            continue
        arr = reply.content["stats"]
        out.stats.append(FeatureStats(tuple(site["features"]), arr["count"].numpy(),
                                      arr["total"].numpy(), arr["total_sq"].numpy()))
        m = reply.content["metrics"]
        out.counts.append([int(m["class-0"]), int(m["class-1"])])
        out.eligible.add(nid)
    if len(out.stats) < min_sites:
        raise SitesMissing(f"{len(out.stats)} sites sent statistics, fewer than min_sites = "
                           f"{min_sites}" + "".join(f"; {k}: {v}" for k, v in out.refused.items()))
    return out


class Coordinator:
    """One federated run on a Grid, with checkpoints after every round."""

    def __init__(self, grid: Grid, cfg: SafnConfig, run_dir: Path, report=print):
        self.grid, self.cfg, self.run_dir, self.report = grid, cfg, Path(run_dir), report
        self.fed = cfg.federation
        self.shared_text = shared_config_text(cfg)  # what every message tells the sites

    # -- phases ------------------------------------------------------------------------------

    def run(self) -> RunState:
        fed = self.fed
        random.seed(self.cfg.train.seed)  # anything left to Flower's random.sample is seeded
        t0 = time.perf_counter()
        # a simulation waits for every virtual site (they register one by one), a deployment
        # for every listed site, or min_sites once federation.wait_for_sites has passed
        expected = max(fed.min_sites, len(expected_sites(self.run_dir) or self.cfg.server.sites))
        nodes = wait_for_sites(self.grid, expected, fed.min_sites, fed.wait_for_sites,
                               self.report)
        desc = statistics_round(self.grid, nodes, fed.round_timeout, self.shared_text,
                                fed.min_sites, tuple(self.cfg.server.held_out_sites))
        self.held_out = {desc.names[n] for n in desc.held_out}
        if self.held_out:
            self.report("held-out sites (evaluation only): " + ", ".join(sorted(self.held_out)))
        self.timing = {"statistics_round_s": time.perf_counter() - t0}
        self._t_last = time.perf_counter()
        for name, why in desc.refused.items():
            self.report(f"site {name} withheld its statistics: {why}")
        self.modalities = modalities_from_record(desc.structure)
        self.label_names = tuple(desc.structure["label-names"])
        self.state = self._initial_state(desc)
        self.state.sites = {str(k): v for k, v in desc.names.items()}
        if self.state.round < fed.rounds:
            self._train(desc)
        self._finish()
        return self.state

    def _initial_state(self, desc: Described) -> RunState:
        pre, class_counts = global_preprocessing(self.modalities, desc.stats, desc.counts)
        state = load_checkpoint(self.run_dir)
        if state is None:
            model = make_model(self.modalities, self.cfg.model, self.cfg.train.seed)
            self.report(f"statistics round: {sum(map(sum, desc.counts))} training participants "
                        f"at {len(desc.stats)} sites; class counts {class_counts}")
            return RunState(0, state_to_numpy(model), pre.state_dict(), class_counts)
        self.report(f"resuming after round {state.round} of {self.fed.rounds}")
        saved = np.asarray(state.preprocessing["mean"])
        if saved.shape != pre.mean_.shape or not np.allclose(pre.mean_, saved):
            self.report("note: the sites' data changed since the checkpoint; the run keeps the "
                        "checkpoint's preprocessing")
        return state

    def _train(self, desc: Described) -> None:
        fed = self.fed
        pre = Preprocessor.from_state(self.state.preprocessing)
        strategy = make_strategy(fed, self.cfg.train.seed)
        strategy.round_offset = self.state.round
        strategy.site_names = dict(desc.names)
        strategy.eligible = set(desc.eligible)
        strategy.evaluators = set(desc.eligible) | set(desc.held_out)
        strategy.set_state(self.state.strategy_state)
        self.strategy = strategy
        # central DP wraps the strategy (Flower's server-side clipping + noise); the wrapper
        # reads and records through `strategy`, which the history below keeps using
        runner = with_central_dp(strategy, fed, len(desc.eligible))
        config = ConfigRecord({
            "pre-mean": pre.mean_.tolist(), "pre-scale": pre.scale_.tolist(),
            "class-counts": [int(c) for c in self.state.class_counts],
            "local-epochs": fed.local_epochs, "seed": self.cfg.train.seed,
            "histogram-bins": fed.histogram_bins, "safn-config": self.shared_text,
            "held-out-sites": sorted(self.held_out),
            # stable across a resume (unlike Flower's run id): DP sites key their plan on it
            "run-id": run_identity(self.run_dir),
        })
        self.layout = Layout.of(self.state.weights)  # the model travels as one vector
        config["model-layout"] = self.layout.fingerprint()
        arrays = ArrayRecord({WIRE_KEY: Array(self.layout.flatten(self.state.weights))})
        runner.start(grid=self.grid, initial_arrays=arrays,
                     num_rounds=fed.rounds - self.state.round, timeout=fed.round_timeout,
                     train_config=config, evaluate_config=ConfigRecord(dict(config)),
                     evaluate_fn=self._end_of_round)

    def _end_of_round(self, server_round: int, arrays: ArrayRecord):
        """After each round: pooled/per-site metrics from histograms, then a checkpoint."""
        if server_round == 0:
            return None
        s = self.strategy
        r = s.round_offset + server_round
        entry: dict = {"round": r}
        if s.last_train:
            # a DP site withholds its training loss (−1): outside its ε
            losses = [(float(m["num-examples"]), float(m["train-loss"]))
                      for m in s.last_train.values() if float(m["train-loss"]) >= 0]
            if losses:
                entry["train_loss"] = float(np.average([lo for _, lo in losses],
                                                       weights=[n for n, _ in losses]))
            entry["sites_trained"] = sorted(s.last_train)
        privacy = privacy_entry(s.last_privacy)
        if privacy:
            entry["privacy"] = privacy  # ε per site (spent so far), never averaged
        refused = sorted(({"site": x["site"], "reason": x["reason"]} for x in s.refusals
                          if x["round"] == r), key=lambda x: x["site"])
        if refused:
            entry["refused"] = refused
        if r in s.central:
            entry["central_dp"] = central_entry(s.central[r], self.state.history,
                                                self.fed.central_dp.delta)
        hists = {name: {"val": np.array([m["val-neg"], m["val-pos"]], dtype=np.int64),
                        "test": np.array([m["test-neg"], m["test-pos"]], dtype=np.int64),
                        "withheld": bool(m["withheld"])}
                 for name, m in s.last_evaluate.items()}
        external = {k: hists.pop(k) for k in list(hists) if k in self.held_out}
        if hists:
            entry.update(round_metrics(hists))
        if external:  # external validation at the pooled threshold of the training sites
            entry["held_out"] = held_out_metrics(external, entry.get("threshold", 0.5))
        entry["rejected"] = [x for x in s.rejected if x["round"] == r]
        now = time.perf_counter()
        entry["seconds"], self._t_last = now - self._t_last, now
        self.state = RunState(r, self.layout.unflatten(arrays[WIRE_KEY].numpy()),
                              self.state.preprocessing, self.state.class_counts, s.get_state(),
                              self.state.history + [entry], self.state.sites)
        save_checkpoint(self.run_dir, self.state)
        write_json(self.run_dir / "history.json", self.state.history)
        self.report(round_line(entry, self.fed.rounds))
        return None

    def _finish(self) -> None:
        """The model bundle (weights + preprocessing + config + metrics) and per-round tables."""
        write_json(self.run_dir / "history.json", self.state.history)
        write_json(self.run_dir / "timing.json", self.timing)
        rounds_table(self.state.history).to_csv(self.run_dir / "rounds.csv", index=False)
        if (self.run_dir / "model").exists():
            return
        from safn_core.bundle import save_bundle

        pre = Preprocessor.from_state(self.state.preprocessing)
        model = make_model(pre.modalities, self.cfg.model, 0)
        model.load_state_dict({k: torch.as_tensor(v) for k, v in self.state.weights.items()})
        last = self.state.history[-1] if self.state.history else {}
        pooled = last.get("pooled") or {}
        save_bundle(self.run_dir / "model", model, pre, self.cfg,
                    threshold=last.get("threshold", 0.5), class_counts=self.state.class_counts,
                    label_names=self.label_names, kind="federated",
                    metrics={"federated_pooled_test": {k: {"mean": v, "sd": None}
                                                       for k, v in pooled.items()},
                             **{f"held_out_{name}": {k: {"value": m[k], "ci": m["ci"][k]}
                                                     for k in METRICS}
                                for name, m in (last.get("held_out") or {}).items() if m}},
                    extra={"privacy": privacy_summary(self.state.history),
                           "run_id": run_identity(self.run_dir),
                           "training": {
                        "participants": int(sum(self.state.class_counts)),
                        "sites": sorted(set(self.state.sites.values()) - self.held_out),
                        "held_out_sites": sorted(self.held_out), "rounds": self.state.round,
                        "strategy": self.fed.strategy, "local_epochs": self.fed.local_epochs,
                        "evaluated_on": f"{last.get('n_test', 0)} test participants at "
                                        f"{last.get('sites_reported', 0)} sites (score "
                                        "histograms; sites below min_cell withheld)"}})


def rounds_table(history: list[dict]) -> pd.DataFrame:
    """One row per round and site ('pooled' included): the metric history as a table."""
    rows = []
    for e in history:
        base = {"round": e["round"], "train_loss": e.get("train_loss"),
                "threshold": e.get("threshold")}
        if e.get("pooled"):
            rows.append({**base, "site": "pooled", "n_test": e.get("n_test"), **e["pooled"]})
        privacy = e.get("privacy") or {}
        for site, m in (e.get("sites") or {}).items():
            eps = (privacy.get(site) or {}).get("epsilon")
            rows.append({**base, "site": site, **(m or {"withheld": True}),
                         **({"epsilon": eps} if privacy else {})})
    return pd.DataFrame(rows)


@app.main()
def main(grid: Grid, context: Context) -> None:
    torch.set_num_threads(1)
    run_dir = run_dir_from(dict(context.run_config))
    cfg = load_run_config(run_dir)
    progress = run_dir / "progress.log"
    if "run-dir" in context.run_config:  # deployment (flwr run), not run_simulation
        from safn_flower import patches

        patches.apply({"serverapp_grid_polling": {"interval": cfg.server.poll_interval},
                       "object_pull_backoff": {}})

    def report(line: str) -> None:
        with progress.open("a") as fh:
            fh.write(line + "\n")
        print(line, flush=True)

    try:
        state = Coordinator(grid, cfg, run_dir, report).run()
    except SitesMissing as exc:
        report(f"run stopped: {exc}; checkpoints kept in {run_dir / 'checkpoints'}")
        write_json(run_dir / "federation_status.json", {"status": "failed", "reason": str(exc)})
        return
    write_json(run_dir / "federation_status.json", {"status": "completed", "round": state.round})
