"""Malformed inputs through the real commands: one clear line, exit status 2, no traceback."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from safn_core.cli.check import run as check
from safn_core.cli.common import run_main
from tests.helpers import toy_table, write_toy
from tests.ppmi_fixtures import PEOPLE, Person, build_download


def scenario_table(tmp, mutate=None, mapping_text=None):
    csv, mapping = write_toy(tmp)
    if mutate is not None:
        df = toy_table()
        mutate(df)
        df.to_csv(csv, index=False)
    if mapping_text is not None:
        mapping.write_text(mapping_text(mapping.read_text()))
    return ["--data", str(csv), "--mapping", str(mapping)]


def _text_in_numeric(df):
    df["cl_1"] = df["cl_1"].astype(object)
    df.loc[4, "cl_1"] = "n.d."


def _duplicate(df):
    df.loc[9, "subject"] = df.loc[3, "subject"]


def _no_hc(df):
    df["dx"] = "PD"


def _few_hc(df):
    hc = df.index[df.dx == "HC"]
    df.loc[hc[3:], "dx"] = "PD"


def _out_of_range(df):
    df.loc[2, "age"] = 400


def _empty_modality(df):
    for j in range(6):
        df[f"ct_{j}"] = np.nan


def _wrong_label_values(df):
    df["dx"] = "unknown"


def write_file(tmp, name, data: bytes):
    p = tmp / name
    p.write_bytes(data)
    return p


CASES = {
    "data path missing": (lambda t: ["--data", str(t / "nowhere")], "no such file or folder"),
    "table without mapping": (lambda t: ["--data", str(write_toy(t)[0])], "--mapping"),
    "mapping unknown key": (lambda t: scenario_table(t, mapping_text=lambda s: s + "extra: 1\n"),
                            "unknown key 'extra'"),
    "mapping unreadable yaml": (lambda t: scenario_table(t, mapping_text=lambda s: "id: [x\n"),
                                "not valid YAML"),
    "mapping missing label": (lambda t: scenario_table(
        t, mapping_text=lambda s: s.replace("label: {column: dx, positive: PD, negative: HC}\n", "")),
        "missing required key 'label'"),
    "text in numeric column": (lambda t: scenario_table(t, _text_in_numeric),
                               "'cl_1' must be numeric"),
    "duplicate participant ids": (lambda t: scenario_table(t, _duplicate), "duplicate participant ids"),
    "empty class": (lambda t: scenario_table(t, _no_hc), "class HC has 0"),
    "class below min_cell": (lambda t: scenario_table(t, _few_hc), "fewer than min_cell"),
    "value out of range": (lambda t: scenario_table(
        t, _out_of_range, mapping_text=lambda s: s + "ranges: {age: [18, 110]}\n"),
        "outside the plausible range"),
    "modality entirely absent": (lambda t: scenario_table(t, _empty_modality),
                                 "missing modality imaging"),
    "no participant of either label": (lambda t: scenario_table(t, _wrong_label_values),
                                       "values found: unknown"),
    "label column missing": (lambda t: scenario_table(
        t, mapping_text=lambda s: s.replace("column: dx", "column: diagnosis")),
        "column 'diagnosis'"),
    "pattern matches nothing": (lambda t: scenario_table(
        t, mapping_text=lambda s: s.replace("ct_*", "mri_*")), "matches no column"),
    "table not utf-8": (lambda t: ["--data", str(write_file(t, "c.csv", "subject,dx\nS\xe9,PD\n".encode("latin-1"))),
                                   "--mapping", str(write_toy(t)[1])], "UTF-8"),
    "empty table": (lambda t: ["--data", str(write_file(t, "e.csv", b"")), "--mapping",
                               str(write_toy(t)[1])], "e.csv"),
    "unsupported format": (lambda t: ["--data", str(write_file(t, "c.xlsx", b"PK")),
                                      "--mapping", str(write_toy(t)[1])], "unsupported table format"),
    "corrupt parquet": (lambda t: ["--data", str(write_file(t, "c.parquet", b"nope")),
                                   "--mapping", str(write_toy(t)[1])], "cannot be read"),
    "config unknown key": (lambda t: ["--config", str(write_file(t, "c.yaml", b"data:\n  min_cel: 3\n")),
                                      *scenario_table(t)], "unknown key 'data.min_cel'"),
    "config unreadable yaml": (lambda t: ["--config", str(write_file(t, "c.yaml", b"data: [\n")),
                                          *scenario_table(t)], "not valid YAML"),
    "config wrong type": (lambda t: ["--set", "data.min_cell=few", *scenario_table(t)],
                          "data.min_cell"),
    "override without value": (lambda t: ["--set", "data.min_cell", *scenario_table(t)],
                               "dotted.key=value"),
    "config file missing": (lambda t: ["--config", str(t / "none.yaml"), *scenario_table(t)],
                            "config file not found"),
    "export would overwrite": (lambda t: [*scenario_table(t), "--export",
                                          str(write_file(t, "x.csv", b"keep me"))], "file exists"),
    "ppmi without status table": (lambda t: ["--data", str(build_download(t / "dl", skip=("status",)).root)],
                                  "status"),
    "ppmi garbled table": (lambda t: ["--data", str(_garbled(t))], "Participant_Status"),
    "ppmi without mri tables": (lambda t: ["--data", str(build_download(t / "dl", skip=("cth", "aseg")).root)],
                                "thickness"),
    "ppmi with one control": (lambda t: ["--data", str(build_download(
        t / "dl", people=PEOPLE + tuple(Person(2000 + i, "PD") for i in range(6))).root),
        "--set", "data.min_cell=3"], "class HC has 2"),
}


def _garbled(tmp: Path) -> Path:
    d = build_download(tmp / "dl")
    d.paths["status"].write_bytes(b"\x00\xff\xfe\x00garbage\x00\x81\x82")
    return d.root


@pytest.mark.parametrize("name", list(CASES))
def test_clear_error_without_traceback(name, tmp_path, capsys):
    make_args, fragment = CASES[name]
    args = make_args(tmp_path)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    code = run_main(check, args)
    captured = capsys.readouterr()
    assert code == 2, f"{name}: exit {code}\n{captured.err}"
    assert "Traceback" not in captured.err + captured.out
    assert fragment in captured.err, captured.err
    error_lines = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1
    for path, data in before.items():  # nothing the user had was changed
        assert path.read_bytes() == data


def test_console_script_exit_status_and_message(tmp_path):
    exe = Path(sys.executable).parent / "safn-check"
    proc = subprocess.run([str(exe), "--data", str(tmp_path / "missing")], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert "no such file or folder" in proc.stderr and "Traceback" not in proc.stderr


def test_check_passes_and_exports(tmp_path, capsys):
    args = scenario_table(tmp_path)
    export = tmp_path / "participants.csv"
    assert run_main(check, [*args, "--export", str(export), "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "data contract" in out and "passed" in out
    import pandas as pd
    table = pd.read_csv(export)
    assert list(table.columns[:3]) == ["participant_id", "site", "label"]
    assert len(table) == len(toy_table()) and (tmp_path / "o" / "contract.json").is_file()
