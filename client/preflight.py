"""What a site checks before it joins a federation (`safn-client`), with no network at all.

Each check either passes or raises one `SafnError` line that names the site.yaml key or file to
fix: the site section is present; TLS material and the authentication key exist (unless the
site explicitly chose ``--insecure``); the site approved the app code it will run; its data
loads and passes the data contract; its privacy settings and ledger are usable.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from safn_core.config import SafnConfig
from safn_core.deploy_checks import (check_address, check_site_name, check_site_private_key,
                                     load_certificates)
from safn_core.errors import ConfigError, DataError, SafnError


@dataclass
class Preflight:
    """What the checks found, for the site's console."""

    participants: int
    label_counts: tuple[int, ...]  # per class of the site's target (binary: HC, PD)
    privacy: str
    cohort: object


def require_site(cfg: SafnConfig, path: Path) -> None:
    if cfg.site is None:
        raise ConfigError(f"{path}: no 'site:' section; a site file needs at least site.name, "
                          "site.superlink, site.root_certificates and site.private_key "
                          "(see deploy/examples/site_a.yaml)")
    check_site_name(cfg.site.name, "site.name", str(path))
    check_address(cfg.site.superlink, "site.superlink", str(path))


def _readable(path: Path | None, key: str, what: str, origin: Path) -> Path:
    if path is None:
        raise ConfigError(f"{origin}: '{key}' is not set; it must name {what}")
    if not Path(path).is_file():
        raise ConfigError(f"{origin}: '{key}' = {path}: file not found; it must name {what}")
    if not os.access(path, os.R_OK):
        raise ConfigError(f"{origin}: '{key}' = {path}: not readable by this user")
    return Path(path)


def check_security(cfg: SafnConfig, origin: Path, insecure: bool) -> None:
    """TLS CA and authentication key present (not with --insecure); app approval configured."""
    site = cfg.site
    if not insecure:
        ca = _readable(site.root_certificates, "site.root_certificates",
                       "the federation's CA certificate (ca.pem from the coordinator)", origin)
        load_certificates(ca, "site.root_certificates", str(origin))
        key = _readable(site.private_key, "site.private_key",
                        "this site's private key (<site>.key from deploy/make_certs.py)", origin)
        check_site_private_key(key, "site.private_key", str(origin))
    if not site.approved_apps and site.trusted_entities is None:
        raise ConfigError(f"{origin}: neither 'site.approved_apps' nor 'site.trusted_entities' "
                          "is set, so this site would run whatever app code the coordinator "
                          "sends. Add the app hash the coordinator publishes (safn-server "
                          "--app-hash) to site.approved_apps")
    if site.trusted_entities is not None:
        _readable(site.trusted_entities, "site.trusted_entities",
                  "a Flower trusted-entities YAML file", origin)


def check_data(cfg: SafnConfig, origin: Path):
    """Load the site's data and run the data contract; raise with the report if unfit."""
    from safn_core.data.contract import check_cohort
    from safn_core.data.sources import load_cohort

    try:
        cohort = load_cohort(cfg.data, cfg.synth)
    except SafnError as exc:
        raise DataError(f"{origin}: {exc}") from None
    report = check_cohort(cohort, cfg.data.min_cell)
    return cohort, report


def check_state_dir(state: Path, origin: Path) -> None:
    """``site.state_dir`` is a writable folder, or can be made one (nothing is created here)."""
    if state.exists() and not state.is_dir():
        raise ConfigError(f"{origin}: 'site.state_dir' = {state}: a file of that name exists; "
                          "it must name a folder (the privacy ledger and logs go there)")
    parent = state
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"{origin}: 'site.state_dir' = {state}: cannot be created, {parent} "
                          "is a file; choose a folder this user can write")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{origin}: 'site.state_dir' = {state}: {parent} is not writable by "
                          "this user; choose a folder this user can write")


def check_ledger(cfg: SafnConfig, origin: Path) -> None:
    """An existing privacy ledger must be readable (it is read, never written, here)."""
    if cfg.privacy.ledger is None and not Path(cfg.site.state_dir).is_dir():
        return  # no ledger yet (and no need to import the DP libraries to say so)
    from safn_core.privacy.errors import LedgerError
    from safn_core.privacy.ledger import PrivacyLedger, resolve_ledger_path

    path = resolve_ledger_path(cfg.privacy.ledger, cfg.site.state_dir)
    if path.exists():
        try:
            PrivacyLedger.read(path)
        except LedgerError as exc:
            key = "privacy.ledger" if cfg.privacy.ledger is not None else "site.state_dir"
            raise ConfigError(f"{origin}: '{key}': {exc}") from None


def check_privacy(cfg: SafnConfig, origin: Path) -> str:
    """The site's privacy settings in one line; an existing ledger must be readable."""
    p = cfg.privacy
    check_ledger(cfg, origin)
    if p.mode == "off":
        return "off (the coordinator may still ask for DP; this site would then apply it)"
    if p.mode == "distributed":
        return (f"distributed DP (noise shares under secure aggregation; local DP-SGD in a run "
                f"without it), total budget ε = {p.epsilon:g}"
                + (f", δ = {p.delta:g}" if p.delta else ", δ = 1/(10·n_train)")
                + f", noise cap σ ≤ {p.max_noise_multiplier:g}, accountant {p.accountant}")
    return (f"DP-SGD, total budget ε = {p.epsilon:g}"
            + (f", δ = {p.delta:g}" if p.delta else ", δ = 1/(10·n_train)")
            + f", C = {p.max_grad_norm:g}, accountant {p.accountant}")


def preflight(cfg: SafnConfig, origin: Path, insecure: bool) -> Preflight:
    """Every check a site runs before joining; the data contract failing is a `SafnError`."""
    require_site(cfg, origin)
    check_security(cfg, origin, insecure)
    check_state_dir(Path(cfg.site.state_dir), origin)
    cohort, report = check_data(cfg, origin)
    report.raise_if_failed(f"site {cfg.site.name} does not join; `safn-check --config {origin}` "
                           "prints the full report")
    privacy = check_privacy(cfg, origin)  # (last: reading a ledger loads the DP libraries)
    k = cohort.n_classes
    counts = tuple(int(c) for c in np.bincount(cohort.y, minlength=k)[:k])
    return Preflight(len(cohort), counts, privacy, cohort)


def counts_text(found: Preflight) -> str:
    """The class counts in the site's start line: ``40 / 100`` (binary, as always), with K
    classes each named (``HC 40 / Prodromal 12 / PD 100``)."""
    counts = found.label_counts
    if len(counts) == 2:
        return f"{counts[0]} / {counts[1]}"
    return " / ".join(f"{n} {c}" for n, c in zip(found.cohort.label_names, counts))
