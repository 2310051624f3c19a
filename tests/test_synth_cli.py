"""The issue's acceptance path through the real commands: safn-synth, then safn-check."""

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

BIN = Path(sys.executable).parent


def test_synth_then_check_gives_the_reference_cohort(tmp_path):
    out, export = tmp_path / "dl", tmp_path / "participants.csv"
    synth = subprocess.run([str(BIN / "safn-synth"), "--out", str(out)], capture_output=True,
                           text=True, timeout=300)
    assert synth.returncode == 0, synth.stderr
    check = subprocess.run([str(BIN / "safn-check"), "--data", str(out), "--export", str(export)],
                           capture_output=True, text=True, timeout=300)
    assert check.returncode == 0, check.stderr
    assert "kept 703 participants: 570 PD, 133 HC" in check.stdout
    table = pd.read_csv(export)
    assert len(table) == 703 and table.participant_id.is_unique
    assert (table.label == 1).sum() == 570 and (table.label == 0).sum() == 133
    lh = [c for c in table.columns if c.startswith("lh_")]
    assert len(lh) == 34 and "EstimatedTotalIntraCranialVol" in table.columns
    pd_rows, hc_rows = table[table.label == 1], table[table.label == 0]
    assert pd_rows.NP3TOT.mean() == pytest.approx(20.9, abs=2.0)
    assert hc_rows.NP3TOT.mean() == pytest.approx(1.2, abs=0.8)
    assert pd_rows.UPSIT.mean() == pytest.approx(22.4, abs=2.0)
    assert hc_rows.UPSIT.mean() == pytest.approx(34.0, abs=1.5)
    assert pd_rows.AGE.mean() == pytest.approx(61.7, abs=2.0)
    assert table[lh].mean(axis=1).mean() == pytest.approx(2.4, abs=0.15)
    assert table.site.nunique() == 5
    # the synthetic folder is never overwritten by a second call
    again = subprocess.run([str(BIN / "safn-synth"), "--out", str(out)], capture_output=True,
                           text=True, timeout=120)
    assert again.returncode == 2 and "Traceback" not in again.stderr


def test_synth_per_site_writes_one_download_per_site(tmp_path):
    out = tmp_path / "sites"
    proc = subprocess.run([str(BIN / "safn-synth"), "--per-site", "--out", str(out),
                           "--set", "synth.n_pd=80", "--set", "synth.n_hc=40",
                           "--set", "synth.n_without_mri=20", "--set", "synth.n_sites=3"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    sites = sorted(p for p in out.iterdir() if p.is_dir())
    assert len(sites) == 3
    from safn_core.data.ppmi_loader import load_ppmi
    cohorts = [load_ppmi(s) for s in sites]
    ids = [set(c.ids) for c in cohorts]
    assert sum(len(i) for i in ids) == 120 and len(set().union(*ids)) == 120
    for c in cohorts:
        assert c.table.site.nunique() == 1
