"""A federated run (federation): strategy, rounds, waits, with its secure aggregation
bounds (federation.secagg) and central DP (federation.central_dp)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from safn_core.config.base import Section


class CentralDPConfig(Section):
    """Central DP (docs/privacy.md): each site's update clipped to ``clipping_norm`` and
    Gaussian noise on the average. Site-level DP for whoever receives the global model; no
    per-site ε. Without secure aggregation Flower's server-side fixed clipping does it (the
    coordinator sees the unnoised updates); with it the sites clip and the mean of the clipped
    updates, which is all the coordinator sees, gets the noise."""

    enabled: bool = False
    noise_multiplier: float = Field(
        1.0, gt=0, description="σ: noise std on the average is σ·clipping_norm / sites per round")
    clipping_norm: float = Field(
        1.0, gt=0, description="L2 bound on each site's update (new weights − global weights)")
    delta: float = Field(1e-5, gt=0, lt=1, description="δ of the reported site-level ε")


class SecAggConfig(Section):
    """Bounds of secure aggregation's fixed-point encoding (docs/secure-aggregation.md): values
    beyond them are clipped at the site (the federation-wide clip count is reported); with them
    no 64-bit sum can overflow."""

    weight_bound: float = Field(1e3, gt=0, description="largest |model weight| a site sends")
    feature_bound: float = Field(1e9, gt=0, description="largest |feature value| (statistics)")
    max_site_examples: int = Field(100_000, ge=1, description="most participants at one site")
    max_attempts: int = Field(3, ge=1, le=10, description="aggregations redone after a dropout")


class FederationConfig(Section):
    """A federated run: strategy, rounds, local work, sites' splits (every engine)."""

    strategy: Literal["fedavg", "fedprox", "fedadam", "fedyogi"] = "fedavg"
    rounds: int = Field(20, ge=1)
    local_epochs: int = Field(2, ge=1)
    proximal_mu: float = Field(0.01, ge=0, description="FedProx μ (strategy fedprox)")
    server_lr: float = Field(0.01, gt=0, description="η of FedAdam/FedYogi")
    tau: float = Field(1e-3, gt=0, description="adaptivity τ of FedAdam/FedYogi")
    beta_1: float = Field(0.9, ge=0, lt=1)
    beta_2: float = Field(0.99, ge=0, lt=1)
    fraction_train: float = Field(1.0, gt=0, le=1)
    fraction_evaluate: float = Field(1.0, gt=0, le=1)
    min_sites: int = Field(2, ge=1, description="sites needed to train or evaluate a round")
    select: Literal["val_loss", "val_roc_auc", "last"] = Field(
        "val_loss", description="which round's model the run keeps: the best by pooled "
                                "validation loss, the best by pooled validation ROC-AUC, or "
                                "the last round; the pooled and local-only comparators of "
                                "safn-sim select by the same rule")
    patience: int | None = Field(
        5, ge=1, description="stop after this many rounds without improvement of the selection "
                             "metric (null: train every round; ignored with select: last)")
    split_seed: int = Field(0, description="seed of every site's train/val/test split")
    val_fraction: float = Field(0.15, gt=0, lt=0.5)
    test_fraction: float = Field(0.2, gt=0, lt=0.5)
    histogram_bins: int = Field(1000, ge=10, description="score histogram bins for pooled AUC")
    round_timeout: float = Field(600, gt=0, description="seconds to wait for a round's replies")
    wait_for_sites: float = Field(
        300, gt=0, description="seconds a run waits for min_sites connected sites, at the start "
                               "and whenever fewer remain; then it stops with its checkpoint")
    rejoin_wait: float = Field(
        60, ge=0, description="seconds a training round waits, at its start, for sites of the "
                              "run that are not connected (e.g. restarting after a crash); a "
                              "site still away after a whole wait is not waited for again "
                              "until it is back; 0: never wait")
    central_dp: CentralDPConfig = Field(
        default_factory=CentralDPConfig,
        description="central DP: server-side clipping + noise (strategies fedavg / fedprox)")
    secure_aggregation: bool = Field(
        True, description="the coordinator sees only federation-wide sums of statistics, "
                          "updates and histograms (pairwise masking); needs 3 or more sites")
    secagg: SecAggConfig = Field(default_factory=SecAggConfig,
                                 description="bounds of secure aggregation's encoding")

    @model_validator(mode="after")
    def _central_dp_strategy(self) -> "FederationConfig":
        if self.central_dp.enabled and self.strategy not in ("fedavg", "fedprox"):
            raise ValueError(
                f"federation.central_dp needs strategy fedavg or fedprox, not "
                f"'{self.strategy}': its noise is calibrated to the average of clipped updates, "
                f"which FedAdam/FedYogi transform afterwards")
        return self
