"""The configuration schema: defaults, overrides, and clear errors naming file and key."""

from pathlib import Path

import pytest

from safn_core.config import SafnConfig, dump_config, load_config
from safn_core.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def write(tmp_path: Path, text: str, name: str = "c.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def test_defaults_without_file():
    cfg = load_config(None)
    assert cfg.data.source == "synthetic"
    assert cfg.synth.n_pd == 570 and cfg.synth.n_hc == 133
    assert cfg.data.min_cell == 5


def test_file_and_override_precedence(tmp_path):
    p = write(tmp_path, "data:\n  min_cell: 7\nsynth:\n  seed: 3\n")
    cfg = load_config(p, ["synth.seed=11", "data.exclude_motor=true"])
    assert cfg.data.min_cell == 7
    assert cfg.synth.seed == 11
    assert cfg.data.exclude_motor is True


def test_override_creates_missing_section(tmp_path):
    cfg = load_config(None, ["synth.n_sites=3"])
    assert cfg.synth.n_sites == 3


def test_unknown_key_names_file_and_key(tmp_path):
    p = write(tmp_path, "data:\n  min_cel: 7\n")
    with pytest.raises(ConfigError) as exc:
        load_config(p)
    assert str(p) in str(exc.value) and "data.min_cel" in str(exc.value)
    assert "unknown key" in str(exc.value)


def test_unknown_section(tmp_path):
    p = write(tmp_path, "dataa:\n  source: ppmi\n")
    with pytest.raises(ConfigError, match="unknown key 'dataa'"):
        load_config(p)


def test_wrong_type_names_key_and_value(tmp_path):
    p = write(tmp_path, "data:\n  min_cell: many\n")
    with pytest.raises(ConfigError) as exc:
        load_config(p)
    assert "data.min_cell" in str(exc.value) and "'many'" in str(exc.value)


def test_wrong_type_from_override():
    with pytest.raises(ConfigError) as exc:
        load_config(None, ["synth.n_sites=lots"])
    assert "synth.n_sites" in str(exc.value) and "--set" in str(exc.value)


def test_bad_choice():
    with pytest.raises(ConfigError, match="data.source"):
        load_config(None, ["data.source=excel"])


def test_required_path_for_ppmi_source():
    with pytest.raises(ConfigError, match="data.path is required"):
        load_config(None, ["data.source=ppmi"])


def test_unreadable_yaml_names_line(tmp_path):
    p = write(tmp_path, "data:\n  min_cell: [1, 2\n  x: 3\n")
    with pytest.raises(ConfigError) as exc:
        load_config(p)
    assert str(p) in str(exc.value) and "line" in str(exc.value)


def test_top_level_not_mapping(tmp_path):
    p = write(tmp_path, "- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(p)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_override_syntax():
    with pytest.raises(ConfigError, match="dotted.key=value"):
        load_config(None, ["data.min_cell"])
    with pytest.raises(ConfigError, match="key is empty"):
        load_config(None, ["=3"])


def test_override_into_value_is_error(tmp_path):
    p = write(tmp_path, "data:\n  min_cell: 3\n")
    with pytest.raises(ConfigError, match="'data.min_cell' is a value, not a section"):
        load_config(p, ["data.min_cell.x=3"])


def test_relative_paths_resolve_against_config_folder(tmp_path):
    (tmp_path / "dl").mkdir()
    p = write(tmp_path, "data:\n  source: ppmi\n  path: dl\n")
    cfg = load_config(p)
    assert Path(cfg.data.path) == tmp_path / "dl"


def test_dump_round_trips(tmp_path):
    cfg = load_config(None, ["synth.seed=5"])
    p = write(tmp_path, dump_config(cfg))
    assert load_config(p) == cfg


RUN_CONFIGS = sorted(p for p in CONFIGS.glob("*.yaml") if "mapping" not in p.name)


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    assert isinstance(load_config(path), SafnConfig)


def test_shipped_mapping_example_validates():
    from safn_core.data.table_loader import read_mapping
    mapping = read_mapping(CONFIGS / "mapping.example.yaml")
    assert mapping.label.positive == "PD" and "thickness" in mapping.modalities


def test_a_bare_off_switches_the_wide_path_off():
    """YAML reads ``off`` as false; ``model.wide: off`` still means the paper's SAFN."""
    assert load_config(None, ["model.wide=off"]).model.wide == "off"
    with pytest.raises(ConfigError, match="model.wide"):
        load_config(None, ["model.wide=true"])
