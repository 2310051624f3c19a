"""A run's parameters: the flattened effective configuration and the software's versions."""

from __future__ import annotations

from importlib import metadata

PACKAGES = ("safn", "flwr", "torch", "opacus")
MAX_VALUE = 6000  # MLflow's limit on a parameter's value


def flatten(tree, prefix: str = "") -> dict[str, str]:
    """Nested dicts as dotted keys; lists and scalars as text."""
    out: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = str(value)[:MAX_VALUE]
    return out


def versions() -> dict[str, str]:
    """``version.<package>`` of safn, Flower, PyTorch and Opacus (read from the installed
    distributions: nothing is imported)."""
    out = {}
    for name in PACKAGES:
        try:
            out[f"version.{name}"] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[f"version.{name}"] = "not installed"
    return out


def run_params(cfg, sources: dict[str, str] | None = None) -> dict[str, str]:
    """The effective configuration (``config.<dotted key>``), the versions, and the data source
    kind: ``data_source`` (the configuration's) and ``data_source.<site>`` (what each site said
    it has, a federation's ``data_sources.json``)."""
    params = flatten(cfg.model_dump(mode="json"), "config.")
    params.update(versions())
    params["data_source"] = str(cfg.data.source)
    for site, kind in (sources or {}).items():
        params[f"data_source.{site}"] = str(kind)
    return params
