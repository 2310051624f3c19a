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

from safn_core.config import SafnConfig
from safn_core.errors import ConfigError


@dataclass
class Preflight:
    """What the checks found, for the site's console."""

    participants: int
    label_counts: tuple[int, int]
    privacy: str
    cohort: object


def require_site(cfg: SafnConfig, path: Path) -> None:
    if cfg.site is None:
        raise ConfigError(f"{path}: no 'site:' section; a site file needs at least site.name, "
                          "site.superlink, site.root_certificates and site.private_key "
                          "(see deploy/examples/site_a.yaml)")


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
        _readable(site.root_certificates, "site.root_certificates",
                  "the federation's CA certificate (ca.pem from the coordinator)", origin)
        key = _readable(site.private_key, "site.private_key",
                        "this site's private key (<site>.key from deploy/make_certs.py)", origin)
        if key.stat().st_mode & 0o077:
            raise ConfigError(f"{origin}: 'site.private_key' = {key}: readable by other users; "
                              f"run `chmod 600 {key}` first")
    if not site.approved_apps and site.trusted_entities is None:
        raise ConfigError(f"{origin}: neither 'site.approved_apps' nor 'site.trusted_entities' "
                          "is set, so this site would run whatever app code the coordinator "
                          "sends. Add the app hash the coordinator publishes (safn-server "
                          "--app-hash) to site.approved_apps")
    if site.trusted_entities is not None:
        _readable(site.trusted_entities, "site.trusted_entities",
                  "a Flower trusted-entities YAML file", origin)


def check_data(cfg: SafnConfig):
    """Load the site's data and run the data contract; raise with the report if unfit."""
    from safn_core.data.contract import check_cohort
    from safn_core.data.sources import load_cohort

    cohort = load_cohort(cfg.data, cfg.synth)
    report = check_cohort(cohort, cfg.data.min_cell)
    return cohort, report


def check_privacy(cfg: SafnConfig) -> str:
    """The site's privacy settings in one line; the ledger folder must be writable."""
    p = cfg.privacy
    state = Path(cfg.site.state_dir)
    try:
        state.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"site.state_dir = {state}: cannot be created ({exc.strerror}); "
                          "choose a folder this user can write") from None
    if not os.access(state, os.W_OK):
        raise ConfigError(f"site.state_dir = {state}: not writable by this user")
    if p.mode == "off":
        return "off (the coordinator may still ask for DP; this site would then apply it)"
    return (f"DP-SGD, total budget ε = {p.epsilon:g}"
            + (f", δ = {p.delta:g}" if p.delta else ", δ = 1/(10·n_train)")
            + f", C = {p.max_grad_norm:g}, accountant {p.accountant}")


def preflight(cfg: SafnConfig, origin: Path, insecure: bool) -> Preflight:
    """Every check a site runs before joining; the data contract failing is a `SafnError`."""
    require_site(cfg, origin)
    check_security(cfg, origin, insecure)
    privacy = check_privacy(cfg)
    cohort, report = check_data(cfg)
    report.raise_if_failed(f"site {cfg.site.name} does not join; `safn-check --config {origin}` "
                           "prints the full report")
    n_pos = int(cohort.y.sum())
    return Preflight(len(cohort), (len(cohort) - n_pos, n_pos), privacy, cohort)
