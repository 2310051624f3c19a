"""Where a run happens: virtual sites on one machine (simulation), a hospital's side of a
deployment (site) and the coordinator (server)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from safn_core.config.base import Section


class SimulationConfig(Section):
    """Virtual sites on one machine (`safn-sim`): partitioning and the Ray backend."""

    partition: Literal["natural", "iid", "dirichlet", "size_skew"] = "natural"
    n_sites: int = Field(5, ge=1, description="virtual sites (ignored by 'natural')")
    dirichlet_alpha: float = Field(0.5, gt=0, description="label skew; smaller = more skewed")
    size_skew: float = Field(1.0, gt=0, description="Dirichlet α of site sizes; smaller = more skewed")
    seed: int = 0
    compare: bool = Field(True, description="also train pooled and local-only models")
    loso: bool = Field(False, description="leave-one-site-out: one federation per held-out site")
    num_cpus_per_site: float = Field(1.0, gt=0, description="Ray CPUs per ClientApp")
    ray_num_cpus: int | None = Field(
        None, ge=1, description="CPUs Ray may use in all (None = every core); with "
                                "num_cpus_per_site it bounds the concurrent ClientApp actors")
    ray_object_store_mb: int = Field(256, ge=80, description="Ray object store size (MiB)")
    ray_address: str | None = Field(
        None, description="an existing Ray cluster: 'auto' (the one this machine is a node "
                          "of) or the head's host:port (docs/ray-cluster.md)")
    fast_polling: bool = Field(True, description="the ServerApp polls Flower's in-memory Grid "
                                                 "and Flower's dispatcher hands out messages "
                                                 "every 10 ms instead of 100 ms (idle time per "
                                                 "round; docs/flower-patches.md)")
    many_sites_dispatcher: bool = Field(
        False, description="Flower's simulation dispatcher looks only at nodes that have a "
                           "message (read from its state under its lock) instead of asking "
                           "every node: pays off from a few hundred virtual sites "
                           "(docs/flower-patches.md)")
    site_state_dir: Path | None = Field(
        None, description="virtual sites' own state (privacy ledgers), one subfolder per site; "
                          "outside any run folder so later runs find the spent budget (default "
                          "<parent of the run folder>/sim-site-state)")

    @model_validator(mode="after")
    def _cluster_owns_its_resources(self) -> "SimulationConfig":
        if self.ray_address and self.ray_num_cpus:
            raise ValueError(
                f"simulation.ray_num_cpus = {self.ray_num_cpus} with ray_address "
                f"'{self.ray_address}': a Ray cluster's nodes declare their own CPUs (ray start "
                "--num-cpus); set ray_num_cpus to null, or drop ray_address for a local Ray")
        return self


class SiteConfig(Section):
    """One hospital's side of a deployment (`safn-client --site site.yaml`).

    TLS and SuperNode authentication are always on; only ``safn-client --insecure`` (a flag,
    never a config key) turns them off, for local experiments without real data.
    """

    name: str = Field(..., min_length=1, description="the site's name, as the coordinator knows it")
    superlink: str = Field("127.0.0.1:9092", description="the coordinator's SuperLink (host:port)")
    split_seed: int = Field(0, description="seed of this site's train/validation/test split")
    root_certificates: Path | None = Field(None, description="the federation CA (ca.pem)")
    private_key: Path | None = Field(None, description="this site's key (SuperNode authentication)")
    approved_apps: list[str] = Field(
        default_factory=list,
        description="sha256 hashes of the app bundles (FABs) this site agrees to run")
    trusted_entities: Path | None = Field(
        None, description="Flower trusted-entities YAML: run FABs signed by these keys")
    state_dir: Path = Field(Path("safn-site-state"),
                            description="site-local state: privacy ledger, logs")
    local_port: int = Field(9094, ge=1, le=65535,
                            description="the SuperNode's local Runtime API port (127.0.0.1 "
                                        "only; distinct per site on one host)")
    poll_interval: float = Field(
        0.2, ge=0.05, le=3, description="seconds an idle SuperNode waits between two pulls from "
                                        "the SuperLink (Flower's own: 3)")
    connect_wait: float = Field(
        60, ge=0, description="seconds to wait for the coordinator to answer at site.superlink "
                              "(it may be starting); the cause is printed at once")
    activation_wait: float = Field(
        90, ge=0, description="seconds to keep retrying when the SuperLink refuses to activate "
                              "this site (its key unknown, or its last connection not yet "
                              "timed out after a crash)")

    @field_validator("approved_apps")
    @classmethod
    def _hashes(cls, value: list[str]) -> list[str]:
        out = []
        for h in value:
            h = str(h).strip().lower().removeprefix("sha256:")
            if len(h) != 64 or any(c not in "0123456789abcdef" for c in h):
                raise ValueError(f"site.approved_apps: {h!r} is not a sha256 hash (64 hex "
                                 "digits); copy the hash that safn-server prints for its app")
            out.append(h)
        return out


class ServerConfig(Section):
    """The coordinator (`safn-server --config server.yaml`)."""

    host: str = Field("127.0.0.1", description="interface the SuperLink listens on")
    port: int = Field(9092, ge=1, le=65535,
                      description="the SuperLink's one HTTPS port (Fleet, Control, Runtime APIs)")
    certificates: Path | None = Field(
        None, description="folder with ca.pem, superlink.pem and superlink.key (deploy/make_certs.py)")
    sites: dict[str, Path] = Field(default_factory=dict,
                                   description="the sites allowed to join: name -> public key "
                                               "file (SuperNode authentication)")
    held_out_sites: list[str] = Field(
        default_factory=list, description="sites that only evaluate (external validation): "
                                          "they neither train nor shape the preprocessing")
    run_dir: Path = Field(Path("runs/federation"), description="the run folder on the coordinator")
    poll_interval: float = Field(
        0.2, ge=0.05, le=3, description="seconds between the ServerApp's polls for replies "
                                        "(Flower's own: 3)")
    database: Path | None = Field(None, description="SuperLink state database (default in run_dir)")
