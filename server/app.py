"""The SAFN ServerApp: the coordinator's side of a run, thin over `safn_core.federation`.

A run: wait for the sites, a statistics round (Grid query messages; the sites' training-split
sums build one global preprocessing and the loss's class counts), then the strategy's rounds;
after each round, pooled and per-site metrics from the sites' score histograms and a checkpoint.
A run folder that already holds checkpoints is resumed from its last complete round.
"""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from safn_core.config import SafnConfig
from safn_core.data.cohort import Modality
from safn_core.federation.aggregate import global_preprocessing, round_metrics
from safn_core.federation.checkpoint import RunState, load_checkpoint, save_checkpoint
from safn_core.federation.runfiles import load_run_config, run_dir_from
from safn_core.federation.site import state_to_numpy
from safn_core.io import write_json
from safn_core.preprocess import FeatureStats, Preprocessor
from safn_core.training.local import make_model
from server.strategies import make_strategy

app = ServerApp()
log = logging.getLogger("safn.server")


class SitesMissing(RuntimeError):
    """Fewer than ``min_sites`` sites connected within the configured wait."""


def wait_for_sites(grid: Grid, min_sites: int, timeout: float) -> list[int]:
    """Node ids once ``min_sites`` are connected; Flower's own wait has no upper bound."""
    deadline = time.monotonic() + timeout
    while True:
        nodes = list(grid.get_node_ids())
        if len(nodes) >= min_sites:
            return nodes
        if time.monotonic() > deadline:
            raise SitesMissing(f"only {len(nodes)} of the {min_sites} sites needed connected "
                               f"within {timeout:.0f} s")
        time.sleep(0.2)


def statistics_round(grid: Grid, nodes: list[int], cfg: SafnConfig, timeout: float):
    """Ask every site for its training-split statistics; build the global preprocessing."""
    messages = [Message(RecordDict({"config": ConfigRecord({"task": "describe"})}),
                        dst_node_id=nid, message_type=MessageType.QUERY) for nid in nodes]
    replies = grid.send_and_receive(messages, timeout=timeout)
    stats, counts, names, refused = [], [], {}, {}
    modalities = None
    for reply in replies:
        nid = reply.metadata.src_node_id
        if reply.has_error():
            refused[nid] = reply.error.reason
            continue
        site = reply.content["site"]
        names[nid] = str(site["name"])
        if not site["ok"]:
            refused[nid] = str(site["reason"])
            continue
        arr = reply.content["stats"]
        features = tuple(site["features"])
        stats.append(FeatureStats(features, arr["count"].numpy(), arr["total"].numpy(),
                                  arr["total_sq"].numpy()))
        m = reply.content["metrics"]
        counts.append([int(m["class-0"]), int(m["class-1"])])
    if not stats:
        raise SitesMissing("no site sent statistics: " + "; ".join(refused.values()))
    if len({s.features for s in stats}) != 1:
        raise RuntimeError("sites describe different feature lists; they cannot federate")
    return stats, counts, names, refused


def _modalities(cfg: SafnConfig, run_dir: Path, features: tuple[str, ...]) -> tuple[Modality, ...]:
    import json

    meta = run_dir / "sim" / "sites.json"
    if meta.is_file():
        mods = json.loads(meta.read_text())["modalities"]
        return tuple(Modality(m["name"], tuple(m["features"]), m["side"]) for m in mods)
    raise RuntimeError("the run folder does not describe the modalities")


class Coordinator:
    """One federated run on a Grid, with checkpoints after every round."""

    def __init__(self, grid: Grid, cfg: SafnConfig, run_dir: Path, report=print):
        self.grid, self.cfg, self.run_dir, self.report = grid, cfg, Path(run_dir), report
        self.fed = cfg.federation

    def run(self) -> RunState:
        fed = self.fed
        random.seed(self.cfg.train.seed)  # Flower samples nodes with random.sample
        nodes = wait_for_sites(self.grid, fed.min_sites, fed.round_timeout)
        stats, counts, names, refused = statistics_round(self.grid, nodes, self.cfg,
                                                         fed.round_timeout)
        for nid, why in refused.items():
            self.report(f"site {names.get(nid, nid)} withheld its statistics: {why}")
        modalities = _modalities(self.cfg, self.run_dir, stats[0].features)
        state = load_checkpoint(self.run_dir)
        if state is None:
            pre, class_counts = global_preprocessing(modalities, stats, counts)
            model = make_model(modalities, self.cfg.model, self.cfg.train.seed)
            state = RunState(0, state_to_numpy(model), pre.state_dict(), class_counts)
            self.report(f"statistics round: {sum(map(sum, counts))} training participants at "
                        f"{len(stats)} sites; class counts {class_counts}")
        else:
            self.report(f"resuming after round {state.round} of {fed.rounds}")
        state.sites = {str(k): v for k, v in names.items()}
        if state.round >= fed.rounds:
            return state
        self.state = state
        self.pre = Preprocessor.from_state(state.preprocessing)
        strategy = make_strategy(fed, len(nodes))
        strategy.round_offset = state.round
        strategy.site_names = names
        strategy.set_state(state.strategy_state)
        self.strategy = strategy
        config = ConfigRecord({
            "pre-mean": self.pre.mean_.tolist(), "pre-scale": self.pre.scale_.tolist(),
            "class-counts": [int(c) for c in state.class_counts],
            "local-epochs": fed.local_epochs, "seed": self.cfg.train.seed,
            "histogram-bins": fed.histogram_bins,
        })
        arrays = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in state.weights.items()})
        strategy.start(grid=self.grid, initial_arrays=arrays,
                       num_rounds=fed.rounds - state.round, timeout=fed.round_timeout,
                       train_config=config, evaluate_config=ConfigRecord(dict(config)),
                       evaluate_fn=self._end_of_round)
        return self.state

    def _end_of_round(self, server_round: int, arrays: ArrayRecord):
        """After each round: pooled/per-site metrics from histograms, then a checkpoint."""
        if server_round == 0:
            return None
        r = self.strategy.round_offset + server_round
        site_hists = {}
        for nid, m in self.strategy.last_evaluate.items():
            name = self.strategy.site_names.get(nid, str(nid))
            site_hists[name] = {
                "val": np.array([m["val-neg"], m["val-pos"]], dtype=np.int64),
                "test": np.array([m["test-neg"], m["test-pos"]], dtype=np.int64),
                "val_withheld": bool(m["withheld"]), "test_withheld": bool(m["withheld"]),
            }
        entry = {"round": r, "sites_evaluated": len(site_hists),
                 "rejected": [x for x in self.strategy.rejected if x["round"] == r]}
        if site_hists:
            entry.update(round_metrics(site_hists))
        self.state = RunState(r, {k: a.numpy() for k, a in arrays.items()},
                              self.state.preprocessing, self.state.class_counts,
                              self.strategy.get_state(), self.state.history + [entry],
                              self.state.sites)
        save_checkpoint(self.run_dir, self.state)
        self.report(_round_line(entry, self.fed.rounds))
        return None


def _round_line(entry: dict, rounds: int) -> str:
    text = f"round {entry['round']:>3}/{rounds}"
    if "pooled" in entry:
        p = entry["pooled"]
        text += (f"  pooled ROC-AUC {p['roc_auc']:.3f}  PR-AUC {p['pr_auc_pd']:.3f}  "
                 f"bal acc {p['balanced_accuracy']:.3f}  ({entry['sites_evaluated']} sites, "
                 f"{entry['n_test']} test participants)")
    for x in entry.get("rejected", []):
        text += f"\n  rejected update from site {x['site']}: {x['reason']}"
    return text


@app.main()
def main(grid: Grid, context: Context) -> None:
    torch.set_num_threads(1)
    run_dir = run_dir_from(dict(context.run_config))
    cfg = load_run_config(run_dir)
    progress = run_dir / "progress.log"

    def report(line: str) -> None:
        with progress.open("a") as fh:
            fh.write(line + "\n")
        print(line, flush=True)

    try:
        state = Coordinator(grid, cfg, run_dir, report).run()
    except SitesMissing as exc:
        report(f"run stopped: {exc}; checkpoint kept in {run_dir / 'checkpoints'}")
        write_json(run_dir / "federation_status.json", {"status": "failed", "reason": str(exc)})
        return
    write_json(run_dir / "federation_status.json", {"status": "completed", "round": state.round})
