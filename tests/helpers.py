"""Small cohorts built in memory for fast tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from safn_core.config import ModelConfig
from safn_core.data.cohort import Modality
from safn_core.data.table_loader import load_table
from safn_core.training.local import Arrays

MAPPING = """\
id: subject
site: centre
label: {column: dx, positive: PD, negative: HC}
modalities:
  imaging: {side: imaging, columns: ["ct_*"]}
  clinical: {side: clinical, columns: ["cl_*"]}
  demographics: {side: clinical, columns: [age]}
"""


def toy_table(n: int = 240, seed: int = 0, effect: float = 1.0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.75).astype(int)
    df = pd.DataFrame({"subject": [f"S{i:04d}" for i in range(n)],
                       "centre": rng.choice(["A", "B", "C"], n),
                       "dx": np.where(y == 1, "PD", "HC")})
    for j in range(6):
        df[f"ct_{j}"] = rng.normal(2.5, 0.2, n) + 0.05 * y
    for j in range(3):
        df[f"cl_{j}"] = rng.normal(10, 3, n) + 3 * effect * y
    df["age"] = rng.normal(60, 10, n)
    df.loc[rng.random(n) < 0.1, "cl_0"] = np.nan
    return df


def write_toy(tmp_path: Path, **kw) -> tuple[Path, Path]:
    csv, mapping = tmp_path / "cohort.csv", tmp_path / "mapping.yaml"
    toy_table(**kw).to_csv(csv, index=False)
    mapping.write_text(MAPPING)
    return csv, mapping


def toy_cohort(tmp_path: Path, **kw):
    csv, mapping = write_toy(tmp_path, **kw)
    return load_table(csv, mapping)


SMALL_MODEL = ["model.d_model=16", "model.n_heads=2", "model.encoder_hidden=16",
               "model.ffn_hidden=16", "model.head_hidden=16", "federation.local_epochs=1",
               "data.min_cell=3"]
"""Config overrides for a small, fast federation in tests."""


def truncate_checkpoints(run_dir: Path, keep_round: int) -> None:
    """Make a run folder look as if its coordinator stopped after ``keep_round``."""
    folder = Path(run_dir) / "checkpoints"
    for f in folder.glob("round_*"):
        if int(f.stem.split("_")[1]) > keep_round:
            f.unlink()
    (folder / "latest.json").write_text(json.dumps({"round": keep_round,
                                                    "stem": f"round_{keep_round:04d}"}))


# Two modalities of 3 + 2 features and a tiny SAFN: arrays for fast training-loop tests.
TWO_MODALITIES = (Modality("a", ("a0", "a1", "a2"), "imaging"),
                  Modality("b", ("b0", "b1"), "clinical"))
TINY_MODEL = ModelConfig(d_model=8, n_heads=2, encoder_hidden=8, ffn_hidden=8, head_hidden=8)


def shifted_arrays(n: int, seed: int) -> Arrays:
    """``n`` participants of `TWO_MODALITIES`, ~60 % positive, features shifted by 0.8 with the
    label (a learnable, not separable signal)."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.6).astype(np.int64)
    x = rng.normal(size=(n, 5)).astype(np.float32) + 0.8 * y[:, None]
    return Arrays(x, np.ones((n, 2), dtype=bool), y)


class DroppingRecorder:
    """The coordinator's Grid, recording every message sent and reply received; it loses one training site's replies in
    round 2's training and in every retry of that sum (the site dropped out after the key
    exchange). ``lost_site_index``: which of the round's sites (by node id order) drops."""

    def __init__(self, grid, lost_site_index: int = 0):
        self._grid, self._lost_index = grid, lost_site_index
        self.replies, self.sent, self.lost, self.dropped = [], [], None, 0

    def __getattr__(self, name):
        return getattr(self._grid, name)

    def send_and_receive(self, messages, *args, **kwargs):
        messages = list(messages)
        self.sent.extend(messages)
        drop = False
        for m in messages:
            cfg = m.content.config_records.get("config")
            if cfg is None:
                continue
            ctx = json.loads(str(cfg["secagg-context"])) if "secagg-context" in cfg else {}
            drop = drop or (ctx.get("name") == "train" and ctx.get("round") == 2)
        if drop and self.lost is None:
            self.lost = sorted(m.metadata.dst_node_id for m in messages)[self._lost_index]
        out = []
        for reply in self._grid.send_and_receive(messages, *args, **kwargs):
            if drop and reply.metadata.src_node_id == self.lost:
                self.dropped += 1
                continue
            self.replies.append(reply)
            out.append(reply)
        return out


def virtual_run(tmp_path: Path, cfg):
    """A run folder for an in-process simulation of ``cfg``: its config and virtual sites
    written as safn-sim writes them; returns (run folder, cohort, the sites' participants)."""
    from safn_core.config import dump_config
    from safn_core.data.sources import load_cohort
    from safn_core.federation.run_folder import write_config
    from safn.simulations.compare import build_sites
    from safn.simulations.virtual_sites import write_virtual_sites

    run_dir = Path(tmp_path) / "run"
    run_dir.mkdir()
    cohort = load_cohort(cfg.data, cfg.synth)
    parts = build_sites(cohort, cfg)
    write_config(run_dir, dump_config(cfg))
    write_virtual_sites(run_dir, cohort, parts)
    return run_dir, cohort, parts
